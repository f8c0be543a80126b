"""The convolution family's plain-torch paths: locally connected convolution, the convolution as a matrix, and
the masked (sparse) convolution with its two gradients."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from convzoo import _shapes
from convzoo.reference._patches import _pad, _patches_by_position, _unpad_adjoint, fold, source_index


# ----------------------------------------------------------------------------------------------
# locally connected convolution: unfold, then one small matmul per output position (batched over
# positions with bmm). O(W + x + y + unfold) memory; never the [N, C_out, C_in·∏K, L] broadcast.
def local_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel_size: list[int],
               dilation: list[int], padding: list[int], stride: list[int],
               padding_mode: str = "zeros") -> torch.Tensor:
    """``y[n, o, l] = Σ_r unfold(x)[n, r, l] · weight[o, r, l] + bias[o, l]`` as ``[N, C_out, *out]``."""
    g = _shapes.local_conv_geometry(x, weight, bias, kernel_size, dilation, padding, stride, padding_mode)
    y = torch.bmm(_patches_by_position(x, g), weight.permute(2, 1, 0))  # [L, N, O]
    y = y.permute(1, 2, 0).contiguous()
    if bias is not None:
        y += bias if bias.dim() == 2 else bias[:, None]
    return y.view(_shapes.local_conv_out_shape(x, weight, g))  # (the op's own() drops the view relation)


def _grad_by_position(grad: torch.Tensor, num_blocks) -> torch.Tensor:
    """``grad`` ``[N, C_out, *out]`` as ``[L, N, C_out]`` contiguous (one small copy, so that the
    per-position matmuls read contiguous matrices: several times faster than strided ones)."""
    n, o = grad.shape[:2]
    return grad.reshape(n, o, num_blocks).permute(2, 0, 1).contiguous()


def local_conv_grad_input(grad: torch.Tensor, weight: torch.Tensor, input_size: list[int], kernel_size: list[int],
                          dilation: list[int], padding: list[int], stride: list[int],
                          padding_mode: str = "zeros") -> torch.Tensor:
    """``∂y/∂x`` applied to ``grad`` ``[N, C_out, *out]``: per position ``grad_l · W_l``, then folded."""
    g = _shapes.local_conv_grad_input_geometry(grad, weight, input_size, kernel_size, dilation, padding, stride,
                                               padding_mode)
    dcols = torch.bmm(_grad_by_position(grad, g.num_blocks), weight.permute(2, 0, 1))  # [L, N, R]
    return fold(dcols.permute(1, 2, 0), input_size, kernel_size, dilation, padding, stride, padding_mode)


def local_conv_grad_weight(grad: torch.Tensor, x: torch.Tensor, kernel_size: list[int], dilation: list[int],
                           padding: list[int], stride: list[int],
                           padding_mode: str = "zeros") -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂y/∂weight, ∂y/∂bias)`` applied to ``grad``: per position ``grad_lᵀ · patches_l`` summed over
    the batch, and ``Σ_n grad``. The weight gradient is the ``permute(1, 2, 0)`` view of a
    contiguous ``[L, C_out, C_in·∏K]`` tensor; the bias gradient is ``[C_out, L]``, per pixel."""
    g = _shapes.local_conv_grad_weight_geometry(grad, x, kernel_size, dilation, padding, stride, padding_mode)
    dw = torch.bmm(_grad_by_position(grad, g.num_blocks).transpose(1, 2), _patches_by_position(x, g))  # [L, O, R]
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    db = grad.reshape(*grad.shape[:2], g.num_blocks).sum(0, dtype=acc).to(grad.dtype)
    return dw.permute(1, 2, 0), db


# ----------------------------------------------------------------------------------------------
# convolution as a matrix: the doubly-block Toeplitz matrix of F.convNd, built from index arithmetic
def conv_matrix(weight: torch.Tensor, input_size: list[int], dilation: list[int], padding: list[int],
                stride: list[int], groups: int = 1, padding_mode: str = "zeros", layout: str = "sparse_csr",
                max_dense_elements: int | None = None) -> torch.Tensor:
    """The ``[C_out·∏out, C_in·∏input_size]`` matrix ``B`` with ``conv(x).flatten(1) == (B @ x.flatten(1).T).T``.

    Entry ``B[(o, l), (c, j)]`` is the sum of ``weight[o, c - C_in/groups·group(o), k]`` over the taps ``k``
    with which output position ``l`` reads input pixel ``j`` (after ``padding_mode``'s padding), for ``c``
    in ``o``'s group; zero elsewhere. The entries are one gather from ``weight`` (so autograd reaches it),
    placed at int64 indices computed for every ``(o, l, c, k)`` at once. Zero padding produces them sorted and
    distinct (no sort needed); the other modes are coalesced, summing the taps that the padding sends to the
    same pixel. Sparse results are coalesced; arguments are resolved as for :func:`unfold` (padding the flat
    ``[lo_0, hi_0, ...]`` list).
    """
    g = _shapes.conv_matrix_geometry(weight, input_size, dilation, padding, stride, groups, padding_mode, layout,
                                     max_dense_elements)
    rows, cols = _shapes.conv_matrix_shape(weight, g, groups)
    device, nd = weight.device, g.ndim
    c_out, c_group = weight.shape[:2]
    num_out, num_in, num_taps = g.num_blocks, math.prod(g.in_size), g.kernel_numel

    # For every (output position, tap) as a [*out, *kernel] grid: the flat input index it reads and, with
    # zero padding, whether it reads the input at all. One small [out_i, K_i] table per spatial dim, summed.
    src = torch.zeros((), dtype=torch.int64, device=device)
    inside = None
    for i in range(nd):
        n, lo, hi = g.in_size[i], g.pad_lo[i], g.pad_hi[i]
        p = (torch.arange(g.out_size[i], device=device)[:, None] * g.stride[i]
             + torch.arange(g.kernel_size[i], device=device)[None, :] * g.dilation[i])  # padded coordinate
        shape = [1] * (2 * nd)
        shape[i], shape[nd + i] = g.out_size[i], g.kernel_size[i]
        if g.padding_mode == "zeros":
            idx = p - lo
            ok = ((idx >= 0) & (idx < n)).view(shape)
            inside = ok if inside is None else inside & ok
        else:
            idx = source_index(n, lo, hi, g.padding_mode, device)[p]
        src = src + idx.view(shape) * math.prod(g.in_size[i + 1:])
    src = src.reshape(num_out, num_taps)

    # Every entry in the order (output channel, position, input channel of its group, tap): row-major in
    # (row, col), since within a row the column grows with the channel and, per channel, with the tap (each
    # coordinate grows with its tap index and the input is flattened in C order).
    o = torch.arange(c_out, device=device)
    first_channel = (o // max(c_out // groups, 1)) * c_group  # the group's first input channel
    channel = first_channel[:, None] + torch.arange(c_group, device=device)[None, :]  # [C_out, C_in/groups]
    grid = (c_out, num_out, c_group, num_taps)
    row = ((o * num_out)[:, None] + torch.arange(num_out, device=device)[None, :])[:, :, None, None].expand(grid)
    col = (channel * num_in)[:, None, :, None] + src[None, :, None, :]
    values = weight.reshape(c_out, 1, c_group, num_taps).expand(grid)  # autograd reaches weight through this
    row, col, values = row.reshape(-1), col.reshape(-1), values.reshape(-1)
    if inside is not None:  # drop the taps that land in the zero padding
        keep = inside.reshape(1, num_out, 1, num_taps).expand(grid).reshape(-1).nonzero().squeeze(1)
        row, col, values = row[keep], col[keep], values[keep]
    indices = torch.stack((row, col))
    if g.padding_mode == "zeros":
        # distinct taps of one row read distinct pixels and the order above is sorted: already coalesced
        b = torch.sparse_coo_tensor(indices, values, (rows, cols), check_invariants=False, is_coalesced=True)
    else:
        # taps that the padding sends to one pixel are summed into one entry (and sorted by (row, col) again)
        b = torch.sparse_coo_tensor(indices, values, (rows, cols), check_invariants=False).coalesce()
    if layout == "dense":
        return b.to_dense()
    if layout == "sparse_csr":
        return b.to_sparse_csr()  # keeps the int64 indices of the COO tensor
    return b


# ---------------------------------------------------------------------------------------------- masked_conv
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def masked_weight(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``weight`` with its masked entries zero (a ``where``, not ``weight·mask``: a NaN or Inf that the mask
    drops contributes nothing, as it does on the kernels, which never read an empty tile)."""
    return weight if mask is None else torch.where(mask, weight, 0)


def masked_conv(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None,
                stride: list[int], padding: list[int], dilation: list[int], groups: int,
                padding_mode: str) -> torch.Tensor:
    """``F.convNd(x, weight·mask, bias, ...)``, the padding modes read by :func:`_pad` (zeros and symmetric
    padding go straight to ``F.convNd``'s own)."""
    g = _shapes.masked_conv_geometry(x, weight, mask, bias, stride, padding, dilation, groups, padding_mode)
    if x.numel() == 0 or weight.numel() == 0:
        # an empty sum (C_in = 0, or an input of zero size that only padding is read from) or no output channel:
        # F.convNd returns [N, 0, ...] for the first and refuses the others; the result is the bias
        y = x.new_zeros(_shapes.masked_conv_out_shape(x, weight, g))
        return y if bias is None else y + bias.view(-1, *[1] * g.ndim)
    w = masked_weight(weight, mask)
    if padding_mode == "zeros" and g.pad_lo == g.pad_hi:
        return _CONV[g.ndim](x, w, bias, g.stride, g.pad_lo, g.dilation, groups)
    return _CONV[g.ndim](_pad(x, g), w, bias, g.stride, 0, g.dilation, groups)


def masked_conv_grad_input(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None,
                           input_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                           groups: int, padding_mode: str) -> torch.Tensor:
    """The input gradient of :func:`masked_conv`: the transposed convolution of ``grad`` with the masked
    weight onto the padded input, then the padding's adjoint (the border folded back onto the pixels it read)."""
    g = _shapes.geometry(tuple(input_size), tuple(weight.shape[2:]), dilation, padding, stride, padding_mode)
    padded = [n + lo + hi for n, lo, hi in zip(g.in_size, g.pad_lo, g.pad_hi)]
    shape = [grad.shape[0], weight.shape[1] * groups, *padded]
    if grad.numel() == 0 or weight.numel() == 0 or 0 in g.in_size:  # nothing to sum, or nothing to sum into:
        return grad.new_zeros([*shape[:2], *g.in_size])  # torch.nn.grad refuses some of these shapes
    dxp = _CONV_INPUT[g.ndim](shape, masked_weight(weight, mask), grad, g.stride, 0, g.dilation, groups)
    return _unpad_adjoint(dxp, g).contiguous()


def masked_conv_grad_weight(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, weight_size: list[int],
                            stride: list[int], padding: list[int], dilation: list[int], groups: int,
                            padding_mode: str) -> torch.Tensor:
    """The weight gradient of :func:`masked_conv`: the weight gradient of the dense convolution, exactly zero
    where the mask is."""
    g = _shapes.geometry(tuple(x.shape[2:]), tuple(weight_size[2:]), dilation, padding, stride, padding_mode)
    if x.numel() == 0 or grad.numel() == 0 or math.prod(weight_size) == 0:  # an empty sum (an empty input is
        return x.new_zeros(list(weight_size))  # only zero padding) or an empty dW: torch.nn.grad refuses some
    dw = _CONV_WEIGHT[g.ndim](_pad(x, g), list(weight_size), grad, g.stride, 0, g.dilation, groups)
    return masked_weight(dw, mask)
