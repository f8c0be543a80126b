"""``convzoo.sparsify`` / ``convzoo.desparsify``: swap a model's convolutions and linear layers for the masked
(or dynamic-sparse) ones in place, with an exact total kept count over the model (uniform, ER or ERK densities),
and back."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from convzoo import _compat, sparsity
from convzoo.layers.dynamic_sparse import DynamicSparseConv1d, DynamicSparseConv2d, DynamicSparseConv3d
from convzoo.layers.masked_conv import MaskedConv1d, MaskedConv2d, MaskedConv3d
from convzoo.layers.masked_linear import DynamicSparseLinear, MaskedLinear

__all__ = ["desparsify", "sparsify"]

DISTRIBUTIONS = ("erk", "er", "uniform")
KINDS = ("masked", "dynamic")
INITS = ("magnitude", "random")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYERS = {"conv+linear": (*_CONVS, nn.Linear), "conv": _CONVS, "linear": (nn.Linear,)}
_CLASSES = {
    "masked": {nn.Conv1d: MaskedConv1d, nn.Conv2d: MaskedConv2d, nn.Conv3d: MaskedConv3d, nn.Linear: MaskedLinear},
    "dynamic": {nn.Conv1d: DynamicSparseConv1d, nn.Conv2d: DynamicSparseConv2d, nn.Conv3d: DynamicSparseConv3d,
                nn.Linear: DynamicSparseLinear},
}


# ---------------------------------------------------------------------------------------------- densities
def _raw(shape: tuple[int, ...], distribution: str) -> float:
    """RigL's (Evci et al. 2020) unnormalised density of a weight ``[C_out, C_in/G, *kernel]`` (a linear's
    ``[out, in]``): ERK ``(C_in + C_out + Σk) / (C_in·C_out·∏k)``, ER ``(C_in + C_out) / (C_in·C_out)``."""
    n = math.prod(shape)
    if n == 0:
        return 0.0
    if distribution == "er":
        return (shape[0] + shape[1]) / (shape[0] * shape[1])
    return sum(shape) / n


def layer_densities(shapes: Sequence[tuple[int, ...]], density: float, distribution: str) -> list[float]:
    """The per-layer densities of :func:`sparsify` for weights of ``shapes``: ``density`` each (``'uniform'``), or
    ``ε·raw_i`` (``'er'``, ``'erk'``, raw as in RigL) with ``ε`` chosen so that ``Σ density_i·n_i = density·Σ n_i``;
    a layer whose density would exceed 1 is made dense and ``ε`` recomputed for the others, until none exceeds 1
    (``ε`` only grows as layers are made dense, so capping every exceeding layer at once gives RigL's result)."""
    n = [math.prod(s) for s in shapes]
    if distribution == "uniform":
        return [density] * len(shapes)
    raw = [_raw(tuple(s), distribution) for s in shapes]
    dense: set[int] = set()
    while True:
        rest = [i for i in range(len(n)) if i not in dense]
        divisor = sum(raw[i] * n[i] for i in rest)
        eps = (density * sum(n) - sum(n[i] for i in dense)) / divisor if divisor > 0 else 0.0
        over = [i for i in rest if raw[i] * eps > 1]
        if not over:
            break
        dense.update(over)
    return [1.0 if i in dense else min(max(raw[i] * eps, 0.0), 1.0) for i in range(len(n))]


def kept_counts(sizes: Sequence[int], densities: Sequence[float], total: int) -> list[int]:
    """Integer kept counts ``k_i ≤ sizes[i]`` summing to ``total``, each ``floor(density_i·n_i)`` or one more: the
    remainder goes to the layers with the largest fractional parts, equal ones in layer order (deterministic)."""
    target = [min(max(d * s, 0.0), s) for d, s in zip(densities, sizes)]
    k = [min(math.floor(t), s) for t, s in zip(target, sizes)]
    order = sorted(range(len(k)), key=lambda i: (-(target[i] - math.floor(target[i])), i))
    left = total - sum(k)
    while left > 0:  # (floating error can leave more than one round's worth: loop)
        moved = False
        for i in order:
            if left and k[i] < sizes[i]:
                k[i], left, moved = k[i] + 1, left - 1, True
        if not moved:
            break
    while left < 0:
        for i in reversed(order):
            if left and k[i] > 0:
                k[i], left = k[i] - 1, left + 1
    return k


# ---------------------------------------------------------------------------------------------- masks
def _random(shape, generator, device) -> torch.Tensor:
    dev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=dev).to(device)


def _top(scores: torch.Tensor, k: int, generator) -> torch.Tensor:
    """A bool tensor of ``scores``' shape keeping exactly its ``k`` highest entries (NaN highest: a NaN weight stays
    visible), equal scores in a random order from ``generator``."""
    flat = scores.flatten()
    dev = generator.device if generator is not None else flat.device
    perm = torch.randperm(flat.numel(), generator=generator, device=dev).to(flat.device)
    shuffled = flat[perm]
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if 2 * k <= flat.numel():  # (a partial selection: cheaper than a sort of the whole layer)
        return keep.index_fill_(0, perm[torch.topk(shuffled, k, sorted=False).indices], True).view(scores.shape)
    drop = perm[torch.topk(shuffled, flat.numel() - k, largest=False, sorted=False).indices]
    return keep.fill_(True).index_fill_(0, drop, False).view(scores.shape)


def _tile_count(shape, groups: int, block) -> int:
    bo, bk = block
    return groups * -(-(shape[0] // groups) // bo) * -(-math.prod(shape[1:]) // bk)


def _initial_mask(weight: torch.Tensor, k: int, groups: int, block, nm, init: str, generator) -> torch.Tensor:
    """The layer's first mask: ``k`` entries (``block``: ``k`` tiles; ``nm``: N of every M) of highest ``|weight|``
    (``init='magnitude'``) or at random."""
    w = weight.detach()
    if nm is not None:
        scores = w.abs() if init == "magnitude" else _random(w.shape, generator, w.device)
        return sparsity.nm_mask(scores.to(torch.promote_types(w.dtype, torch.float32)), nm, groups)
    if block is not None:
        if init == "magnitude":
            scores = sparsity._pooled(w.abs(), groups, block, "mean")  # [G, TO, TK]: mean |w| per tile
        else:
            grid = (groups, -(-(w.shape[0] // groups) // block[0]), -(-math.prod(w.shape[1:]) // block[1]))
            scores = _random(grid, generator, w.device)
        return sparsity._untiled(_top(scores, k, generator), tuple(w.shape), groups, block)
    scores = w.abs().to(torch.promote_types(w.dtype, torch.float32)) if init == "magnitude" else \
        _random(w.shape, generator, w.device)
    return _top(scores, k, generator)


# ---------------------------------------------------------------------------------------------- checks
def _choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _fork_rng(device: torch.device):
    """The constructors' random initialisation (discarded: the weights are the model's) leaves the global RNG of
    ``device`` (and the CPU's) as it was."""
    if device.type == "cuda":
        return torch.random.fork_rng(devices=[device.index if device.index is not None else 0])
    return torch.random.fork_rng(devices=[]) if device.type in ("cpu", "meta") else contextlib.nullcontext()


def _check_plain(name: str, m: nn.Module) -> None:
    w = m._parameters.get("weight")
    if not isinstance(w, nn.Parameter):
        raise ValueError(f"layer {name!r}: its weight is not a registered nn.Parameter (a parametrisation or "
                         f"pruning hook?); pass its name in exclude")
    if set(m._parameters) - {"weight", "bias"} or m._buffers or m._modules:
        raise ValueError(f"layer {name!r} holds parameters, buffers or submodules besides weight and bias, which "
                         f"the swap would drop; pass its name in exclude")


def _replace(model: nn.Module, swap: dict[int, nn.Module]) -> nn.Module:
    """Every reference to a swapped module (a module registered twice is replaced in both places); returns
    ``model``, or its replacement when ``model`` itself is swapped (then nothing else is touched)."""
    if id(model) in swap:
        return swap[id(model)]
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in swap:
                parent._modules[key] = swap[id(child)]
    return model


def _adopt(old: nn.Module, new: nn.Module, swap: dict[int, nn.Module]) -> None:
    """``new`` takes ``old``'s place (sparsify, desparsify): the same weight and bias ``nn.Parameter`` objects,
    its train / eval mode and its hooks; recorded in ``swap`` for :func:`_replace`."""
    new.weight = old.weight
    new.bias = old.bias
    new.train(old.training)
    _compat.move_module_hooks(old, new)
    swap[id(old)] = new


# ---------------------------------------------------------------------------------------------- sparsify
def _constructor_args(m: nn.Module) -> tuple:
    """The positional constructor arguments that rebuild ``m``'s configuration, for ``nn.Linear`` / ``nn.ConvNd``
    and for the masked layers built on them (which take the same ones first)."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features, m.bias is not None
    return (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
            m.bias is not None, m.padding_mode)


def sparsify(model: nn.Module, density: float = 0.1, *, distribution: str = "erk", layers: str = "conv+linear",
             exclude=("first", "last"), kind: str = "masked", block=None, nm=None, init: str = "magnitude",
             generator: torch.Generator | None = None, **layer_kwargs) -> nn.Module:
    """Swap, in place, every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` of ``model`` (as ``layers`` chooses) for its
    masked layer (``kind='masked'``: :class:`convzoo.MaskedConv2d`, :class:`convzoo.MaskedLinear`, ...) or its
    dynamic-sparse one (``'dynamic'``: :class:`convzoo.DynamicSparseConv2d`, :class:`convzoo.DynamicSparseLinear`,
    ..., which :class:`convzoo.PruneRegrowSchedule` then drives), with masks keeping exactly
    ``round(density · P)`` weights in total, ``P`` the number of weights of the swapped layers.

    Which layers: modules whose type is exactly ``nn.Conv1d/2d/3d`` / ``nn.Linear`` (subclasses — e.g.
    ``MultiheadAttention``'s ``out_proj``, lazy or parametrised modules, layers that are masked already — and
    ``nn.ConvTranspose*`` are left alone), in ``model.named_modules()`` order, minus ``exclude``: ``'first'`` /
    ``'last'`` (the first / last of those layers) and module names (that module and every layer inside it).

    Per-layer densities (``distribution``): ``'uniform'`` (``density`` each), or RigL's (Evci et al. 2020) ``'erk'``
    (density ∝ ``(C_in + C_out + Σk)/(C_in·C_out·∏k)``, ``C_in`` the weight's ``C_in/groups``, ``k`` the kernel
    sizes; a linear layer has no kernel terms) or ``'er'`` (∝ ``(C_in + C_out)/(C_in·C_out)``), scaled to the total;
    layers whose density would exceed 1 are made dense and the rest rescaled, until none does
    (:func:`layer_densities`). The layers' kept counts are those densities' ``density_i·n_i`` rounded so that they
    sum to exactly ``round(density · P)`` (the remainders to the largest fractional parts, equal ones in module
    order, :func:`kept_counts`).

    Structure: ``block=(BO, BK)``: masks of whole tiles (the layers get ``block``, so the kernels skip a dropped tile
    and ``prune_regrow`` keeps whole tiles). Counts are then in whole tiles per layer: a layer of ``n`` weights in
    ``T`` tiles (edge tiles partial) with exact count ``k`` above keeps ``round(k·T/n)`` tiles, so the total is
    ``round(density · P)`` rounded to whole tiles layer by layer (exact in tiles, not in weights; its fraction of
    visited tiles is its density in tiles). ``nm=(N, M)``: every layer an N:M mask, ``density`` must be ``N/M`` and
    ``distribution`` ``'uniform'`` (the structure fixes each layer's density; exact: ``N/M · P``).

    The masks start from the weights' magnitudes (``init='magnitude'``: each layer keeps its largest ``|w|``,
    ties in random order; with ``block`` the tiles of largest mean ``|w|``) or at random (``'random'``), drawn
    from ``generator`` (None: the global RNG). The global RNG is not otherwise touched.

    Kept: the parameters themselves (the same ``nn.Parameter`` objects, now zero where masked), so device, dtype,
    ``requires_grad`` and references to them stay; forward / backward / state-dict hooks (their handles still
    remove them); train / eval mode; a module registered in several places is one swapped module in all of them.
    Build the optimizer after ``sparsify`` (or before its first step): state it already holds for a weight (Adam's
    moments) would move the masked entries off zero. Other attributes set on a layer by hand are not carried.
    A swapped layer's ``reset_parameters`` draws a new random mask at its own density (per output channel; in
    whole tiles with ``block``). The weights must have values: sparsify a model after materialising it, not on
    the meta device.

    Args:
        model: the module to change in place (a bare layer is swapped too, but then only the return value is it).
        density: the kept fraction of the swapped layers' weights, a real number in [0, 1].
        distribution: ``'erk'``, ``'er'`` or ``'uniform'``.
        layers: ``'conv+linear'``, ``'conv'`` or ``'linear'``.
        exclude: a sequence of ``'first'``, ``'last'`` and module names (a single string is one entry).
        kind: ``'masked'`` or ``'dynamic'``.
        block: None, or ``(BO, BK)`` as the layers take it.
        nm: None, or ``(N, M)`` as the layers take it (not with ``block``).
        init: ``'magnitude'`` or ``'random'``.
        generator: a ``torch.Generator`` or None.
        layer_kwargs: passed to every new layer's constructor (``kind='dynamic'``: ``update_every``, ``score``,
            ``prune_fraction``, ``regrow``, ``prune_dims``, ...).

    Returns:
        ``model`` (the swapped layer when ``model`` itself is one).

    Raises:
        TypeError: ``model`` not an ``nn.Module``, ``density`` not a real number, ``exclude`` not a sequence of
            strings, ``generator`` not a ``torch.Generator``, ``layer_kwargs`` with ``kind='masked'`` or naming
            ``density``, ``block`` or ``nm``.
        ValueError: ``density`` outside [0, 1] or (with ``nm``) not N/M; an unknown ``distribution``, ``layers``,
            ``kind`` or ``init``; ``exclude`` naming no module of ``model``; ``block`` and ``nm`` both given, or
            ``nm`` with a distribution other than ``'uniform'``; a layer the constructor refuses (its error, with
            the layer's name: e.g. an N:M ``M`` not dividing its ``C_in/groups``), a layer whose weight is not a
            plain parameter or is on the meta device, a layer sharing a parameter with another module (tied weights);
            with ``block``, a layer whose share of the weights (> 0) rounds to no tile (named; nothing changed);
            no layer to swap.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    density = sparsity._check_density(density)
    _choice(distribution, "distribution", DISTRIBUTIONS)
    _choice(layers, "layers", LAYERS)
    _choice(kind, "kind", KINDS)
    _choice(init, "init", INITS)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    if not isinstance(exclude, Sequence) or not all(isinstance(e, str) for e in exclude):
        raise TypeError(f"exclude must be a sequence of strings ('first', 'last', module names), got {exclude!r}")
    if block is not None and nm is not None:
        raise ValueError(f"block and nm are exclusive: got block={block!r} and nm={nm!r}")
    if block is not None:
        block = sparsity._check_block(block)
    if nm is not None:
        n_, m_ = sparsity._check_nm(nm, 0)  # (M divides 0: the per-layer check is the constructor's)
        if distribution != "uniform":
            raise ValueError(f"distribution must be 'uniform' with nm={nm!r} (N:M fixes every layer's density), "
                             f"got {distribution!r}")
        if density != n_ / m_:
            raise ValueError(f"density must be N/M = {n_ / m_} with nm={nm!r}, got {density}")
    bad = sorted({"density", "block", "nm"} & set(layer_kwargs))
    if bad:
        raise TypeError(f"layer_kwargs must not name {bad}: pass them as sparsify's own arguments")
    if kind == "masked" and layer_kwargs:
        raise TypeError(f"layer_kwargs {sorted(layer_kwargs)} are for kind='dynamic' (the masked layers take none)")

    names = dict(model.named_modules())
    every = list(model.named_modules(remove_duplicate=False))  # (a module registered twice under both names)
    excluded_names = [e for e in exclude if e not in ("first", "last")]
    for e in excluded_names:
        if not any(name == e for name, _ in every):
            raise ValueError(f"exclude names no module of model: {e!r}")
    # by identity: a module excluded under one of its names is excluded
    excluded = {id(m) for name, m in every
                if any(name == e or e == "" or name.startswith(e + ".") for e in excluded_names)}
    found = [(name, m) for name, m in names.items() if type(m) in LAYERS[layers]]
    chosen = []
    for i, (name, m) in enumerate(found):
        if ("first" in exclude and i == 0) or ("last" in exclude and i == len(found) - 1) or id(m) in excluded:
            continue
        chosen.append((name, m))
    if not chosen:
        raise ValueError(f"model has no {layers} layer to sparsify (after exclude={tuple(exclude)!r})")
    # a parameter held by another module too (tied weights: an embedding and the output layer) would see the mask
    holders: dict[int, list[str]] = {}
    for holder_name, holder in names.items():
        for p in holder._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append(holder_name)
    for name, m in chosen:
        _check_plain(name, m)
        if m.weight.is_meta:
            raise ValueError(f"layer {name!r}: its weight is on the meta device (no values to rank, and a later "
                             f"to_empty would lose the masks): materialise the model first, then sparsify it")
        for p in (m.weight, m.bias):
            others = [h for h in holders.get(id(p), []) if h != name] if p is not None else []
            if others:
                raise ValueError(f"layer {name!r} shares a parameter with {others[0]!r} (tied weights): the mask "
                                 f"would change both; exclude it")

    # every new layer built (and every constructor check passed) before the model changes
    new = []
    for name, m in chosen:
        w = m.weight
        cls = _CLASSES[kind][type(m)]
        args = _constructor_args(m)
        try:
            with _fork_rng(w.device), torch.no_grad():
                layer = cls(*args, device=w.device, dtype=w.dtype, density=None if nm else 1.0, block=block, nm=nm,
                            **layer_kwargs)
        except (TypeError, ValueError) as e:
            raise type(e)(f"layer {name!r} ({type(m).__name__}): {e}") from e
        new.append(layer)

    shapes = [tuple(m.weight.shape) for _, m in chosen]
    sizes = [math.prod(s) for s in shapes]
    if nm is None:
        counts = kept_counts(sizes, layer_densities(shapes, density, distribution), round(density * sum(sizes)))
    else:
        counts = [None] * len(chosen)
    if block is not None:  # whole tiles: each layer's exact count rounded to its tiles (checked before any change)
        tiles = [_tile_count(m.weight.shape, getattr(m, "groups", 1), block) for _, m in chosen]
        exact, counts = counts, [round(k * t / n) if n else 0 for k, t, n in zip(counts, tiles, sizes)]
        for (name, m), k, e, t in zip(chosen, counts, exact, tiles):
            if e > 0 and k == 0:  # a layer with weights to keep would lose them all: its output a constant
                raise ValueError(f"layer {name!r} ({type(m).__name__}): its share of density={density:g} is {e} "
                                 f"weights, which rounds to 0 of its {t} tiles of block={block}: use a smaller "
                                 f"block, a larger density, or exclude the layer")
    swap = {}
    for i, ((_, m), layer, k, size) in enumerate(zip(chosen, new, counts, sizes)):
        groups = getattr(m, "groups", 1)
        if block is not None:
            layer._mask_density = k / tiles[i] if tiles[i] else 1.0
        elif nm is None:
            layer._mask_density = k / size if size else 1.0
        # (the construction's rule, which reset_parameters draws a new mask by: the layer's own density, in whole
        # tiles with block, exact per output channel without)
        mask = _initial_mask(m.weight, k, groups, block, nm, init, generator)
        _adopt(m, layer, swap)
        layer.set_mask(mask)  # zeroes the (shared) weight where the mask is off
    return _replace(model, swap)


def desparsify(model: nn.Module) -> nn.Module:
    """Swap, in place, every masked or dynamic-sparse layer of ``model`` (``MaskedConv1d/2d/3d``,
    ``DynamicSparseConv1d/2d/3d``, ``MaskedLinear``, ``DynamicSparseLinear``) back to its ``nn.Conv1d/2d/3d`` /
    ``nn.Linear`` with the masked weight: the same ``nn.Parameter`` objects, set to zero where the mask is off (so
    the dense layer computes what the masked one did), hooks and train / eval mode kept. The mask and any
    statistics are dropped. Subclasses of those (which may add parameters, modules or their own ``forward``) are
    left alone, as :func:`sparsify` leaves subclasses of the dense layers.

    Returns:
        ``model`` (the dense layer when ``model`` itself is a masked one).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    swap = {}
    known = {c for kinds in _CLASSES.values() for c in kinds.values()}
    for m in model.modules():
        if type(m) not in known or id(m) in swap:  # (a subclass may add modules or its own forward: left alone)
            continue
        dense_cls = m._dense_class()
        args = _constructor_args(m)
        dense = dense_cls(*args, device="meta", dtype=m.weight.dtype)  # (no values: its parameters are m's)
        with torch.no_grad():
            m.weight.masked_fill_(~m.mask, 0)
        _adopt(m, dense, swap)
    return _replace(model, swap)
