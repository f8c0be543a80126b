"""Tile configs, the per-kernel registry, and the bucketing of dims into table keys."""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["Config", "KernelSpec", "TuneProblem", "bucket", "bucket_key", "get_spec", "register", "registered"]


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
    def from_json(cls, d: Mapping) -> Config:
        meta = d["meta"]
        if not isinstance(meta, Mapping) or not all(isinstance(v, int) for v in meta.values()):
            raise ValueError(f"bad config meta {meta!r}")
        return cls(dict(meta), int(d["num_warps"]), int(d["num_stages"]))

    def launch_kwargs(self) -> dict:
        return {**self.meta, "num_warps": self.num_warps, "num_stages": self.num_stages}


@dataclass(frozen=True)
class KernelSpec:
    """What the autotuner knows of one kernel.

    ``default_config(dims, dtype, interpret)`` is the readable heuristic; ``candidates(dims, dtype)``
    yields the configs the tuner may try (already filtered by the kernel's validity check);
    ``dims`` names the size arguments that ``lookup`` is called with (bucketed into table keys);
    ``problem(layer, dtype, device)`` builds the tuner's :class:`TuneProblem` for one grid layer.
    """

    name: str
    kernel: object  # the @triton.jit function; its source is hashed into every table
    dims: tuple[str, ...]
    default_config: Callable[[Mapping[str, int], torch.dtype, bool], Config]
    candidates: Callable[[Mapping[str, int], torch.dtype], Iterable[Config]]
    problem: Callable[..., TuneProblem] | None = None

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


def register(spec: KernelSpec) -> KernelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> KernelSpec:
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
