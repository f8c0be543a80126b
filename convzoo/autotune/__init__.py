"""Launch configs for every convzoo kernel: registry, shipped per-GPU tables, runtime lookup.

Configs never come from ``@triton.autotune`` (it benchmarks at run time, and cannot run under the
interpreter). Each kernel module registers a :class:`KernelSpec`; launchers call :func:`lookup`.
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
    clear_cache,
    device_slug,
    interpret_mode,
    lookup,
    resolve,
    shipped_dir,
    user_cache_dir,
    write_table,
)

__all__ = [
    "Config",
    "ConfigSpace",
    "KernelSpec",
    "TuneProblem",
    "bucket",
    "bucket_key",
    "clear_cache",
    "device_slug",
    "get_spec",
    "interpret_mode",
    "lookup",
    "register",
    "registered",
    "resolve",
    "shipped_dir",
    "user_cache_dir",
    "write_table",
]
