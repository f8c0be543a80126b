"""Weight masks for masked (sparse) convolution, seen through the kernel's tiling.

A convolution weight ``[C_out, C_in/G, *kernel]`` is, per group ``g``, the matrix ``W_g`` of shape
``[C_out/G, K]`` with ``K = C_in/G·∏kernel``: row ``o`` of group ``g`` is output channel ``g·C_out/G + o``, its
columns in *tap-major* order, column ``k = t·C_in/G + c`` for kernel tap ``t`` (row-major over the kernel dims)
and input channel ``c`` of the group (``weight[o].movedim(0, -1).flatten()``, the channels-last im2col order).
Tap-major makes a ``BK``-wide k-tile one tap of ``BK`` channels whenever ``BK`` divides ``C_in/G``, so the
forward's ``BO × BK`` tiles are also the grad-input's (``BO`` output × ``BK`` input channels at one tap) and
one block mask makes both skip the same tiles. The masked-conv kernels cut ``W_g`` into ``BO × BK`` tiles and
never visit a tile whose mask is all zero. This module builds the tile lists they iterate over
(:func:`tile_lists`), turns an element mask or per-weight scores into a mask whose zeros fill whole tiles
(:func:`block_mask`, the only kind of sparsity the kernels can turn into speed) and draws random masks with an
exact density per output channel (:func:`random_mask`).

Everything here is vectorised torch on the mask's device without host synchronisation (no ``.item()``,
``nonzero()`` or Python loop over tiles), so it can run inside a training step and on meta tensors; the one
exception is the 0/1 check of a *floating* mask, which reads values (a bool mask skips it).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from convzoo._shapes import _is_int, check

__all__ = ["PruneRegrow", "TileLists", "block_mask", "nm_mask", "prune_regrow", "random_mask", "tile_fraction",
           "tile_lists", "weight_matrix"]

MIN_BLOCK = 16  # tl.dot needs every tile dim ≥ 16; tl.arange needs powers of two


@dataclass(frozen=True, eq=False)
class TileLists:
    """Which ``BO × BK`` tiles of each group's weight matrix ``W_g [C_out/G, K]`` hold a nonzero mask entry,
    as dense-padded lists the kernels loop over. ``TO = cdiv(C_out/G, BO)``, ``TK = cdiv(K, BK)``; partial
    tiles at the bottom / right edge are tiles like the others.

    Attributes:
        occupancy: bool ``[G, TO, TK]``: tile ``(to, tk)`` of group ``g`` has at least one nonzero mask entry.
        count: int32 ``[G, TO]``: the number of non-empty k-tiles in o-tile row ``to`` (forward, grad-weight).
        index: int32 ``[G, TO, TK]``: per o-tile row a permutation of ``range(TK)``: first its ``count``
            non-empty k-tiles in ascending order, then (the padding) its empty k-tiles, also ascending. Every
            entry is thus a valid tile index, and a kernel that reads past ``count`` only reaches all-zero
            tiles (no double counting, unlike a padding with a fixed index such as 0 or TK-1).
        t_count: int32 ``[G, TC]``: the grad-input's lists, ``TC = cdiv(C_in/G, BK)``: per channel tile ``tc``
            (input channels ``tc·BK ..``, ``BK`` of them), the number of non-empty ``(tap, o-tile)`` pairs, a
            pair being the ``BO × BK`` block ``mask[o-tile, c-tile, tap]``.
        t_index: int32 ``[G, TC, KT·TO]``: those pairs as ``e = t·TO + to`` (``KT = ∏kernel``), same convention
            (non-empty ascending, then the empty ones ascending). Where ``BK`` divides ``C_in/G`` a pair's
            block is exactly the forward tile ``(to, (t·C_in/G)/BK + tc)``: both passes skip the same tiles;
            otherwise a k-tile spans two taps and the grad-input skips what is empty in its own tiling.
        block: ``(BO, BK)``.
        groups: ``G``.
        shape: the shape of the mask the lists were built from, ``(C_out, C_in/G, *kernel)``.
    """

    occupancy: torch.Tensor
    count: torch.Tensor
    index: torch.Tensor
    t_count: torch.Tensor
    t_index: torch.Tensor
    block: tuple[int, int]
    groups: int
    shape: tuple[int, ...]


# ---------------------------------------------------------------------------------------------- checks
def _check_block(block) -> tuple[int, int]:
    """``block`` as ``(BO, BK)`` Python ints, each a power of two ≥ 16.

    Raises:
        TypeError: ``block`` is not a pair of ints (bools refused).
        ValueError: an entry is not a power of two ≥ 16, or ``block`` does not have two entries.
    """
    check(isinstance(block, Sequence) and not isinstance(block, str) and all(_is_int(b) for b in block),
          lambda: f"block must be a pair of ints (BO, BK), got {block!r}", TypeError)
    check(len(block) == 2, lambda: f"block must have two entries (BO, BK), got {tuple(block)}")
    bo, bk = (int(b) for b in block)
    check(all(b >= MIN_BLOCK and b & (b - 1) == 0 for b in (bo, bk)),
          lambda: f"block entries must be powers of two ≥ {MIN_BLOCK} (the kernels' tile sizes), got {(bo, bk)}")
    return bo, bk


def _check_weight_shaped(t, name: str, groups) -> int:
    """Checks ``t`` has a conv weight's shape ``[C_out, C_in/G, *kernel]`` (0-3 kernel dims: a 2-d
    ``[out_features, in_features]`` is a linear layer's weight, a 1-tap convolution's) with ``groups`` dividing
    ``C_out``; returns ``groups`` as an int.

    Raises:
        TypeError: ``t`` is not a tensor; ``groups`` is not an int (bools refused).
        ValueError: ``t`` is not 2-5-d; ``groups`` is not positive or does not divide ``C_out``.
    """
    check(isinstance(t, torch.Tensor), lambda: f"{name} must be a tensor, got {type(t).__name__}", TypeError)
    check(2 <= t.dim() <= 5, lambda: f"{name} must have a conv weight's shape [C_out, C_in/groups, *kernel] with "
          f"0-3 kernel dims (2-d: a linear layer's), got shape {tuple(t.shape)}")
    check(_is_int(groups), lambda: f"groups must be an int, got {groups!r}", TypeError)
    groups = int(groups)
    check(groups > 0, lambda: f"groups must be positive, got {groups}")
    check(t.shape[0] % groups == 0,
          lambda: f"groups={groups} must divide C_out = {name}.shape[0] = {t.shape[0]}")
    return groups


def _check_zero_one(mask: torch.Tensor, name: str) -> None:
    """A floating mask must hold only 0 and 1 (NaN refused). This reads values: one host sync (none for a meta
    tensor, which has no values to read).

    Raises:
        ValueError: an entry is neither 0 nor 1.
    """
    if mask.device.type == "meta":
        return
    bad = ~((mask == 0) | (mask == 1))
    check(not bool(bad.any()), lambda: f"{name} must hold only 0 and 1 (a floating mask), "
          f"found {int(bad.sum())} other entries (e.g. {mask[bad][0].item()!r})")


def _as_bool_mask(mask, name: str) -> torch.Tensor:
    """``mask`` (bool, or floating 0/1) as a bool tensor.

    Raises:
        TypeError: ``mask`` is neither bool nor floating.
        ValueError: a floating ``mask`` holds a value other than 0 and 1.
    """
    if mask.dtype == torch.bool:
        return mask
    check(mask.is_floating_point(), lambda: f"{name} must be bool or floating 0/1, got dtype {mask.dtype}",
          TypeError)
    _check_zero_one(mask, name)
    return mask != 0


def _check_density(density, name: str = "density") -> float:
    """``density`` as a float in ``[0, 1]``.

    Raises:
        TypeError: ``density`` is not a real Python number (bools and tensors refused).
        ValueError: ``density`` is NaN or outside ``[0, 1]``.
    """
    check(isinstance(density, numbers.Real) and not isinstance(density, bool),
          lambda: f"{name} must be a real number in [0, 1], got {density!r}", TypeError)
    density = float(density)
    check(0.0 <= density <= 1.0, lambda: f"{name} must be in [0, 1], got {density}")  # NaN fails too
    return density


# ---------------------------------------------------------------------------------------------- tiling
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def weight_matrix(t: torch.Tensor, groups: int) -> torch.Tensor:
    """A weight-shaped ``t`` ``[C_out, C_in/G, *kernel]`` as the per-group matrices ``[G, C_out/G, K]``, columns
    tap-major (``k = t·C_in/G + c``; a copy unless the kernel is 1 × 1 or ``t`` is channels-last already)."""
    return t.movedim(1, -1).reshape(groups, t.shape[0] // groups, math.prod(t.shape[1:]))


def weight_from_matrix(w: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The inverse of :func:`weight_matrix`: ``[G, C_out/G, K]`` back to ``shape`` ``[C_out, C_in/G, *kernel]``."""
    return w.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def _tiled(t: torch.Tensor, groups: int, block: tuple[int, int]) -> torch.Tensor:
    """``t`` (weight-shaped) as ``[G, TO, BO, TK, BK]`` tiles of :func:`weight_matrix`, the partial edge tiles
    zero-padded (a copy)."""
    bo, bk = block
    og, k = t.shape[0] // groups, math.prod(t.shape[1:])
    to, tk = _cdiv(og, bo), _cdiv(k, bk)
    w = F.pad(weight_matrix(t, groups), (0, tk * bk - k, 0, to * bo - og))
    return w.view(groups, to, bo, tk, bk)


def _untiled(keep: torch.Tensor, shape: tuple, groups: int, block: tuple[int, int]) -> torch.Tensor:
    """The tile map ``keep [G, TO, TK]`` expanded to every element of a weight of ``shape`` (edges cropped)."""
    bo, bk = block
    g, to, tk = keep.shape
    og, k = shape[0] // groups, math.prod(shape[1:])
    full = keep[:, :, None, :, None].expand(g, to, bo, tk, bk).reshape(g, to * bo, tk * bk)
    return weight_from_matrix(full[:, :og, :k], tuple(shape)).contiguous()


def _input_occupancy(m: torch.Tensor, groups: int, block: tuple[int, int]) -> torch.Tensor:
    """The grad-input's tile map of a bool mask: ``[G, TC, KT, TO]``, True where the ``BO × BK`` block
    ``(o-tile, c-tile)`` at tap ``t`` holds a kept entry."""
    bo, bk = block
    og, cg, kt = m.shape[0] // groups, m.shape[1], math.prod(m.shape[2:])
    to, tc = _cdiv(og, bo), _cdiv(cg, bk)
    w = F.pad(m.reshape(groups, og, cg, kt), (0, 0, 0, tc * bk - cg, 0, to * bo - og))
    return w.view(groups, to, bo, tc, bk, kt).any(dim=4).any(dim=2).permute(0, 2, 3, 1)


def _lists(occupancy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``occupancy [..., n]``: its count of True, and ``range(n)`` reordered True-first (each part
    ascending). A stable sort of ``~occupancy`` is exactly that, with no host sync."""
    count = occupancy.sum(-1, dtype=torch.int32)
    order = torch.argsort((~occupancy).to(torch.uint8), dim=-1, stable=True)
    return count, order.to(torch.int32)


def tile_lists(mask: torch.Tensor, groups: int = 1, block: Sequence[int] = (32, 32)) -> TileLists:
    """The tile-occupancy map of a conv weight mask and the lists of non-empty tiles the kernels iterate over.

    Built on ``mask``'s device with vectorised torch ops and no host synchronisation for a bool mask (a
    floating mask costs one, for its 0/1 check), so it can be rebuilt inside a training step when the mask
    changes; on a meta tensor it gives meta tensors of the right shapes. See :class:`TileLists` for the
    layout and the padding convention of ``index`` / ``t_index``.

    Args:
        mask: bool or floating 0/1 tensor of the conv weight's shape ``[C_out, C_in/G, *kernel]`` (0-3 kernel
            dims; 2-d: a linear layer's ``[out, in]``); an entry is kept iff it is nonzero.
        groups: ``G``, the convolution's groups; must divide ``C_out``.
        block: ``(BO, BK)``, the kernels' tile sizes along ``C_out/G`` and ``K``, powers of two ≥ 16 (the
            kernels' ``tl.arange`` and ``tl.dot`` tiles).

    Returns:
        A :class:`TileLists` on ``mask``'s device.

    Raises:
        TypeError: ``mask`` is not a tensor or is neither bool nor floating; ``groups`` is not an int; ``block``
            is not a pair of ints.
        ValueError: ``mask`` is not 2-5-d, or (floating) holds a value other than 0 and 1; ``groups`` is not
            positive or does not divide ``C_out``; a ``block`` entry is not a power of two ≥ 16.
    """
    groups = _check_weight_shaped(mask, "mask", groups)
    block = _check_block(block)
    m = _as_bool_mask(mask, "mask")
    occupancy = _tiled(m, groups, block).any(dim=4).any(dim=2)
    count, index = _lists(occupancy)
    t_count, t_index = _lists(_input_occupancy(m, groups, block).flatten(2))
    return TileLists(occupancy=occupancy, count=count, index=index, t_count=t_count, t_index=t_index,
                     block=block, groups=groups, shape=tuple(mask.shape))


def tile_fraction(lists: TileLists) -> torch.Tensor:
    """The fraction of tiles the kernels visit with ``lists`` (listed tiles / all tiles), a 0-d float tensor on
    the lists' device (no host sync; ``float(...)`` it to read it)."""
    return lists.count.sum(dtype=torch.float64) / max(lists.occupancy.numel(), 1)


# ---------------------------------------------------------------------------------------------- block masks
def block_mask(mask_or_scores: torch.Tensor, block: Sequence[int] = (32, 32), density: float | None = None,
               groups: int = 1) -> torch.Tensor:
    """A bool mask of the same shape whose zeros fill whole ``BO × BK`` tiles of each group's weight matrix
    ``W_g [C_out/G, K]`` (the tiling of :func:`tile_lists`), so that the masked-conv kernels skip them.

    Each tile gets a score: its number of kept entries for a mask, the sum of ``|score|`` over it for scores.
    A tile is kept iff its score is nonzero and, when ``density`` is given, it is among the
    ``round(density · T)`` highest-scoring tiles, ``T = G·TO·TK`` counted over all groups together (one global
    ranking, so groups may end up with different shares); equal scores are ranked by flat tile index
    ``(g, to, tk)``, lowest first. Every entry of a kept tile is kept, also those the input had at zero (so the
    result contains the input mask's tile-structured part, and, with ``density=None``, the whole input mask);
    every entry of a dropped tile is zero. ``round`` is Python's (half to even). NaN scores rank above every
    number (``torch.sort``'s order) and their tiles are kept: NaN weights stay visible, never hidden.

    The kept-tile count is exactly ``round(density · T)`` for scores whose tiles are all nonzero, at most that
    otherwise (an all-zero tile is never kept: it would cost time and revive pruned weights). A 0/1 floating
    input with ``density`` is ranked as scores, which gives the same result as its bool version.

    Accuracy for speed: the kernels only skip tiles that are *entirely* zero. An unstructured mask of density
    ``d`` leaves a ``BO × BK`` tile empty with probability ``(1 - d)^(BO·BK)``: at 10% density and 32 × 32
    tiles that is ``0.9^1024 ≈ 1.4e-47``, so an unstructured 10% mask runs at dense speed. A block mask of the
    same density skips 90% of the tiles (≈10× less weight traffic and MMA work) but constrains which weights
    may be nonzero, which usually costs some accuracy at the same parameter count; this function is the
    projection onto that constraint (keep the most important tiles whole).

    Args:
        mask_or_scores: a conv weight-shaped ``[C_out, C_in/G, *kernel]`` (0-3 kernel dims) bool mask, or a
            floating tensor: with ``density=None`` a 0/1 mask, with ``density`` per-weight scores (any real
            values, e.g. ``weight`` itself for magnitude pruning).
        block: ``(BO, BK)``, powers of two ≥ 16, as in :func:`tile_lists`.
        density: the fraction of tiles to keep, a real number in ``[0, 1]``; ``None`` keeps every tile with a
            kept entry (mask input only).
        groups: the convolution's groups, dividing ``C_out``.

    Returns:
        A bool tensor of ``mask_or_scores``' shape on its device.

    Raises:
        TypeError: ``mask_or_scores`` is not a tensor or is neither bool nor floating; ``block`` is not a pair
            of ints; ``density`` is not ``None`` or a real number (bools refused); ``groups`` is not an int.
        ValueError: ``mask_or_scores`` is not 2-5-d, or is floating with values other than 0/1 and no
            ``density``; ``density`` is NaN or outside ``[0, 1]``; ``groups`` is not positive or does not
            divide ``C_out``; a ``block`` entry is not a power of two ≥ 16.
    """
    x = mask_or_scores
    groups = _check_weight_shaped(x, "mask_or_scores", groups)
    block = _check_block(block)
    if density is not None:
        density = _check_density(density)
    if x.dtype == torch.bool:
        score = _tiled(x, groups, block).sum(dim=(2, 4))  # int64 counts of kept entries
    else:
        check(x.is_floating_point(), lambda: f"mask_or_scores must be bool or floating, got dtype {x.dtype}",
              TypeError)
        if density is None:
            _check_zero_one(x, "mask_or_scores (floating, with density=None: a 0/1 mask; pass density= to rank "
                               "scores)")
        # half-precision sums of many |w| lose digits (or overflow): rank in at least fp32
        acc = torch.promote_types(x.dtype, torch.float32)
        score = _tiled(x.abs().to(acc), groups, block).sum(dim=(2, 4))
    keep = score != 0  # NaN != 0: kept
    if density is not None:
        flat = score.flatten()
        k = round(density * flat.numel())
        # stable descending sort: equal scores keep flat-index order, lowest first
        order = torch.sort(flat, descending=True, stable=True).indices
        top = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, order[:k], True)
        keep = keep & top.view_as(score)
    return _untiled(keep, tuple(x.shape), groups, block)


# ---------------------------------------------------------------------------------------------- N:M masks
def _check_nm(nm, cg: int) -> tuple[int, int]:
    """``nm`` as ``(N, M)`` Python ints, ``0 ≤ N ≤ M``, ``M`` dividing ``C_in/groups`` (``cg``) so that every group
    of ``M`` consecutive reduction entries is ``M`` channels of one tap.

    Raises:
        TypeError: ``nm`` is not a pair of ints (bools refused).
        ValueError: not two entries, ``M < 1``, ``N`` outside ``[0, M]``, or ``M`` not dividing ``cg``.
    """
    check(isinstance(nm, Sequence) and not isinstance(nm, str) and all(_is_int(v) for v in nm),
          lambda: f"nm must be a pair of ints (N, M), got {nm!r}", TypeError)
    check(len(nm) == 2, lambda: f"nm must have two entries (N, M), got {tuple(nm)}")
    n, m = (int(v) for v in nm)
    check(m >= 1 and 0 <= n <= m, lambda: f"nm must be (N, M) with 0 <= N <= M and M >= 1, got {(n, m)}")
    check(cg % m == 0, lambda: f"nm=({n}, {m}): M must divide C_in/groups = {cg} (each group of M consecutive "
          f"reduction entries is M input channels of one tap)")
    return n, m


def nm_mask(scores: torch.Tensor, nm: Sequence[int] = (2, 4), groups: int = 1) -> torch.Tensor:
    """An N:M mask: in each group of ``M`` consecutive entries of the reduction dim (``M`` input channels of one
    tap: columns ``k = t·C_in/G + c`` of each group's weight matrix :func:`weight_matrix`, ``c`` from a multiple of
    ``M``), the ``N`` entries of highest ``|scores|`` are kept (equal ones by position, lowest first; NaN counts
    as highest). Density ``N/M`` exactly, per output channel and per group. ``scores=torch.rand(...)`` draws a
    random N:M mask, ``scores=weight`` prunes by magnitude. Vectorised, no host sync.

    Raises:
        TypeError: ``scores`` not a floating tensor; ``nm`` not a pair of ints; ``groups`` not an int.
        ValueError: ``scores`` not a conv weight's shape; ``nm`` out of range or ``M`` not dividing
            ``C_in/groups``; ``groups`` not dividing ``C_out``.
    """
    groups = _check_weight_shaped(scores, "scores", groups)
    check(scores.is_floating_point(), lambda: f"scores must be floating, got dtype {scores.dtype}", TypeError)
    n, m = _check_nm(nm, scores.shape[1])
    s = weight_matrix(scores.abs(), groups)
    order = torch.sort(s.reshape(-1, m), dim=1, descending=True, stable=True).indices
    keep = torch.zeros(order.shape, dtype=torch.bool, device=scores.device).scatter_(1, order[:, :n], True)
    return weight_from_matrix(keep.view(s.shape), tuple(scores.shape)).contiguous()


# ---------------------------------------------------------------------------------------------- random masks
def random_mask(shape: Sequence[int], density: float, *, generator: torch.Generator | None = None,
                device: torch.device | str | None = None, dims: Sequence[int] = (0,)) -> torch.Tensor:
    """A bool mask of ``shape`` with exactly ``round(density · n)`` kept entries in every slice along ``dims``,
    chosen uniformly without replacement, independently per slice.

    A slice is one index into the ``dims`` (by default ``dims=(0,)``: one output channel ``weight[o]`` of a
    conv weight), ``n`` the number of entries in it (the product of the other dims); ``dims=()`` counts over
    the whole tensor. ``round`` is Python's (half to even). Drawn as ``torch.rand(...).argsort()`` on the
    device, no host sync; the same ``generator`` state gives the same mask.

    Args:
        shape: the mask's shape, a sequence of non-negative ints.
        density: the kept fraction per slice, a real number in ``[0, 1]``.
        generator: the random source (``torch.Generator``); ``None`` uses the global one.
        device: where to build the mask; ``None``: the generator's device, else the default device.
        dims: the dims that index the slices, distinct ints in ``[-len(shape), len(shape))``.

    Returns:
        A contiguous bool tensor of ``shape``.

    Raises:
        TypeError: ``shape`` or ``dims`` is not a sequence of ints (bools refused); ``density`` is not a real
            number; ``generator`` is not a ``torch.Generator``.
        ValueError: a negative size in ``shape``; ``density`` NaN or outside ``[0, 1]``; a ``dims`` entry out
            of range or repeated.
    """
    check(isinstance(shape, Sequence) and not isinstance(shape, str) and all(_is_int(s) for s in shape),
          lambda: f"shape must be a sequence of ints, got {shape!r}", TypeError)
    shape = tuple(int(s) for s in shape)
    check(all(s >= 0 for s in shape), lambda: f"shape must be non-negative, got {shape}")
    density = _check_density(density)
    check(generator is None or isinstance(generator, torch.Generator),
          lambda: f"generator must be a torch.Generator or None, got {type(generator).__name__}", TypeError)
    check(isinstance(dims, Sequence) and not isinstance(dims, str) and all(_is_int(d) for d in dims),
          lambda: f"dims must be a sequence of ints, got {dims!r}", TypeError)
    nd = len(shape)
    check(all(-nd <= d < nd for d in dims), lambda: f"dims must be in [{-nd}, {nd}) for shape {shape}, got {dims}")
    dims = tuple(int(d) % nd for d in dims)
    check(len(set(dims)) == len(dims), lambda: f"dims must be distinct, got {dims}")
    if device is None and generator is not None:
        device = generator.device
    rest = tuple(d for d in range(nd) if d not in dims)
    slices, n = math.prod(shape[d] for d in dims), math.prod(shape[d] for d in rest)
    k = round(density * n)
    # a uniform random permutation per slice; its first k positions are the kept entries
    order = torch.rand(slices, n, generator=generator, device=device).argsort(dim=1, stable=True)
    flat = torch.zeros(slices, n, dtype=torch.bool, device=order.device).scatter_(1, order[:, :k], True)
    perm = dims + rest
    inverse = sorted(range(nd), key=perm.__getitem__)
    return flat.view([shape[d] for d in perm]).permute(inverse).contiguous()


# ---------------------------------------------------------------------------------------------- prune / regrow
@dataclass(frozen=True, eq=False)
class PruneRegrow:
    """The result of :func:`prune_regrow`: bool tensors of the mask's shape.

    Attributes:
        mask: the new mask, ``(mask & ~pruned) | regrown``; per slice exactly as many kept entries as before.
        pruned: the entries kept before and dropped now.
        regrown: the entries dropped before (or, with ``regrow_pruned=True``, just pruned) and kept now.
    """

    mask: torch.Tensor
    pruned: torch.Tensor
    regrown: torch.Tensor


def _check_dims(dims, nd: int) -> tuple[int, ...]:
    check(isinstance(dims, Sequence) and not isinstance(dims, str) and all([_is_int(d) for d in dims]),
          lambda: f"dims must be a sequence of ints, got {dims!r}", TypeError)
    check(all([-nd <= d < nd for d in dims]), lambda: f"dims must be in [{-nd}, {nd}) for a {nd}-d mask, got {dims}")
    out = tuple([int(d) % nd for d in dims])
    check(len(set(out)) == len(out), lambda: f"dims must be distinct, got {dims}")
    return out


def _check_score(t, name: str, mask: torch.Tensor) -> None:
    check(isinstance(t, torch.Tensor) and t.is_floating_point(),
          lambda: f"{name} must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}", TypeError)
    check(t.shape == mask.shape, lambda: f"{name} must have the mask's shape {tuple(mask.shape)}, got "
          f"{tuple(t.shape)}")
    check(t.device == mask.device, lambda: f"{name} is on {t.device} but mask is on {mask.device}")


def _rank(first: torch.Tensor, key: torch.Tensor, descending: bool, shuffle: torch.Tensor | None) -> torch.Tensor:
    """Per row of ``[S, n]``: each entry's position in the order "``first`` entries before the others, then by
    ``key`` (ascending or descending), then by index" (two stable sorts, no host sync); with ``shuffle`` (a
    permutation of each row), ties of ``key`` come in ``shuffle``'s order instead of by index (a gather first)."""
    if shuffle is None:
        order = torch.sort(key, dim=1, descending=descending, stable=True).indices
    else:
        order = shuffle.gather(1, torch.sort(key.gather(1, shuffle), dim=1, descending=descending,
                                             stable=True).indices)
    order = order.gather(1, torch.sort((~first.gather(1, order)).to(torch.uint8), dim=1, stable=True).indices)
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))


POOLS = ("mean", "sum")


def _pooled(t: torch.Tensor, groups: int, block: tuple[int, int], how: str) -> torch.Tensor:
    """A weight-shaped score pooled per ``block`` tile: ``[G, TO, TK]``, the sum (``'sum'``) or the mean over the
    tile's entries inside the matrix (``'mean'``: a partial edge tile is not penalised for its padding), in at
    least fp32. A NaN anywhere in a tile makes its score NaN."""
    acc = torch.promote_types(t.dtype, torch.float32)
    total = _tiled(t.to(acc), groups, block).sum(dim=(2, 4))
    if how == "sum":
        return total
    return total / _tiled(torch.ones(t.shape, dtype=acc, device=t.device), groups, block).sum(dim=(2, 4))


def _check_pool(pool) -> tuple[str, str]:
    pools = (pool, pool) if isinstance(pool, str) else pool
    check(isinstance(pools, Sequence) and len(pools) == 2 and all(isinstance(p, str) and p in POOLS for p in pools),
          lambda: f"pool must be one of {POOLS} or a pair of them (prune, regrow), got {pool!r}")
    return tuple(pools)


def _block_prune_regrow(mask, prune_score, regrow_score, fraction, dims, regrow_pruned, ties, generator, block,
                        groups, pool, count=None) -> PruneRegrow:
    """:func:`prune_regrow` on whole ``block`` tiles: the same step on the tile map, expanded back."""
    groups = _check_weight_shaped(mask, "mask", groups)
    block = _check_block(block)
    check(dims in ((), (0,)), lambda: f"dims must be (0,) (per row of tiles) or () (all tiles) with block, got "
          f"{dims}")
    pools = _check_pool(pool)
    kept = _tiled(mask, groups, block).any(dim=4).any(dim=2)  # [G, TO, TK]
    out = prune_regrow(kept, _pooled(prune_score, groups, block, pools[0]),
                       _pooled(regrow_score, groups, block, pools[1]), fraction, dims=(0, 1) if dims else (),
                       regrow_pruned=regrow_pruned, ties=ties, generator=generator, count=count)
    shape = tuple(mask.shape)
    new = _untiled(out.mask, shape, groups, block)
    gone = _untiled(out.pruned, shape, groups, block)
    # a kept tile is kept whole: its entries the old mask had off are regrown (re-initialised) too
    return PruneRegrow(mask=new, pruned=mask & gone, regrown=new & (~mask | gone))


def _nm_prune_regrow(mask, prune_score, regrow_score, fraction, dims, regrow_pruned, ties, generator, nm,
                     groups) -> PruneRegrow:
    """:func:`prune_regrow` that keeps every N:M group's count: only a group's ``M - N`` weakest kept entries may
    go (so its candidates can replace them), the slice's weakest of those go, each group regrows as many."""
    groups = _check_weight_shaped(mask, "mask", groups)
    _, m = _check_nm(nm, mask.shape[1])
    check(dims in ((), (0,)), lambda: f"dims must be (0,) (per output channel) or () with nm, got {dims}")
    low = torch.tensor(float("-inf"), device=mask.device)

    def rows(t):  # [S, L]: per output channel (or one row), tap-major, so M consecutive entries are one group
        wm = weight_matrix(t, groups)
        return wm.reshape(-1, wm.shape[-1]) if dims else wm.reshape(1, -1)

    def score(t):
        t = rows(t)
        return torch.where(t.isnan(), low.to(t.dtype), t)

    kept, p, r = rows(mask), score(prune_score), score(regrow_score)
    s, length = kept.shape
    shuffle = shuffle_g = None
    if ties == "random":
        shuffle = torch.rand(kept.shape, generator=generator, device=mask.device).argsort(dim=1)
        shuffle_g = torch.rand((s * length // m, m), generator=generator, device=mask.device).argsort(dim=1)
    grouped = kept.reshape(-1, m)
    kept_g = grouped.sum(1, keepdim=True)
    cap = m - kept_g + (kept_g if regrow_pruned else 0)  # the group's candidates for regrowth
    prunable = (grouped & (_rank(grouped, p.reshape(-1, m), False, shuffle_g) < cap)).view(s, length)
    k = torch.round(kept.sum(1, dtype=torch.int64).double() * fraction).long()
    k = torch.minimum(k, prunable.sum(1))[:, None]
    pruned = prunable & (_rank(prunable, p, False, shuffle) < k)
    pool = ~kept | pruned if regrow_pruned else ~kept
    per_group = pruned.reshape(-1, m).sum(1, keepdim=True)
    regrown = pool & (_rank(pool.reshape(-1, m), r.reshape(-1, m), True, shuffle_g) < per_group).view(s, length)
    new = (kept & ~pruned) | regrown

    shape = tuple(mask.shape)
    matrix = (groups, mask.shape[0] // groups, math.prod(shape[1:]))

    def back(t):
        return weight_from_matrix(t.reshape(matrix), shape).contiguous()

    return PruneRegrow(mask=back(new), pruned=back(pruned), regrown=back(regrown))


def prune_regrow(mask: torch.Tensor, prune_score: torch.Tensor, regrow_score: torch.Tensor, fraction: float, *,
                 dims: Sequence[int] = (0,), regrow_pruned: bool = False, ties: str = "index",
                 generator: torch.Generator | None = None, block: Sequence[int] | None = None, groups: int = 1,
                 pool: str | Sequence[str] = "mean", nm: Sequence[int] | None = None,
                 count: torch.Tensor | None = None) -> PruneRegrow:
    """One dynamic-sparse-training step of a mask: per slice, drop the weakest kept entries and keep as many
    dropped ones instead, so every slice keeps exactly its count of kept entries.

    A slice is one index into ``dims`` (``(0,)``: per output channel of a conv weight; ``(0, 1)``: per
    ``(C_out, C_in)`` filter, DSConv's ``prune_dims``; ``()``: the whole tensor). In a slice with ``a`` kept
    entries out of ``n``, ``k = min(round(fraction · a), c)`` entries change, ``c`` the number of candidates for
    regrowth (the ``n - a`` dropped entries; with ``regrow_pruned``, also the pruned ones, so ``c ≥ k``):

    - pruned: the ``k`` kept entries with the lowest ``prune_score`` (NaN counts as lowest: a NaN weight is
      pruned first);
    - regrown: the ``k`` candidates with the highest ``regrow_score`` (NaN counts as lowest).

    Equal scores are ranked by position in the slice (row-major over the other dims), lowest first
    (``ties='index'``), or in a random order drawn per call from ``generator`` on the mask's device
    (``ties='random'``: integer scores such as coactivation counts tie a lot, and breaking those ties by position
    would move the kept entries towards the low positions step after step). ``round`` is half to even, as
    Python's. Everything is vectorised on the mask's device with no host synchronisation (two
    stable sorts per ranking), so it can run inside a training step or under ``torch.compile``.

    With ``block`` (a conv weight-shaped ``mask``): the step works on whole ``BO × BK`` tiles of each group's
    weight matrix (the tiling of :func:`tile_lists`), so a mask of whole tiles stays one and the fraction of tiles
    the kernels visit stays what it was. A tile is kept iff it holds a kept entry; both scores are pooled per
    tile (``pool``: ``'mean'`` or ``'sum'`` over the tile's entries, or a pair ``(prune, regrow)``, e.g.
    ``('mean', 'sum')`` for mean ``|w|`` and a summed statistic); the slices are the rows of tiles (``dims=(0,)``:
    each ``BO``-wide band of output channels of a group keeps its count of tiles) or all tiles (``dims=()``);
    ``fraction`` counts tiles. The new mask keeps kept tiles whole: the entries the old mask had off inside a
    kept tile count as regrown.

    With ``nm=(N, M)`` (a conv weight-shaped N:M mask, see :func:`nm_mask`): every group of ``M`` consecutive
    reduction entries keeps its count (``N``): only a group's ``M - N`` weakest kept entries are candidates for
    pruning, the slice's ``k`` weakest of those are pruned, and each group regrows, among its dropped entries, as
    many as it lost (highest ``regrow_score``); slices are output channels (``dims=(0,)``) or all (``()``).

    Args:
        mask: bool tensor (any shape with at least one dim).
        prune_score: floating, ``mask``'s shape; e.g. ``weight.abs()`` (magnitude pruning) or a coactivation
            score.
        regrow_score: floating, ``mask``'s shape; e.g. a coactivation score, or ``torch.rand`` with a seeded
            generator for random regrowth.
        fraction: the fraction of each slice's kept entries to replace, a real number in ``[0, 1]``.
        dims: the dims that index the slices (distinct, in ``[-mask.dim(), mask.dim())``).
        regrow_pruned: whether an entry pruned in this step may be regrown in it.
        ties: ``'index'`` (equal scores by position) or ``'random'``.
        generator: the ``torch.Generator`` of ``ties='random'`` (``None``: the global one); on the mask's device.
        block: None (entry by entry), or ``(BO, BK)`` (powers of two ≥ 16): whole tiles, as above.
        groups: the convolution's groups (with ``block``), dividing ``C_out``.
        pool: with ``block``, how the scores are pooled per tile (see above).
        nm: None, or ``(N, M)``: keep the N:M structure (see above); not with ``block``.
        count: None, or an integer tensor on the mask's device, one entry per slice (or a 0-d one for all):
            the number of entries to change in each slice instead of ``round(fraction · a)`` (still capped at
            the candidates); ``fraction`` is then not read. A global schedule passes the counts it chose across
            layers this way, without a host synchronisation. With ``block``: counted in tiles, per row of tiles
            (``dims=(0,)``) or for all tiles (``dims=()``). Not with ``nm``.

    Returns:
        A :class:`PruneRegrow` of bool tensors of ``mask``'s shape.

    Raises:
        TypeError: ``mask`` is not a bool tensor; a score is not a floating tensor; ``fraction`` is not a real
            number; ``dims`` is not a sequence of ints; ``generator`` is not a ``torch.Generator``.
        ValueError: a score of another shape or device than ``mask``; ``fraction`` NaN or outside ``[0, 1]``;
            ``dims`` out of range or repeated; ``ties`` neither ``'index'`` nor ``'random'``; with ``block``: a
            ``block`` entry not a power of two ≥ 16 (TypeError: not a pair of ints), ``dims`` other than ``(0,)``
            or ``()``, ``mask`` not a conv weight's shape, ``groups`` not dividing ``C_out``, an unknown ``pool``;
            with ``nm``: as :func:`nm_mask` (TypeError: not a pair of ints), ``dims`` other than ``(0,)`` or ``()``,
            ``nm`` and ``block`` both given.
    """
    check(isinstance(mask, torch.Tensor) and mask.dtype == torch.bool,
          lambda: f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}", TypeError)
    check(mask.dim() >= 1, lambda: "mask must have at least one dim")
    _check_score(prune_score, "prune_score", mask)
    _check_score(regrow_score, "regrow_score", mask)
    fraction = _check_density(fraction, "fraction")
    dims = _check_dims(dims, mask.dim())
    check(ties in ("index", "random"), lambda: f"ties must be 'index' or 'random', got {ties!r}")
    check(generator is None or isinstance(generator, torch.Generator),
          lambda: f"generator must be a torch.Generator or None, got {type(generator).__name__}", TypeError)
    check(nm is None or block is None, lambda: "nm and block are exclusive: pass one of them")
    check(count is None or (isinstance(count, torch.Tensor) and not count.is_floating_point()
                            and not count.is_complex() and count.dtype != torch.bool),
          lambda: f"count must be None or an integer tensor, got {getattr(count, 'dtype', type(count).__name__)}",
          TypeError)
    check(count is None or nm is None, lambda: "count is for unstructured or block masks: not with nm")
    if nm is not None:
        return _nm_prune_regrow(mask, prune_score, regrow_score, fraction, dims, regrow_pruned, ties, generator, nm,
                                groups)
    if block is not None:
        return _block_prune_regrow(mask, prune_score, regrow_score, fraction, dims, regrow_pruned, ties, generator,
                                   block, groups, pool, count)
    rest = tuple([d for d in range(mask.dim()) if d not in dims])
    perm = dims + rest
    n_slices = math.prod([mask.shape[d] for d in dims])

    def rows(t):  # [S, n]: slices as rows, each slice's entries in row-major order
        return t.permute(perm).reshape(n_slices, -1)

    kept = rows(mask)
    kept_count = kept.sum(1, dtype=torch.int64)
    if count is None:
        k = torch.round(kept_count.double() * fraction).long()
    else:
        check(count.device == mask.device, lambda: f"count is on {count.device} but mask is on {mask.device}")
        check(count.numel() in (1, n_slices), lambda: f"count must have one entry per slice ({n_slices}) or one, "
              f"got {count.numel()}")
        k = torch.minimum(count.reshape(-1).long().clamp(min=0), kept_count).expand(n_slices)
    candidates = kept.shape[1] - kept_count + (k if regrow_pruned else 0)
    k = torch.minimum(k, candidates)[:, None]
    low = torch.tensor(float("-inf"), device=mask.device)
    # one random order per slice serves both rankings (their candidates are disjoint unless regrow_pruned, and
    # then a pruned entry's place among the regrowth candidates is still uniform)
    shuffle = None
    if ties == "random":
        shuffle = torch.rand(kept.shape, generator=generator, device=mask.device).argsort(dim=1)
    p = rows(prune_score)
    pruned = kept & (_rank(kept, torch.where(p.isnan(), low.to(p.dtype), p), False, shuffle) < k)
    r = rows(regrow_score)
    pool = ~kept | pruned if regrow_pruned else ~kept
    regrown = pool & (_rank(pool, torch.where(r.isnan(), low.to(r.dtype), r), True, shuffle) < k)
    new = (kept & ~pruned) | regrown

    inverse = sorted(range(mask.dim()), key=perm.__getitem__)
    shape = [mask.shape[d] for d in perm]

    def back(t):
        return t.view(shape).permute(inverse).contiguous()

    return PruneRegrow(mask=back(new), pruned=back(pruned), regrown=back(regrown))
