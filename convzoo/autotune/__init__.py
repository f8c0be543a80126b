"""Launch configs for every convzoo kernel: registry, shipped per-GPU tables, runtime lookup.

Configs never come from ``@triton.autotune`` (it benchmarks at run time, and cannot run under the
interpreter). Each kernel module registers a :class:`KernelSpec`; launchers call :func:`lookup`. A config can be
forced by hand with :func:`force_config` or the ``CONVZOO_CONFIG`` environment variable.
"""

from convzoo.autotune.config import (
    Config,
    ConfigSpace,
    KernelSpec,
    TuneProblem,
    bucket,
    bucket_key,
    get_spec,
    register,
    registered,
)
from convzoo.autotune.lookup import (
    CONFIG_ENV,
    clear_cache,
    device_slug,
    force_config,
    interpret_mode,
    lookup,
    parse_config_env,
    resolve,
    shipped_dir,
    user_cache_dir,
    write_table,
)

__all__ = [
    "CONFIG_ENV",
    "Config",
    "ConfigSpace",
    "KernelSpec",
    "TuneProblem",
    "bucket",
    "bucket_key",
    "clear_cache",
    "device_slug",
    "force_config",
    "get_spec",
    "interpret_mode",
    "lookup",
    "parse_config_env",
    "register",
    "registered",
    "resolve",
    "shipped_dir",
    "user_cache_dir",
    "write_table",
]
