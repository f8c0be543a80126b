"""The gather family's plain-torch paths: padding in every mode, unfold / fold, the patches of a transposed
convolution and their adjoint, curvlinops-style patches and their means over positions."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from convzoo import _compat, _shapes


def source_index(n: int, lo: int, hi: int, padding_mode: str, device=None) -> torch.Tensor:
    """For each of the ``lo + n + hi`` padded positions, the input index it reads.

    Defined for the non-zero padding modes (``'zeros'`` has no source for its pad entries).
    """
    p = torch.arange(-lo, n + hi, device=device)
    if padding_mode == "circular":
        return torch.remainder(p, n)
    if padding_mode == "reflect":
        p = p.abs()
        return torch.where(p > n - 1, 2 * (n - 1) - p, p)
    if padding_mode == "replicate":
        return p.clamp(0, n - 1)
    raise ValueError(f"no source index for padding_mode={padding_mode!r}")


def _pad(x: torch.Tensor, g: _shapes.Geometry) -> torch.Tensor:
    if g.padding_mode == "zeros":
        # F.pad wants the last dim first
        flat = [v for i in reversed(range(g.ndim)) for v in (g.pad_lo[i], g.pad_hi[i])]
        return F.pad(x, flat)
    for i in range(g.ndim):
        idx = source_index(g.in_size[i], g.pad_lo[i], g.pad_hi[i], g.padding_mode, x.device)
        x = x.index_select(2 + i, idx)
    return x


def _unpad_adjoint(buf: torch.Tensor, g: _shapes.Geometry) -> torch.Tensor:
    """The adjoint of :func:`_pad`: fold the padded border back onto the input it was read from."""
    if g.padding_mode == "zeros":
        for i in range(g.ndim):
            buf = buf.narrow(2 + i, g.pad_lo[i], g.in_size[i])
        return buf
    for i in range(g.ndim):
        idx = source_index(g.in_size[i], g.pad_lo[i], g.pad_hi[i], g.padding_mode, buf.device)
        shape = list(buf.shape)
        shape[2 + i] = g.in_size[i]
        buf = buf.new_zeros(shape).index_add_(2 + i, idx, buf)
    return buf


def _windows(x: torch.Tensor, g: _shapes.Geometry) -> torch.Tensor:
    """The sliding windows of ``x`` as a view ``[N, C, *out, *kernel]`` (of the padded input)."""
    xp = _pad(x, g)
    for i in range(g.ndim):
        span = g.dilation[i] * (g.kernel_size[i] - 1) + 1
        xp = xp.unfold(2 + i, span, g.stride[i]).narrow(2 + i, 0, g.out_size[i])
    # [N, C, *out, *span] -> keep every dilation-th tap of each window
    taps = (slice(None, None, d) for d in g.dilation)
    return xp[(..., *taps)]


def unfold(x: torch.Tensor, kernel_size: list[int], dilation: list[int], padding: list[int],
           stride: list[int], padding_mode: str = "zeros") -> torch.Tensor:
    """im2col: ``[N, C, *spatial]`` → ``[N, C·∏K, L]`` in ``torch.nn.functional.unfold`` order."""
    g = _shapes.unfold_geometry(x, kernel_size, dilation, padding, stride, padding_mode)
    nd = g.ndim
    perm = [0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd)]
    return _windows(x, g).permute(perm).reshape(_shapes.unfold_out_shape(x, g))


def _patches_by_position(x: torch.Tensor, g: _shapes.Geometry) -> torch.Tensor:
    """The patch matrices of every position, ``[L, N, C·∏K]`` contiguous: ``unfold(x)`` permuted
    ``(2, 0, 1)``, built in that layout so the per-position matmuls read contiguous matrices."""
    nd = g.ndim
    perm = [*range(2, 2 + nd), 0, 1, *range(2 + nd, 2 + 2 * nd)]
    return _windows(x, g).permute(perm).reshape(g.num_blocks, x.shape[0], x.shape[1] * g.kernel_numel)


def fold(cols: torch.Tensor, output_size: list[int], kernel_size: list[int], dilation: list[int],
         padding: list[int], stride: list[int], padding_mode: str = "zeros") -> torch.Tensor:
    """col2im, the adjoint of :func:`unfold`: overlapping entries are summed.

    fp16/bf16 are summed in fp32 and rounded once, like the kernel.
    """
    g = _shapes.fold_geometry(cols, output_size, kernel_size, dilation, padding, stride, padding_mode)
    n, c = cols.shape[0], cols.shape[1] // g.kernel_numel
    acc_dtype = torch.float64 if cols.dtype == torch.float64 else torch.float32
    blocks = cols.reshape(n, c, *g.kernel_size, *g.out_size).to(acc_dtype)
    if g.padding_mode == "zeros":  # accumulate straight into the output, each tap clipped to the input
        out = cols.new_zeros((n, c, *g.in_size), dtype=acc_dtype)
        for k in itertools.product(*(range(k) for k in g.kernel_size)):
            clipped = [_clip_tap(ki, *dims) for ki, *dims in
                       zip(k, g.in_size, g.pad_lo, g.dilation, g.stride, g.out_size)]
            if all(cl is not None for cl in clipped):
                dst = tuple(slice(first, first + s * (count - 1) + 1, s)
                            for (first, _, count), s in zip(clipped, g.stride))
                src = tuple(slice(o0, o0 + count) for _, o0, count in clipped)
                out[(slice(None), slice(None), *dst)] += blocks[(slice(None), slice(None), *k, *src)]
        return out.to(cols.dtype)
    padded = [s + lo + hi for s, lo, hi in zip(g.in_size, g.pad_lo, g.pad_hi)]
    buf = cols.new_zeros((n, c, *padded), dtype=acc_dtype)
    for k in itertools.product(*(range(k) for k in g.kernel_size)):
        window = tuple(
            slice(ki * d, ki * d + s * (o - 1) + 1, s)
            for ki, d, s, o in zip(k, g.dilation, g.stride, g.out_size)
        )
        buf[(slice(None), slice(None), *window)] += blocks[(slice(None), slice(None), *k)]
    return _unpad_adjoint(buf, g).to(cols.dtype).contiguous()


def _clip_tap(k: int, size: int, lo: int, d: int, s: int, out: int) -> tuple[int, int, int] | None:
    """Along one dim, the blocks whose tap ``k`` reads inside the input (not the zero padding):
    ``(first input index, first block, count)``, or None when there are none."""
    offset = k * d - lo  # block o's tap k reads input index o * s + offset
    o_first = max(0, -(offset // s))  # ceil(-offset / s)
    o_last = min(out - 1, (size - 1 - offset) // s)
    if o_last < o_first:
        return None
    return o_first * s + offset, o_first, o_last - o_first + 1


# unfold_transpose: the patches a transposed convolution sees
def _transpose_taps(g: _shapes.TransposeGeometry) -> list[list[tuple[slice, slice] | None]]:
    """Per spatial dim and tap ``t``: the output positions it writes (a strided slice, ``o = i·s - p + t·d``)
    and the input range it reads, or None when the tap reaches no output position."""
    per_dim = []
    for dim in range(g.ndim):
        n, s, p, d, size = g.in_size[dim], g.stride[dim], g.padding[dim], g.dilation[dim], g.out_size[dim]
        taps = []
        for t in range(g.kernel_size[dim]):
            o0 = t * d - p  # where input 0 lands
            i_lo, i_hi = max(0, -(o0 // s)), min(n, -((o0 - size) // s))  # ceil(-o0 / s), ceil((size - o0) / s)
            if i_hi <= i_lo:
                taps.append(None)
            else:
                o_lo = i_lo * s + o0
                taps.append((slice(o_lo, o_lo + (i_hi - i_lo - 1) * s + 1, s), slice(i_lo, i_hi)))
        per_dim.append(taps)
    return per_dim


def _each_tap(g: _shapes.TransposeGeometry):
    """``(tap index tuple, output slices, input slices)`` for every tap that reaches the output."""
    per_dim = _transpose_taps(g)
    for t in itertools.product(*(range(k) for k in g.kernel_size)):
        hit = [per_dim[dim][t[dim]] for dim in range(g.ndim)]
        if all(h is not None for h in hit):
            yield t, tuple(h[0] for h in hit), tuple(h[1] for h in hit)


def unfold_transpose(x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                     output_padding: list[int], dilation: list[int]) -> torch.Tensor:
    """``[N, C, *in]`` → ``[N, C·∏K, ∏out]`` in unfoldNd's ``unfold_transposeNd`` order:
    ``out[n, (c, t), o] = x[n, c, i]`` where ``o = i·stride - padding + t·dilation``, else 0.

    One strided copy of ``x`` per tap (each tap writes every ``stride``-th output position), into zeros: the
    data moved is ∏K copies of x, no index tensors (6× faster than a gather on CPU, 5× unfoldNd)."""
    g = _shapes.unfold_transpose_geometry(x, kernel_size, stride, padding, output_padding, dilation)
    n, c = x.shape[:2]
    out = x.new_zeros((n, c, *g.kernel_size, *g.out_size))
    everything = (slice(None), slice(None))
    for t, o_slices, i_slices in _each_tap(g):
        out[(*everything, *t, *o_slices)] = x[(*everything, *i_slices)]
    return out.view(n, c * g.kernel_numel, g.num_positions)


def unfold_transpose_backward(cols: torch.Tensor, input_size: list[int], kernel_size: list[int], stride: list[int],
                              padding: list[int], output_padding: list[int], dilation: list[int]) -> torch.Tensor:
    """The adjoint of :func:`unfold_transpose`: ``[N, C·∏K, ∏out]`` → ``[N, C, *input_size]``,
    ``dx[n, c, i] = Σ_t cols[n, (c, t), i·stride - padding + t·dilation]`` over the taps landing inside the
    output: one strided slice added per tap, in tap order (deterministic); fp16/bf16 are summed in fp32 and
    rounded once, like the kernel."""
    g = _shapes.unfold_transpose_backward_geometry(cols, input_size, kernel_size, stride, padding, output_padding,
                                                   dilation)
    n, c = cols.shape[0], cols.shape[1] // g.kernel_numel
    acc_dtype = torch.float64 if cols.dtype == torch.float64 else torch.float32
    blocks = cols.reshape(n, c, *g.kernel_size, *g.out_size)
    dx = cols.new_zeros((n, c, *g.in_size), dtype=acc_dtype)
    everything = (slice(None), slice(None))
    for t, o_slices, i_slices in _each_tap(g):
        dx[(*everything, *i_slices)] += blocks[(*everything, *t, *o_slices)]
    return dx.to(cols.dtype)


# ----------------------------------------------------------------------------------------------
# extract_patches: unfold's patches as [N, L, C/groups·∏K], the channel groups averaged (curvlinops' layout)
def group_mean(x: torch.Tensor, groups: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` ``[N, C, *spatial]`` with its ``groups`` channel groups averaged: ``[N, C/groups, *spatial]`` in
    ``dtype`` (default ``x``'s; ``x`` itself when ``groups == 1``). fp16/bf16 are summed in fp32 and rounded
    once, like the extract_patches kernel; patch_covariance asks for fp32, so that a mean rounded back to
    fp16/bf16 does not put a rounding error into the fp32 factor that the input does not have."""
    dtype = dtype or x.dtype
    if groups == 1:
        return x.to(dtype)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.unflatten(1, (groups, x.shape[1] // groups)).sum(1, dtype=acc) / groups).to(dtype)


def extract_patches(x: torch.Tensor, kernel_size: list[int], dilation: list[int], padding: list[int],
                    stride: list[int], padding_mode: str, groups: int) -> torch.Tensor:
    """``[N, C, *spatial]`` → ``[N, L, C/groups·∏K]``: row ``l`` of sample ``n`` is the patch that
    :func:`unfold` puts in column ``l``, of the group-averaged input (``(c, k_0, k_1, ...)`` order).

    The group mean, then one copy of the padded input's windows straight into the ``[N, *out, C/groups, *K]``
    order (no unfold + transpose): a fresh contiguous tensor, never a view of ``x``."""
    g = _shapes.extract_patches_geometry(x, kernel_size, dilation, padding, stride, padding_mode, groups)
    xm = group_mean(x, groups)
    nd = g.ndim
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    out = xm.new_empty((x.shape[0], *g.out_size, xm.shape[1], *g.kernel_size))
    out.copy_(_windows(xm, g).permute(perm))
    return out.view(_shapes.extract_patches_out_shape(x, g, groups))


def broadcast_groups(folded: torch.Tensor, groups: int, shape) -> torch.Tensor:
    """``folded`` ``[N, C/groups, *spatial]`` → ``[N, C, *spatial]`` (``shape``), each group ``folded / groups``:
    the last step of :func:`extract_patches_backward` (``folded`` itself when ``groups == 1``)."""
    if groups == 1:
        return folded
    n, cg = folded.shape[:2]
    return (folded / groups).unsqueeze(1).expand(n, groups, cg, *folded.shape[2:]).reshape(shape)


def extract_patches_backward(grad: torch.Tensor, input_size: list[int], kernel_size: list[int],
                             dilation: list[int], padding: list[int], stride: list[int], padding_mode: str,
                             groups: int) -> torch.Tensor:
    """The adjoint of :func:`extract_patches`: ``grad`` ``[N, L, C/groups·∏K]`` → ``[N, C, *input_size]``,
    ``dx[n, g·C/groups + c] = fold(grad.transpose(1, 2))[n, c] / groups`` for every group ``g``."""
    g = _shapes.extract_patches_backward_geometry(grad, input_size, kernel_size, dilation, padding, stride,
                                                  padding_mode, groups)
    folded = fold(grad.transpose(1, 2), input_size, kernel_size, dilation, padding, stride, padding_mode)
    return broadcast_groups(folded, groups, _shapes.extract_patches_backward_out_shape(grad, g, groups))


# ----------------------------------------------------------------------------------------------
# the patches averaged over positions, without forming them: along each spatial dim in turn, tap k's sum over
# the output positions is the sum of a strided slice (no count matrix: a matmul with zero counts turned one inf
# or NaN pixel into a NaN in every tap, and autocast lowered it to bf16 and failed)
def _window_tap_sums(y: torch.Tensor, g: _shapes.Geometry, dim: int) -> torch.Tensor:
    """Along spatial ``dim`` of ``y`` ``[N, C, ...]``: for each tap ``k``, the sum over the output positions
    ``o`` of the padded input at ``o·stride - lo + k·dilation``, as ``[N, C, .., K_dim, ..]``.

    Per tap, the sum of a strided slice of ``y`` (a view) clipped to the input; the non-zero padding modes first
    pad ``y`` along that dim (an ``index_select`` copy). The slices' ends are the size minus an offset known
    without the size, so a symbolic size adds no guard (no recompile per parity; only a tap reading one element
    or none specialises, on tiny inputs)."""
    ax, n, lo, hi = 2 + dim, y.shape[2 + dim], g.pad_lo[dim], g.pad_hi[dim]
    k_size, s, d = g.kernel_size[dim], g.stride[dim], g.dilation[dim]
    if g.padding_mode != "zeros" and (lo or hi):  # then read like an unpadded input
        y = y.index_select(ax, source_index(n, lo, hi, g.padding_mode, y.device))
        n, lo, hi = n + lo + hi, 0, 0
    sums = []
    for k in range(k_size):
        o0 = k * d - lo  # position o reads input o·s + o0
        first = o0 + max(0, -(o0 // s)) * s  # the first of them inside the input (ceil(-o0 / s) positions on)
        # the last position reads below n + hi - d·(K-1-k) (the padded input's end for this tap): clip to n
        end = n + min(0, hi - d * (k_size - 1 - k))
        tap = y.narrow(ax, first, _compat.sym_max(0, end - first))
        sums.append(tap[(slice(None),) * ax + (slice(None, None, s),)].sum(ax))
    return torch.stack(sums, ax)


def _transpose_tap_sums(y: torch.Tensor, g: _shapes.TransposeGeometry, dim: int) -> torch.Tensor:
    """Along spatial ``dim``: for each tap ``t``, the sum of the inputs it carries to some output position
    (the input range :func:`_transpose_taps` gives), as ``[N, C, .., K_dim, ..]``."""
    ax = 2 + dim
    return torch.stack([y.narrow(ax, 0, 0).sum(ax) if tap is None else y[(slice(None),) * ax + (tap[1],)].sum(ax)
                        for tap in _transpose_taps(g)[dim]], ax)


def _mean_patch(x: torch.Tensor, tap_sums, ndim: int, positions) -> torch.Tensor:
    """``x`` ``[N, C, *in]`` reduced one spatial dim at a time to its taps (``tap_sums(y, dim)``), divided by
    ``positions``: ``[N, C·∏K]``, computed in fp32 (fp64 for fp64) and returned in ``x``'s dtype."""
    y = x.to(_acc(x.dtype))
    for dim in range(ndim):  # the outer dims first: their slices are whole contiguous rows
        y = tap_sums(y, dim)  # [N, C, K_0, .., K_dim, in_dim+1, ...]
    return (y.flatten(1) / positions).to(x.dtype)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def averaged_patches(x: torch.Tensor, g: _shapes.Geometry) -> torch.Tensor:
    """The mean over the ``g.num_blocks`` positions of :func:`unfold`'s columns: ``[N, C·∏K]`` in
    ``(c, k_0, k_1, ...)`` order (no group averaging), without forming the patches.

    ``g`` is ``x``'s geometry (:func:`convzoo._shapes.geometry` of ``x.shape[2:]``; not checked again). One
    spatial dim at a time, tap ``k``'s sum over the output positions is the sum of a strided slice of ``x``
    (a view; the non-zero padding modes read a copy padded along that dim): O(N·C·∏n·K) work, O(N·C·∏n)
    memory (times the padded/unpadded size ratio for the non-zero modes), and an inf or NaN reaches only the
    taps that read it. Computed in fp32 (fp64 for fp64, autocast or not) and returned in ``x``'s dtype.
    Plain differentiable torch (autograd, ``torch.func``, ``vmap``, ``torch.compile`` see ordinary ops). The
    geometry check guarantees ``L ≥ 1`` (a kernel larger than the padded input is refused), so the mean never
    divides by zero; an empty input dim (zero padding only) reads only padding and gives zeros, empty N or C
    an empty result.
    """
    return _mean_patch(x, lambda y, dim: _window_tap_sums(y, g, dim), g.ndim, g.num_blocks)


def averaged_transpose_patches(x: torch.Tensor, g: _shapes.TransposeGeometry) -> torch.Tensor:
    """The mean over the ``g.num_positions`` output positions of :func:`unfold_transpose`'s columns:
    ``[N, C·∏K]`` (no group averaging), without forming the patches: tap ``k`` of output position ``o``
    reads input ``i`` when ``o + padding - k·dilation == i·stride``, ``0 <= i < in``, so its sum over the
    positions is the sum of one input range per dim.

    As :func:`averaged_patches` (fp32/fp64 compute, ``x``'s dtype returned, an inf or NaN only in the taps
    that read it, plain differentiable torch). The geometry check guarantees at least one output position.
    """
    return _mean_patch(x, lambda y, dim: _transpose_tap_sums(y, g, dim), g.ndim, g.num_positions)


