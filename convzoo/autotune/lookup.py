"""Runtime config lookup: a forced config → user cache dir → shipped table for this GPU → the kernel's heuristic.

A config is forced by hand with :func:`force_config` (a context manager) or the ``CONVZOO_CONFIG``
environment variable (:data:`CONFIG_ENV`, grammar in :func:`parse_config_env`); the context manager
wins over the variable. Either is checked against the kernel's declared space and ``keep`` rule for
the call's dtype and dims, and refused with a ``ValueError`` otherwise, never silently replaced.

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

import contextlib
import dataclasses
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

from convzoo.autotune.config import Config, ConfigSpace, KernelSpec, bucket_key, get_spec, parse_key

__all__ = [
    "CONFIG_ENV",
    "clear_cache",
    "device_slug",
    "force_config",
    "interpret_mode",
    "load_entries",
    "lookup",
    "parse_config_env",
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
    return Path(root).expanduser() / "autotune"  # a quoted '~' (a Dockerfile ENV) is the home folder too


def shipped_dir() -> Path:
    return Path(__file__).parent / "tables"


def clear_cache() -> None:
    """Forget loaded tables and issued warnings (tests, and after a tuning run). Forced configs are
    never cached: the context manager's are live only inside it, the variable is read at every lookup."""
    _TABLES.clear()
    _WARNED.clear()
    _ENV_CHECKED.clear()


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


# ---------------------------------------------------------------------------------------------- forced configs
CONFIG_ENV = "CONVZOO_CONFIG"
_GENERIC = ("num_warps", "num_stages")
# force_config's entries, innermost last: (kernel, tiles/warps/stages or a Config, what to name in errors).
# Process-wide, not per thread: autograd runs backward kernels on its own threads on CUDA.
_FORCED: list[tuple[str, Mapping[str, int] | Config, str]] = []
_ENV_CHECKED: set[str] = set()  # CONVZOO_CONFIG values whose kernels, names and ranges were checked


def _spec(name: str, source: str) -> KernelSpec:
    """The spec of kernel ``name``: kernels register when their module is imported, and a name not registered
    yet runs the registry's loaders first (:func:`~convzoo.autotune.config.add_loader`), so a typo is not
    mistaken for "not imported yet".

    Raises:
        ValueError: no kernel has that name (the message starts with ``source``).
    """
    try:
        return get_spec(name)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def parse_config_env(text: str) -> dict[str, dict[str, int]]:
    """The configs ``CONVZOO_CONFIG`` forces: ``'kernel:NAME=int,NAME=int;kernel:...'``, e.g.
    ``'unfold:BLOCK_R=8,BLOCK_L=128,num_warps=4;local_conv_fwd:BLOCK_N=32,BLOCK_O=32,BLOCK_R=32'``.

    Entries are separated by ``;``, a kernel name and its parameters by ``:``, parameters by ``,``;
    spaces around any of them are ignored, and so are empty entries. Every tile of the kernel must be
    named; ``num_warps`` and ``num_stages`` may be left out (the kernel's heuristic then gives them).
    Only the syntax is checked here (cached by value; the variable is read at every lookup).

    Raises:
        ValueError: naming ``CONVZOO_CONFIG`` and the bad part: an entry that is not ``kernel:params``,
            a parameter that is not ``NAME=<decimal integer>``, a kernel or parameter named twice.
    """
    return {k: dict(v) for k, v in _parse_env(text).items()}


@functools.lru_cache(maxsize=16)
def _parse_env(text: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for entry in text.split(";"):
        if not entry.strip():
            continue
        kernel, colon, body = (part.strip() for part in entry.partition(":"))
        if not colon or not kernel.isidentifier():
            raise ValueError(f"{CONFIG_ENV}: {reprlib.repr(entry.strip())} is not 'kernel:NAME=int,...' "
                             f"(entries are separated by ';')")
        if kernel in out:
            raise ValueError(f"{CONFIG_ENV}: kernel {kernel!r} is named twice")
        params: dict[str, int] = {}
        for item in body.split(","):
            name, eq, value = (part.strip() for part in item.partition("="))
            if not (eq and name.isidentifier() and value.isascii() and value.isdigit() and len(value) <= 20):
                raise ValueError(f"{CONFIG_ENV}: {kernel}: {reprlib.repr(item.strip())} is not NAME=<integer> "
                                 f"(parameters are separated by ',')")
            if name in params:
                raise ValueError(f"{CONFIG_ENV}: {kernel}: {name} is named twice")
            params[name] = int(value)
        out[kernel] = params
    return out


def _tile_names(spec: KernelSpec) -> list[str]:
    if spec.space is not None:
        return list(spec.space.tiles)
    return sorted(spec.default_config(dict.fromkeys(spec.dims, 1), torch.float32, False).meta)


def _complete(spec: KernelSpec, entry: Mapping[str, int] | Config, source: str,
              fill: Config | None) -> Config:
    """``entry`` as a Config, ``num_warps``/``num_stages`` it leaves out taken from ``fill``.

    Raises:
        ValueError: a parameter the kernel does not have, a tile left out, a value that is not an integer.
    """
    if isinstance(entry, Config):
        return entry
    tiles = _tile_names(spec)
    for name, v in entry.items():
        if name not in tiles and name not in _GENERIC:
            raise ValueError(f"{source}: {spec.name} has no parameter {name!r}; "
                             f"its parameters are {', '.join([*tiles, *_GENERIC])}")
        if type(v) is not int:
            raise ValueError(f"{source}: {spec.name}: {name}={reprlib.repr(v)} is not an integer")
    missing = [t for t in tiles if t not in entry]
    if missing:
        raise ValueError(f"{source}: {spec.name} needs every tile; {', '.join(missing)} missing "
                         f"(its tiles are {', '.join(tiles)})")
    fill = fill or Config({}, 4, 1)
    return Config({t: entry[t] for t in tiles}, entry.get("num_warps", fill.num_warps),
                  entry.get("num_stages", fill.num_stages))


def _check_static(spec: KernelSpec, entry: Mapping[str, int] | Config, source: str) -> None:
    """What can be checked before a call: the names, and the space's bounds (``keep`` depends on the
    call's dtype and dims, and is checked at each lookup).

    Raises:
        ValueError: naming ``source``, the kernel and the parameter.
    """
    ones = dict.fromkeys(spec.dims, 1)
    space = spec.space or ConfigSpace(dict.fromkeys(_tile_names(spec), (1, 1 << 16)))
    # a left-out num_warps/num_stages is filled per call from the heuristic: stand in the space's lowest
    cfg = _complete(spec, entry, source, Config({}, space.num_warps[0], space.num_stages[0]))
    unkept = dataclasses.replace(spec, space=dataclasses.replace(space, keep=None))
    try:
        unkept.check(cfg, torch.float32, ones)
    except ValueError as e:
        raise ValueError(f"{source}: refused for {spec.name}: {e}") from None


def _forced(spec: KernelSpec, dtype: torch.dtype, dims: Mapping[str, int]) -> Config | None:
    """The config forced for this call of ``spec``'s kernel, checked against its space and ``keep``
    rule for ``dtype`` and ``dims``; None when nothing is forced for it."""
    entry = source = None
    for kernel, e, src in reversed(_FORCED):
        if kernel == spec.name:
            entry, source = e, src
            break
    if entry is None:
        text = os.environ.get(CONFIG_ENV, "")
        if not text.strip():
            return None
        parsed = _parse_env(text)
        source = CONFIG_ENV
        if text not in _ENV_CHECKED:  # every kernel it names, once per value: a typo is never ignored
            for kernel, params in parsed.items():
                _check_static(_spec(kernel, CONFIG_ENV), params, f"{CONFIG_ENV}: {kernel}")
            _ENV_CHECKED.add(text)
        entry = parsed.get(spec.name)
        if entry is None:
            return None
    cfg = _complete(spec, entry, source, spec.default_config(dims, dtype, interpret_mode()))
    try:
        spec.check(cfg, dtype, dims)
    except ValueError as e:
        raise ValueError(f"{source}: forced config refused for {spec.name} "
                         f"({str(dtype).removeprefix('torch.')}, {dict(dims)}): {e}") from None
    return cfg


@contextlib.contextmanager
def force_config(kernel: str, config: Config | None = None, /, **params: int):
    """Inside the block, every launch of ``kernel`` uses this config: a :class:`Config`, or its tiles
    (all of them) and optionally ``num_warps``/``num_stages`` as keywords (left out: the heuristic's).
    It wins over ``CONVZOO_CONFIG``, tables and the heuristic; an inner block wins over an outer one.
    Process-wide (backward kernels run on autograd's threads), not per thread.

    Example: ``with force_config("unfold", BLOCK_R=8, BLOCK_L=128, num_warps=4): y = convzoo.unfold(x, 3)``

    Raises:
        ValueError: on entry, an unknown kernel or parameter, a tile left out, a value outside the
            kernel's declared space; at a launch inside, a config the kernel's ``keep`` rule refuses
            for that call's dtype and dims (e.g. fp64's smaller tiles).
        TypeError: both a Config and keywords.
    """
    source = f"force_config({kernel!r})"
    if config is not None and params:
        raise TypeError(f"{source}: pass a Config or keyword parameters, not both")
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"{source}: config must be a convzoo.autotune.Config, got {type(config).__name__}")
    spec = _spec(kernel, source)
    entry = config if config is not None else dict(params)
    _check_static(spec, entry, source)
    item = (spec.name, entry, source)
    _FORCED.append(item)
    try:
        yield
    finally:
        # by identity, not pop(): blocks on other threads may exit in another order
        for i in range(len(_FORCED) - 1, -1, -1):
            if _FORCED[i] is item:
                del _FORCED[i]
                break


def lookup(kernel_name: str, device: torch.device, dtype: torch.dtype, **dims: int) -> Config:
    """The launch config for one call of kernel ``kernel_name``: a forced one (:func:`force_config`,
    then ``CONVZOO_CONFIG``) if any; else, under ``TRITON_INTERPRET=1`` or on a non-CUDA device, the
    kernel's heuristic, always; else user cache → shipped table → heuristic.

    Raises:
        ValueError: an unknown kernel; a malformed ``CONVZOO_CONFIG``; a forced config the kernel refuses
            for this dtype and these dims.
    """
    spec = get_spec(kernel_name)
    forced = _forced(spec, dtype, dims)
    if forced is not None:
        return forced
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
