"""Runtime config lookup: user cache dir → shipped table for this GPU → the kernel's heuristic.

No benchmarking happens here. Tables are JSON files ``<root>/<gpu>/<kernel>.json``::

    {"kernel": "unfold", "source_hash": "…", "triton_version": "3.6.0", "device": "NVIDIA H100 …",
     "configs": {"float16|L=1024|R=4096": {"meta": {"BLOCK_R": 8, …}, "num_warps": 4, "num_stages": 2}}}

A table whose kernel source hash or Triton version differs from the running ones, or that cannot be
read, is ignored with one warning (per file), never an error; so is a table folder that cannot be
searched (a file, no permission). An entry whose key is not one of the kernel's table keys, or whose
config is not in the kernel's declared space (:meth:`KernelSpec.check`), is dropped with one warning
per table, and the table's other entries are used.
"""

from __future__ import annotations

import functools
import json
import os
import re
import reprlib
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from convzoo.autotune.config import Config, KernelSpec, bucket_key, get_spec, parse_key

__all__ = [
    "clear_cache",
    "device_slug",
    "interpret_mode",
    "load_entries",
    "lookup",
    "read_table",
    "resolve",
    "shipped_dir",
    "user_cache_dir",
    "write_table",
]

_TABLES: dict[Path, tuple[float, dict[str, Config]]] = {}
_WARNED: set[Path] = set()


def interpret_mode() -> bool:
    """True when Triton kernels run under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_version() -> str:
    try:
        import triton
    except ImportError:  # pragma: no cover - triton is a dependency on Linux
        return "none"
    return triton.__version__


def device_slug(name: str) -> str:
    """``'NVIDIA H100 80GB HBM3'`` → ``'nvidia-h100-80gb-hbm3'``: the folder name of a GPU's tables."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def _gpu_slug(index: int) -> str:
    """The table folder of CUDA device ``index``; asked of the driver once, not at every launch."""
    return device_slug(torch.cuda.get_device_name(index))


def user_cache_dir() -> Path:
    """``$CONVZOO_CACHE_DIR``, else ``$XDG_CACHE_HOME/convzoo``, else ``~/.cache/convzoo``; + ``/autotune``."""
    root = os.environ.get("CONVZOO_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "convzoo")
    return Path(root) / "autotune"


def shipped_dir() -> Path:
    return Path(__file__).parent / "tables"


def clear_cache() -> None:
    """Forget loaded tables and issued warnings (tests, and after a tuning run)."""
    _TABLES.clear()
    _WARNED.clear()


def _warn_once(path: Path, message: str) -> None:
    if path not in _WARNED:
        _WARNED.add(path)
        warnings.warn(f"convzoo: {message}", RuntimeWarning, stacklevel=5)


class StaleTable(ValueError):
    """A readable table that does not belong to the running kernel source or Triton."""


def read_table(path: Path, spec: KernelSpec) -> tuple[dict[str, Config], dict[str, str]]:
    """The valid entries of the table at ``path``, and why each other entry is invalid; read fresh
    (no cache, no warning). An entry is valid when its key is a table key of ``spec``'s dims and its
    config lies in ``spec``'s declared space for that dtype and dims bucket (:meth:`KernelSpec.check`).

    Raises:
        StaleTable: it is for another kernel, another kernel source or another Triton version.
        OSError: it cannot be read (missing, a folder, no permission, a path component is a file).
        ValueError: it is not a table (not UTF-8 JSON, nested too deeply, no ``configs`` object).
    """
    try:
        data = json.loads(path.read_text())
    except RecursionError:  # json's parser recurses per nesting level
        raise ValueError("its JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"it is a JSON {type(data).__name__}, not an object")
    if data.get("kernel") != spec.name:
        raise StaleTable(f"it is for kernel {reprlib.repr(data.get('kernel'))}, not {spec.name!r}")
    if data.get("source_hash") != spec.source_hash:
        raise StaleTable("stale: the kernel source changed since it was tuned")
    if data.get("triton_version") != triton_version():
        raise StaleTable(f"tuned with Triton {reprlib.repr(data.get('triton_version'))}, running {triton_version()}")
    configs = data.get("configs")
    if not isinstance(configs, dict):
        raise ValueError(f"its 'configs' is a {type(configs).__name__}, not an object")
    good, bad = {}, {}
    for key, entry in configs.items():
        try:
            dtype, dims = parse_key(key, spec.dims)
            config = Config.from_json(entry)
            spec.check(config, dtype, dims)
        except ValueError as e:
            bad[key] = str(e)
        else:
            good[key] = config
    return good, bad


def load_entries(path: Path, spec: KernelSpec) -> dict[str, Config]:
    """The valid entries of the table at ``path`` (read fresh), none if it is missing; whatever is
    ignored (the table, its folder, invalid entries) is said in one warning per table or folder."""
    try:
        configs, bad = read_table(path, spec)
    except FileNotFoundError:  # no table here: the usual case, and no folder is the same
        return {}
    except StaleTable as e:
        _warn_once(path, f"ignoring autotune table {path}: {e}")
        return {}
    except NotADirectoryError as e:  # a path component, e.g. the cache folder, is a file
        _warn_once(path.parent, f"ignoring autotune tables in {path.parent}: a part of it is not a folder ({e})")
        return {}
    except PermissionError as e:  # the file, or its folder (cannot be searched)
        _warn_once(path, f"ignoring autotune table {path}: no permission to read it ({e})")
        return {}
    except (OSError, ValueError) as e:
        _warn_once(path, f"ignoring autotune table {path}: unreadable ({type(e).__name__}: {e})")
        return {}
    if bad:
        shown = "; ".join(f"{reprlib.repr(k)}: {why}" for k, why in list(bad.items())[:3])
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        _warn_once(path, f"autotune table {path}: ignoring {len(bad)} invalid "
                         f"entr{'y' if len(bad) == 1 else 'ies'} ({shown}{more}); its other entries are used")
    return configs


def _load(path: Path, spec: KernelSpec) -> dict[str, Config]:
    """:func:`load_entries`, kept until the file changes (its mtime): launches do not re-read tables."""
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):  # its folder is a file or cannot be searched: say so, once
        return load_entries(path, spec)
    cached = _TABLES.get(path)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    configs = load_entries(path, spec)
    _TABLES[path] = (mtime, configs)
    return configs


def resolve(kernel_name: str, gpu: str, dtype: torch.dtype, dims: Mapping[str, int],
            roots: tuple[Path, ...] | None = None) -> Config:
    """The config for ``kernel_name`` on the GPU named ``gpu`` (a slug), from the first table root
    that has an entry for this dtype and dims bucket, else the kernel's heuristic."""
    spec = get_spec(kernel_name)
    key = bucket_key(dtype, dims)
    for root in roots if roots is not None else (user_cache_dir(), shipped_dir()):
        configs = _load(root / gpu / f"{spec.name}.json", spec)
        if configs and key in configs:
            return configs[key]
    return spec.default_config(dims, dtype, False)


def lookup(kernel_name: str, device: torch.device, dtype: torch.dtype, **dims: int) -> Config:
    """The launch config for one call of kernel ``kernel_name``.

    Under ``TRITON_INTERPRET=1`` or on a non-CUDA device: the kernel's heuristic, always.
    """
    spec = get_spec(kernel_name)
    device = torch.device(device)
    if interpret_mode() or device.type != "cuda":
        return spec.default_config(dims, dtype, interpret_mode())
    index = device.index if device.index is not None else torch.cuda.current_device()
    return resolve(kernel_name, _gpu_slug(index), dtype, dims)


def write_table(path: Path, spec: KernelSpec, configs: Mapping[str, Config], device_name: str = "") -> None:
    """Write a table atomically (temp file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "kernel": spec.name,
        "source_hash": spec.source_hash,
        "triton_version": triton_version(),
        "device": device_name,
        "configs": {k: c.to_json() for k, c in sorted(configs.items())},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
