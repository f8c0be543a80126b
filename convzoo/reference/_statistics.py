"""The statistics' plain-torch paths: KFAC patch covariances (chunked Gram matrices), coactivation counts and
correlations, EKFAC eigenvalues. Their chunk budgets are read from :mod:`convzoo.reference` at each call (one
setting serves every family, and a test may lower it there)."""

from __future__ import annotations

import contextlib
import itertools
import math

import torch

import convzoo.reference as _budget
from convzoo import _compat, _shapes
from convzoo.reference._conv import _CONV_WEIGHT, masked_conv_grad_weight
from convzoo.reference._patches import _acc, _windows, unfold, unfold_transpose

# ---------------------------------------------------------------------------------------------- patch_covariance


def _covariance_geometry(x: torch.Tensor, kernel_size, stride, padding, output_padding, dilation, padding_mode,
                         transposed: bool):
    """The call's geometry and its number of positions L."""
    if transposed:
        g = _shapes.transpose_geometry(list(x.shape[2:]), kernel_size, stride, padding, output_padding, dilation)
        return g, g.num_positions
    g = _shapes.geometry(list(x.shape[2:]), kernel_size, dilation, padding, stride, padding_mode)
    return g, g.num_blocks


def _patch_chunks(x: torch.Tensor, g, groups: int, bias: bool, transposed: bool, dtype: torch.dtype):
    """The patch matrix of ``x``, ``[G, D (+1), N·L]`` (columns ``n·L + l``), as consecutive column chunks
    of at most ``_CHUNK_BYTES`` (at least one output row of one sample), each written into one reused
    buffer in ``dtype``; with ``bias`` its last row is ones. A transposed layer's chunks are whole samples."""
    n, c = x.shape[:2]
    d = c // groups * g.kernel_numel
    out = g.out_size
    per_row = groups * (d + bias) * math.prod(out[1:]) * torch.finfo(dtype).bits // 8
    if per_row * out[0] <= _budget._CHUNK_BYTES or transposed:  # whole samples
        samples, rows = min(n, max(1, _budget._CHUNK_BYTES // (per_row * out[0]))), out[0]
    else:  # one sample is more than a chunk: slabs of its first output dim
        samples, rows = 1, max(1, _budget._CHUNK_BYTES // per_row)
    width = samples * rows * math.prod(out[1:])
    buf = x.new_empty((groups, d + bias, width), dtype=dtype)
    if bias:
        buf[:, d] = 1
    nd = g.ndim
    windows = None if transposed else _windows(x, g)  # [N, C, *out, *K]
    for n0 in range(0, n, samples):
        nb = min(samples, n - n0)
        for r0 in range(0, out[0], rows):
            nr = min(rows, out[0] - r0)
            m = nb * nr * math.prod(out[1:])
            dst = buf[:, :d, :m]
            if transposed:
                cols = unfold_transpose(x[n0:n0 + nb], *_transpose_args(g))  # [nb, C·K, L]
                dst.view(groups, d, nb, m // nb).copy_(cols.unflatten(1, (groups, d)).permute(1, 2, 0, 3))
            else:
                src = windows[n0:n0 + nb].narrow(2, r0, nr)  # [nb, C, nr, *out[1:], *K]
                src = src.permute(1, *range(2 + nd, 2 + 2 * nd), 0, *range(2, 2 + nd)).unflatten(0, (groups, -1))
                dst.view(src.shape).copy_(src)
            yield buf[:, :, :m]


def _transpose_args(g: _shapes.TransposeGeometry) -> tuple:
    return (list(g.kernel_size), list(g.stride), list(g.padding), list(g.output_padding), list(g.dilation))


def patch_covariance(x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                     output_padding: list[int], dilation: list[int], padding_mode: str, groups: int,
                     transposed: bool, bias: bool, out: torch.Tensor | None = None, alpha: float = 0.0,
                     coef: float = 1.0) -> torch.Tensor:
    """``coef·F + alpha·out`` into ``out`` (a new ``[G, D (+1), D (+1)]`` tensor when None; ``alpha`` is then
    ignored), ``F[g] = Σ_{n,l} p p^T`` the unscaled second moment of group ``g``'s patches (as
    :func:`unfold`, or :func:`unfold_transpose` when ``transposed``; a constant 1 appended with ``bias``).

    Computed in fp32 (fp64 for fp64 input) over column chunks of the patch matrix (``_patch_chunks``): the
    peak extra memory is one chunk, not the patch matrix. The arguments are the launcher's
    (:func:`convzoo.kernels.patch_covariance.patch_covariance`).
    """
    g, num = _covariance_geometry(x, kernel_size, stride, padding, output_padding, dilation, padding_mode,
                                  transposed)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dp = x.shape[1] // groups * g.kernel_numel + bias
    read_out = out is not None and alpha != 0.0
    if out is None:
        out = x.new_empty((groups, dp, dp), dtype=dtype)
    if x.shape[0] * num == 0 or out.numel() == 0:
        return out.mul_(alpha) if read_out else out.zero_()
    # no patch rows (C = 0) but a bias: the factor is the column count alone
    chunks = [x.new_empty((groups, 0, x.shape[0] * num), dtype=dtype)] if dp == bias else \
        _patch_chunks(x, g, groups, False, transposed, dtype)
    return gram_into(out, chunks, bias, alpha if read_out else 0.0, coef)


# from this many rows on, the Gram matrix's GEMM is its upper block-triangle (two row blocks), 3/4 of the work
_TRIANGLE_ROWS = 512


def gram_into(out: torch.Tensor, chunks, bias: bool, alpha: float, coef: float) -> torch.Tensor:
    """``out ← alpha·out + coef·[[P Pᵀ, P·1], [1ᵀPᵀ, m]]`` per group (``alpha = 0``: ``out`` not read, NaN
    included), ``P`` ``[G, d, m]`` the patch matrix given as column chunks (at least one), the bias row and
    column (with ``bias``) from the row sums and the column count instead of a row of ones in the GEMM.

    Why: a ones row makes the GEMM's size odd (``C·9 + 1``), which MKL runs markedly slower on the CPU (1153
    rows: 87 ms against 57 ms for 1152, one thread); and from ``_TRIANGLE_ROWS`` rows on only the upper
    block-triangle of the two row halves is multiplied (``P_1 Pᵀ`` and ``P_2 P_2ᵀ``), the lower-left block
    mirrored from the upper-right: the same products, so the same factor up to each entry's summation order."""
    acc = sums = None
    count = 0
    for cols in chunks:
        groups, d = cols.shape[:2]
        split = d // 2 if d >= _TRIANGLE_ROWS else d
        beta = 0.0 if acc is None else 1.0
        if acc is None:
            acc = cols.new_empty((groups, d, d))
        acc[:, :split].baddbmm_(cols[:, :split], cols.transpose(1, 2), beta=beta)
        if split < d:
            low = cols[:, split:]
            acc[:, split:, split:].baddbmm_(low, low.transpose(1, 2), beta=beta)
        if bias:
            sums = cols.sum(2) if sums is None else sums.add_(cols.sum(2))
            count += cols.shape[2]
    if split < d:
        acc[:, split:, :split] = acc[:, :split, split:].transpose(1, 2)
    read_out = alpha != 0.0
    body = out[:, :d, :d]
    if read_out:
        body.mul_(alpha).add_(acc, alpha=coef)
    else:
        body.copy_(acc.mul_(coef))
    if bias:
        edge = sums.mul_(coef)
        for view in (out[:, :d, d], out[:, d, :d]):
            view.mul_(alpha).add_(edge) if read_out else view.copy_(edge)
        corner = out[:, d, d]
        corner.mul_(alpha).add_(coef * count) if read_out else corner.fill_(coef * count)
    return out


# ---------------------------------------------------------------------------------------------- coactivation


def _no_autocast(device_type: str):
    """A context that turns autocast off on ``device_type``: a custom op is not autocast-aware, so the torch ops
    inside it would otherwise run in the autocast dtype (a bf16 count is no longer exact)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _normalized_over_batch(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` ``[N, ...]`` in ``dtype``, centred over the batch and scaled to unit norm over it:
    ``(t - mean) / ||t - mean||`` per position, and exactly 0 where ``t`` is constant over the batch (or its
    deviations underflow): the std is 0 there. Two passes (the mean first, then the deviations), each deviation
    first divided by its largest magnitude so that the squares neither underflow nor overflow."""
    t = t.to(dtype)
    dev = t - t.mean(0)
    dev = torch.where((t == t[:1]).all(0), 0, dev)  # constant: exactly 0, whatever the mean rounded to
    top = dev.abs().amax(0)
    dev = dev / torch.where(top == 0, 1, top)
    norm = dev.square().sum(0).sqrt()
    return torch.where(norm == 0, 0, dev / torch.where(norm == 0, 1, norm))


def coactivation(x: torch.Tensor, y: torch.Tensor, weight_shape: list[int], stride: list[int], padding: list[int],
                 dilation: list[int], groups: int, padding_mode: str, x_threshold: float, y_threshold: float,
                 mode: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The coactivation scores ``[C_out, C_in/groups, *kernel]`` of a convolution with input ``x`` and output
    ``y`` (see :func:`convzoo.functional.coactivation`), into ``out`` (``out += H``) when given.

    ``'count'``: the weight gradient of the binarized tensors, ``conv_weight((x > θ_x), (y > θ_y))`` in fp32 (the
    comparisons in fp32, fp64 for fp64), binarized before padding so that zero padding stays 0 (inactive) whatever
    ``θ_x``; its extra memory is the two binarized copies (and a padded one of ``x`` for an unequal or non-zero
    padding).

    ``'correlation'``: both tensors normalised over the batch (:func:`_normalized_over_batch`; a patch entry
    reads one input position, so ``x`` is normalised in input space, then padded: zero padding is a constant,
    std 0); per output position ``l`` the Pearson correlations are one small GEMM over the batch,
    ``Ŷ_lᵀ X̂_l`` (``[C_out/G, N] @ [N, C_in/G·∏K]`` per group), and ``(N-1)/N·|·|`` of them is summed over the
    positions, a block of consecutive positions at a time (:func:`_position_blocks`) whose gathered patches and
    correlation matrices take about ``_CHUNK_BYTES``: never the ``[N, C_out, C_in·∏K, L]`` tensor of the seed.
    fp64 for fp64 ``x``, else fp32; returned in ``x``'s dtype.
    """
    g = _shapes.coactivation_geometry(x, y, weight_shape, stride, padding, dilation, groups, padding_mode)
    with _no_autocast(x.device.type):
        if mode == "count":
            # compared in fp32 (fp64): a threshold rounded to fp16/bf16 could move past a value (0.10005 → 0.10010)
            xa, ya = x.to(_acc(x.dtype)) > x_threshold, y.to(_acc(y.dtype)) > y_threshold
            h = _count_int8(xa, ya, weight_shape, g, groups)
            if h is not None:
                pass
            elif padding_mode == "zeros" and g.pad_lo == g.pad_hi:  # the convolution's own padding: no padded copy
                xb, yb = xa.float(), ya.float()
                h = _CONV_WEIGHT[g.ndim](xb, list(weight_shape), yb, g.stride, g.pad_lo, g.dilation, groups)
            else:
                h = masked_conv_grad_weight(ya.float(), xa.float(), None, list(weight_shape), stride, padding,
                                            dilation, groups, padding_mode)
        else:
            h = _correlation(x, y, weight_shape, g, groups)
        if out is None:
            return h.to(_shapes.coactivation_dtype(x, mode))
        return out.add_(h)


# more groups than this: one small matmul per group costs more in calls than the fp32 grouped conv
_COUNT_MAX_GROUPS = 8


def _count_int8(xa: torch.Tensor, ya: torch.Tensor, weight_shape, g: _shapes.Geometry,
                groups: int) -> torch.Tensor | None:
    """``'count'`` from the bool activities ``xa`` / ``ya`` as exact int8 matmuls into int32 (``torch._int_mm``,
    through :mod:`convzoo._compat`): per group, the patch matrix of the 0/1 input as bytes, ``[C_in/G·∏K, N·L]``
    (the bool tensor read as int8, padded and windowed as :func:`_windows` does, then one copy), times the 0/1
    output ``[N·L, C_out/G]``; batch chunks of at most ``_COUNT_CHUNK_BYTES`` of patches. The same integers as
    the fp32 weight-gradient convolution of the binarized copies (both exact: a count is at most ``N·L``), 2-3×
    faster on a CPU with int8 dot products, and its copies are bytes, not fp32. None where it does not apply
    (not a CPU tensor, the fast path inactive, an empty operand, many groups): the caller takes the fp32 path."""
    mm = _compat.int8_mm
    if (mm is None or xa.device.type != "cpu" or groups > _COUNT_MAX_GROUPS or xa.numel() == 0 or ya.numel() == 0
            or math.prod(weight_shape) == 0):
        return None
    n, nd = xa.shape[0], g.ndim
    c_out, cg = weight_shape[0], weight_shape[1]
    og, p, num = c_out // groups, cg * g.kernel_numel, g.num_blocks
    # [N, G, C_in/G, *out, *K] -> [G, C_in/G, *K, N, *out]: rows (c, k) as the weight's, columns (n, l)
    win = _windows(xa.view(torch.int8), g).unflatten(1, (groups, cg))
    perm = (1, 2, *range(3 + nd, 3 + 2 * nd), 0, *range(3, 3 + nd))
    yt = ya.view(torch.int8).reshape(n, groups, og, num).permute(1, 0, 3, 2)  # [G, N, L, C_out/G], a view
    step = max(1, _budget._COUNT_CHUNK_BYTES // max(1, groups * p * num))
    acc = torch.zeros((groups, p, og), dtype=torch.int32, device=xa.device)
    for a in range(0, n, step):
        b = min(a + step, n)
        cols = win.narrow(0, a, b - a).permute(perm).reshape(groups, p, (b - a) * num)  # one copy, bytes
        rows = yt.narrow(1, a, b - a).reshape(groups, (b - a) * num, og)
        for i in range(groups):
            acc[i] += mm(cols[i], rows[i])
    return acc.transpose(1, 2).reshape(weight_shape).float()


def _position_blocks(out_size: tuple, chunk: int):
    """The output positions (row-major) as blocks of consecutive positions, each at most ``chunk`` (at least one
    position): ``(l0, lead, dim, a, b)``, the block being positions ``[lead..., a:b, :, ...]`` (``lead`` indexes
    the dims before ``dim``, the dims after it whole) that start at flat position ``l0``. A block is a strided view
    of the windows, copied with one ``reshape`` (a gather by flat index is several times slower)."""
    nd = len(out_size)
    dim, inner = nd - 1, 1
    while dim > 0 and inner * out_size[dim] <= chunk:  # whole trailing dims while they fit
        inner *= out_size[dim]
        dim -= 1
    step = max(1, chunk // inner)
    for lead in itertools.product(*(range(e) for e in out_size[:dim])):
        base = 0
        for i, e in zip(lead, out_size[:dim]):
            base = base * e + i
        for a in range(0, out_size[dim], step):
            b = min(a + step, out_size[dim])
            yield (base * out_size[dim] + a) * inner, lead, dim, a, b


def _correlation(x: torch.Tensor, y: torch.Tensor, weight_shape, g: _shapes.Geometry, groups: int) -> torch.Tensor:
    """``(N-1)/N · (1/L) Σ_l |r_l|`` with ``r_l`` the Pearson correlations over the batch at position ``l``, in the
    accumulation dtype (see :func:`coactivation`)."""
    dtype = _acc(x.dtype)
    n, num = x.shape[0], g.num_blocks
    c_out, cg = weight_shape[0], weight_shape[1]
    og, p = c_out // groups, cg * g.kernel_numel
    acc = x.new_zeros((groups, og, p), dtype=dtype)
    if n < 2:  # one sample (or none) has no spread: every std is 0, every score 0
        return acc.view(weight_shape)
    nd = g.ndim
    xn = _windows(_normalized_over_batch(x, dtype), g).unflatten(1, (groups, cg))  # [N, G, C_in/G, *out, *K]
    xn = xn.permute(*range(3, 3 + nd), 1, 0, 2, *range(3 + nd, 3 + 2 * nd))  # [*out, G, N, C_in/G, *K], a view
    yn = _normalized_over_batch(y, dtype).flatten(2).permute(2, 1, 0).contiguous()  # [L, C_out, N]
    # the gathered patches, the output slice, the per-position correlations
    per_position = (n * groups * p + groups * og * n + groups * og * p) * torch.finfo(dtype).bits // 8
    for l0, lead, dim, a, b in _position_blocks(g.out_size, max(1, _budget._CHUNK_BYTES // per_position)):
        xc = xn[lead].narrow(0, a, b - a)  # [b - a, *out[dim + 1:], G, N, C_in/G, *K], a view
        lc = xc.shape[:nd - dim].numel()
        xc = xc.reshape(lc * groups, n, p)  # one strided copy: [Lc·G, N, P]
        yc = yn[l0:l0 + lc].view(lc * groups, og, n)
        acc += torch.bmm(yc, xc).view(lc, groups, og, p).abs_().sum(0)
    return acc.mul_((n - 1) / (n * num)).view(weight_shape)


# ----------------------------------------------------------------------------------------------
# ekfac_eigenvalues: EKFAC's eigenvalue correction, over chunks of samples
def ekfac_eigenvalues(x: torch.Tensor, grad: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor,
                      kernel_size: list[int], stride: list[int], padding: list[int], output_padding: list[int],
                      dilation: list[int], padding_mode: str, groups: int, transposed: bool, bias: bool,
                      coef: float = 1.0) -> torch.Tensor:
    """``coef·s``, ``s[g] = Σ_n (Q_G[g]ᵀ dW_n[g] Q_A[g])²`` (elementwise), ``dW_n[g] = G_n[g] P_n[g]ᵀ`` the
    per-sample gradient of group ``g`` in KFACFactors' layout (``P_n[g]`` its ``[D (+1), L]`` patches as
    :func:`unfold`, or :func:`unfold_transpose` when ``transposed``, a row of ones appended with ``bias``;
    ``G_n[g]`` the ``[C_out/G, L]`` output gradients). A new ``[G, C_out/G, D (+1)]`` tensor, fp32 (fp64 for
    fp64 input).

    Computed over chunks of whole samples whose patches and rotated gradients take at most ``_CHUNK_BYTES``
    (at least one sample): the peak extra memory is one chunk, never every sample's patches or gradients. The
    arguments are the launcher's (:func:`convzoo.kernels.ekfac.ekfac_eigenvalues`)."""
    g, num = _covariance_geometry(x, kernel_size, stride, padding, output_padding, dilation, padding_mode,
                                  transposed)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, c = x.shape[:2]
    d = c // groups * g.kernel_numel
    dp, co = d + bias, grad.shape[1] // groups
    out = x.new_zeros((groups, co, dp), dtype=dtype)
    if n * num == 0 or out.numel() == 0:
        return out
    qa, qg_t = q_a.to(dtype), q_g.to(dtype).transpose(1, 2)
    # per sample: its patches (in x's dtype, in dtype, projected) and three [G, co, dp] products
    per_sample = groups * (dp * num * 3 + co * num * 2 + 3 * co * dp) * torch.finfo(dtype).bits // 8
    samples = max(1, min(n, _budget._CHUNK_BYTES // max(per_sample, 1)))
    # the cheaper contraction order per sample (FLOPs/2): gradient first, or both projections first
    project_first = dp * dp * num + co * co * num + co * dp * num < co * dp * num + co * co * dp + co * dp * dp
    for n0 in range(0, n, samples):
        xs = x[n0:n0 + samples]
        nb = xs.shape[0]
        if transposed:
            cols = unfold_transpose(xs, *_transpose_args(g))
        else:
            cols = unfold(xs, kernel_size, dilation, padding, stride, padding_mode)
        p = cols.view(nb, groups, d, num).to(dtype)  # [nb, G, D, L]
        if bias:
            p = torch.cat([p, p.new_ones(nb, groups, 1, num)], 2)
        gs = grad[n0:n0 + nb].reshape(nb, groups, co, num).to(dtype)
        if project_first:  # (Q_Gᵀ G_n)(P_nᵀ Q_A), P_nᵀ Q_A as one [nb·L, dp] @ [dp, dp] product per group
            right = torch.matmul(p.permute(1, 0, 3, 2).reshape(groups, nb * num, dp), qa)
            rotated = torch.matmul(torch.matmul(qg_t, gs), right.view(groups, nb, num, dp).transpose(0, 1))
            out += rotated.square_().sum(0)
        else:  # Q_Gᵀ (G_n P_nᵀ) Q_A, the right factor as one [nb·co, dp] @ [dp, dp] product per group
            left = torch.matmul(qg_t, torch.matmul(gs, p.transpose(2, 3)))  # [nb, G, co, dp]
            rotated = torch.matmul(left.transpose(0, 1).reshape(groups, nb * co, dp), qa)
            out += rotated.view(groups, nb, co, dp).square_().sum(1)
    return out.mul_(coef)
