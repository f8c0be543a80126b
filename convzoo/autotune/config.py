"""Tile configs, the per-kernel registry, and the bucketing of dims into table keys."""

from __future__ import annotations

import functools
import hashlib
import inspect
import reprlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

__all__ = [
    "Config",
    "ConfigSpace",
    "KernelSpec",
    "TuneProblem",
    "add_loader",
    "bucket",
    "bucket_key",
    "get_spec",
    "parse_key",
    "register",
    "registered",
]

# a space a kernel does not declare: its heuristic's tile names, each a power of two up to this
_UNDECLARED_TILE_MAX = 1 << 16


def _is_int(v) -> bool:
    """A JSON integer: not ``True`` (an int to Python, never a tile size) and not ``16.0`` or ``1e999``."""
    return type(v) is int


def _is_pow2(v) -> bool:
    return _is_int(v) and v >= 1 and v & (v - 1) == 0


# the dtypes a key may name; from torch's namespace, not getattr (a key must not import torch submodules)
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _short(v) -> str:
    return reprlib.repr(v)  # bounded: a table can hold a huge or deeply nested value


@dataclass(frozen=True)
class Config:
    """One launch configuration: the kernel's tile constexprs plus ``num_warps``/``num_stages``."""

    meta: Mapping[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2

    def __hash__(self) -> int:  # meta is a dict: hash its items (configs key the tuner's dicts)
        return hash((tuple(sorted(self.meta.items())), self.num_warps, self.num_stages))

    def to_json(self) -> dict:
        return {"meta": dict(self.meta), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @classmethod
    def from_json(cls, d) -> Config:
        """The config of one table entry, ``{"meta": {name: int}, "num_warps": int, "num_stages": int}``.

        Only its shape and types are checked here (integers are JSON integers: no bool, no float);
        whether the values suit a kernel is :meth:`KernelSpec.check`'s job.

        Raises:
            ValueError: ``d`` is not of that shape, or a value is not an integer.
        """
        if not isinstance(d, Mapping) or set(d) != {"meta", "num_warps", "num_stages"}:
            got = f"keys {_short(sorted(map(str, d)))}" if isinstance(d, Mapping) else f"a JSON {type(d).__name__}"
            raise ValueError(f"an entry needs exactly the keys meta, num_warps, num_stages; got {got}")
        meta = d["meta"]
        if not isinstance(meta, Mapping):
            raise ValueError(f"meta must be an object of tile sizes, got {_short(meta)}")
        for name, v in [*meta.items(), ("num_warps", d["num_warps"]), ("num_stages", d["num_stages"])]:
            if not _is_int(v):
                raise ValueError(f"{name}={_short(v)} is not an integer")
        return cls(dict(meta), d["num_warps"], d["num_stages"])

    def launch_kwargs(self) -> dict:
        return {**self.meta, "num_warps": self.num_warps, "num_stages": self.num_stages}


@dataclass(frozen=True)
class ConfigSpace:
    """The configs a kernel declares it may launch with: what a table entry must lie in.

    ``tiles`` maps each tile constexpr to its inclusive ``(min, max)``, powers of two; ``num_warps``
    (a power of two) and ``num_stages`` lie in their inclusive ranges; ``keep(config, dtype)`` is the
    kernel's own rule, the one its candidate generator filters with (tl.dot tiles, register budget).
    The bounds cover the tuner's candidates and the heuristic's defaults, so whatever the tuner
    writes, the reader accepts.
    """

    tiles: Mapping[str, tuple[int, int]]
    num_warps: tuple[int, int] = (1, 32)
    num_stages: tuple[int, int] = (1, 4)
    keep: Callable[[Config, torch.dtype], bool] | None = None


@dataclass(frozen=True)
class KernelSpec:
    """What the autotuner knows of one kernel.

    ``default_config(dims, dtype, interpret)`` is the readable heuristic; ``candidates(dims, dtype)``
    yields the configs the tuner may try (already filtered by the kernel's validity check);
    ``dims`` names the size arguments that ``lookup`` is called with (bucketed into table keys);
    ``problem(layer, dtype, device)`` builds the tuner's :class:`TuneProblem` for one grid layer;
    ``space`` is the :class:`ConfigSpace` a table entry is checked against (without one: the
    heuristic's tile names, any power of two up to 2**16, the generic warps and stages ranges).
    """

    name: str
    kernel: object  # the @triton.jit function; its source is hashed into every table
    dims: tuple[str, ...]
    default_config: Callable[[Mapping[str, int], torch.dtype, bool], Config]
    candidates: Callable[[Mapping[str, int], torch.dtype], Iterable[Config]]
    problem: Callable[..., TuneProblem] | None = None
    space: ConfigSpace | None = None

    def check(self, config: Config, dtype: torch.dtype, dims: Mapping[str, int]) -> None:
        """Accept ``config`` for a table entry of ``dtype`` and (bucketed) ``dims`` only if it lies in the
        kernel's declared space and is one the tuner could have written there: it passes the kernel's
        ``keep`` rule, or it is the heuristic default for those dims (the tuner times the default too,
        and a default may be outside ``keep``, e.g. a tiny tile for a tiny problem).

        Raises:
            ValueError: why not (wrong tile names; a tile, ``num_warps`` or ``num_stages`` out of range
                or not a power of two; rejected by ``keep``).
        """
        default = self.default_config(dims, dtype, False)
        space = self.space or ConfigSpace(dict.fromkeys(default.meta, (1, _UNDECLARED_TILE_MAX)))
        if set(config.meta) != set(space.tiles):
            raise ValueError(f"tiles {_short(sorted(map(str, config.meta)))}, {self.name} has {sorted(space.tiles)}")
        for name, (lo, hi) in space.tiles.items():
            v = config.meta[name]
            if not (_is_pow2(v) and lo <= v <= hi):
                raise ValueError(f"{name}={_short(v)} is not a power of two in [{lo}, {hi}]")
        lo, hi = space.num_warps
        if not (_is_pow2(config.num_warps) and lo <= config.num_warps <= hi):
            raise ValueError(f"num_warps={_short(config.num_warps)} is not a power of two in [{lo}, {hi}]")
        lo, hi = space.num_stages
        if not (_is_int(config.num_stages) and lo <= config.num_stages <= hi):
            raise ValueError(f"num_stages={_short(config.num_stages)} is not in [{lo}, {hi}]")
        if space.keep is not None and not space.keep(config, dtype) and config != default:
            raise ValueError(f"{self.name}'s keep() rule rejects it for {str(dtype).removeprefix('torch.')} "
                             "and it is not the heuristic default")

    @functools.cached_property  # hashing the source once, not at every table load
    def source_hash(self) -> str:
        fn = self.kernel
        while hasattr(fn, "fn"):  # JITFunction / InterpretedFunction wrap the Python function
            fn = fn.fn
        src = inspect.getsource(fn)
        return hashlib.sha256(src.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TuneProblem:
    """One kernel at one shape, for the tuner.

    ``dims`` are the lookup dims (no tensors are allocated to know them, so ``--dry-run`` is free);
    ``setup()`` allocates the inputs and returns ``(run, reference)``: ``run(config)`` launches the
    kernel with ``config`` and returns its output(s), ``reference()`` the plain-torch result.
    ``exact`` asks for bit-equality (data movement) instead of the dtype's tolerance.
    """

    dims: Mapping[str, int]
    setup: Callable[[], tuple[Callable[[Config], object], Callable[[], object]]]
    exact: bool = False


_REGISTRY: dict[str, KernelSpec] = {}
# callables that register more specs, run once each when a name is asked for that is not registered yet: the
# registry is filled from below (``convzoo/__init__`` adds one that imports every kernel module), so this package
# never imports a kernel module itself
_LOADERS: list[Callable[[], None]] = []


def register(spec: KernelSpec) -> KernelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def add_loader(loader: Callable[[], None]) -> None:
    """Add ``loader``, run (once) the first time :func:`get_spec` is asked for a name not registered yet.

    Kernel modules register their specs when imported, and the ops import them lazily; a loader lets a lookup
    by name (``CONVZOO_CONFIG``, :func:`~convzoo.autotune.force_config`, the tools) see every kernel without this
    package importing the layer above it.
    """
    if loader not in _LOADERS:
        _LOADERS.append(loader)


def get_spec(name: str) -> KernelSpec:
    """The spec registered as ``name``; an unknown name first runs the pending loaders, so a typo is told apart
    from a kernel whose module is not imported yet.

    Raises:
        ValueError: no kernel has that name, after every loader ran.
    """
    while name not in _REGISTRY and _LOADERS:
        _LOADERS[0]()  # dropped only once it ran: a loader that raises (no Triton) raises again next time
        _LOADERS.pop(0)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; registered: {sorted(_REGISTRY)}") from None


def registered() -> dict[str, KernelSpec]:
    return dict(_REGISTRY)


def bucket(n: int) -> int:
    """The power of two at or above ``n`` (1 for ``n <= 1``)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def bucket_key(dtype: torch.dtype, dims: Mapping[str, int]) -> str:
    """The table key: dtype plus each dim bucketed to a power of two, in sorted name order."""
    parts = [str(dtype).removeprefix("torch.")]
    parts += [f"{k}={bucket(v)}" for k, v in sorted(dims.items())]
    return "|".join(parts)


def parse_key(key: str, dims: Iterable[str]) -> tuple[torch.dtype, dict[str, int]]:
    """The dtype and bucketed dims of a table key :func:`bucket_key` wrote for a kernel with lookup
    ``dims``: ``"float16|L=512|R=1024"`` → ``(torch.float16, {"L": 512, "R": 1024})``.

    Raises:
        ValueError: ``key`` is not such a key (unknown dtype, other dims, a dim not a power of two,
            not in the canonical form, which no lookup could ever match).
    """
    head, *parts = str(key).split("|")
    dtype = _DTYPES.get(head)
    if dtype is None:
        raise ValueError(f"key {_short(key)}: unknown dtype {_short(head)}")
    out = {}
    for part in parts:
        name, _, v = part.partition("=")
        if not (v.isascii() and v.isdigit() and len(v) <= 20):  # a bucket is below 2**64
            raise ValueError(f"key {_short(key)}: {_short(part)} is not name=size")
        out[name] = int(v)
    if set(out) != set(dims) or bucket_key(dtype, out) != key:
        raise ValueError(f"key {_short(key)} is not a table key of dims {sorted(dims)} (dtype|dim=2**k|... sorted)")
    return dtype, out
