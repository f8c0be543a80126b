"""Runtime config lookup: user cache dir → shipped table for this GPU → the kernel's heuristic.

No benchmarking happens here. Tables are JSON files ``<root>/<gpu>/<kernel>.json``::

    {"kernel": "unfold", "source_hash": "…", "triton_version": "3.6.0", "device": "NVIDIA H100 …",
     "configs": {"float16|L=1024|R=4096": {"meta": {"BLOCK_R": 8, …}, "num_warps": 4, "num_stages": 2}}}

A table whose kernel source hash or Triton version differs from the running ones, or that cannot be
read, is ignored with one warning (per file), never an error.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from convzoo.autotune.config import Config, KernelSpec, bucket_key, get_spec

__all__ = [
    "clear_cache",
    "device_slug",
    "interpret_mode",
    "lookup",
    "resolve",
    "shipped_dir",
    "user_cache_dir",
    "write_table",
]

_TABLES: dict[Path, tuple[float, dict | None]] = {}
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


def _warn_once(path: Path, why: str) -> None:
    if path not in _WARNED:
        _WARNED.add(path)
        warnings.warn(f"convzoo: ignoring autotune table {path}: {why}", RuntimeWarning, stacklevel=4)


class StaleTable(ValueError):
    """A readable table that does not belong to the running kernel source or Triton."""


def read_table(path: Path, spec: KernelSpec) -> dict[str, Config]:
    """The entries of the table at ``path``, read fresh (no cache, no warning).

    Raises:
        StaleTable: it is for another kernel, another kernel source or another Triton version.
        OSError, ValueError, KeyError, TypeError, AttributeError: missing or corrupt.
    """
    data = json.loads(path.read_text())
    if data.get("kernel") != spec.name:
        raise StaleTable(f"it is for kernel {data.get('kernel')!r}, not {spec.name!r}")
    if data.get("source_hash") != spec.source_hash:
        raise StaleTable("stale: the kernel source changed since it was tuned")
    if data.get("triton_version") != triton_version():
        raise StaleTable(f"tuned with Triton {data.get('triton_version')}, running {triton_version()}")
    return {k: Config.from_json(v) for k, v in data["configs"].items()}


def _load(path: Path, spec: KernelSpec) -> dict | None:
    """The ``configs`` of a valid table at ``path``, else None (missing, stale or corrupt)."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    cached = _TABLES.get(path)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    try:
        configs = read_table(path, spec)
    except StaleTable as e:
        _warn_once(path, str(e))
        configs = None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        _warn_once(path, f"unreadable ({type(e).__name__}: {e})")
        configs = None
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
