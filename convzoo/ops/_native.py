"""torch's own CPU im2col/col2im, for the small calls where they compute exactly what :mod:`convzoo.reference`
does: 1-d and 2-d, ``'zeros'`` padding with the same padding on both sides, a non-empty input. There the
reference's pad-window-permute (or tap-by-tap scatter, for fold) costs several times more host time
than the one ATen call. On large calls ATen's single-threaded loops lose to the reference's few large
copies (2-d unfold of N8 C64 32×32 k3: 6.6 ms vs 1.3 ms; fold 4.3 vs 2.9 ms, one thread), so only calls
below a measured crossover take them. Each returns None where it does not apply; :mod:`convzoo.reference`
then runs.

Bitwise the same as the reference: unfold moves data; col2im adds each output's taps in the order
``(c, k_0, k_1)``, from zero, as the reference does, so fold's float32/float64 sums are the same sums;
half-precision inputs are summed in float32 and rounded once, as in the reference and the kernel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from convzoo import _compat, _shapes, reference

_WIDE = (torch.float32, torch.float64)
# column-matrix elements below which ATen's call wins on a CPU core; crossovers measured (2-core x86,
# one thread, fp32, k3 p1): unfold ≈ 20K elements, fold ≈ 200K (col2im's tap loop is the reference's too)
_SMALL_UNFOLD = 1 << 14
_SMALL_FOLD = 1 << 17


def _covered(t: Tensor, padding, padding_mode: str) -> bool:
    return (_compat.im2col is not None and t.device.type == "cpu" and padding_mode == "zeros" and t.numel() > 0
            and len(padding) in (2, 4) and padding[0::2] == padding[1::2])


def _as_2d(kernel_size, dilation, padding, stride) -> tuple[list, list, list, list]:
    """The 2-d ATen arguments, a 1-d call being a 2-d one over a unit height."""
    if len(kernel_size) == 2:
        return list(kernel_size), list(dilation), list(padding[0::2]), list(stride)
    return [1, kernel_size[0]], [1, dilation[0]], [0, padding[0]], [1, stride[0]]


def unfold(x: Tensor, kernel_size, dilation, padding, stride, padding_mode: str) -> Tensor | None:
    """``reference.unfold(x, ...)`` through torch's im2col (:data:`convzoo._compat.im2col`), or None where that
    does not apply.

    Raises:
        ValueError, TypeError: as :func:`convzoo._shapes.unfold_geometry` (the same checks, first).
    """
    if not _covered(x, padding, padding_mode) or x.numel() * math.prod(kernel_size) > _SMALL_UNFOLD:
        return None
    _shapes.unfold_geometry(x, kernel_size, dilation, padding, stride, padding_mode)
    ks, dil, pad, st = _as_2d(kernel_size, dilation, padding, stride)
    return _compat.im2col(x if x.dim() == 4 else x.unsqueeze(2), ks, dil, pad, st)


def fold(cols: Tensor, output_size, kernel_size, dilation, padding, stride, padding_mode: str) -> Tensor | None:
    """``reference.fold(cols, ...)`` through torch's col2im (:data:`convzoo._compat.col2im`), or None where that
    does not apply.

    Raises:
        ValueError, TypeError: as :func:`convzoo._shapes.fold_geometry` (the same checks, first).
    """
    if not _covered(cols, padding, padding_mode) or cols.numel() > _SMALL_FOLD:
        return None
    _shapes.fold_geometry(cols, output_size, kernel_size, dilation, padding, stride, padding_mode)
    ks, dil, pad, st = _as_2d(kernel_size, dilation, padding, stride)
    size = list(output_size) if len(output_size) == 2 else [1, output_size[0]]
    wide = cols if cols.dtype in _WIDE else cols.float()
    out = _compat.col2im(wide, size, ks, dil, pad, st).to(cols.dtype)
    return out if len(output_size) == 2 else out.squeeze(2)


# ---------------------------------------------------------------------------------------------- local_conv
# The reference's local_conv family with the patch matrices from im2col instead of its pad-window-permute:
# the same [L, N, C·∏K] contiguous matrices, the same bmm calls, so the same results bit for bit. im2col
# writes [N, C·∏K, L], so these matrices cost two patch-sized buffers where the reference's gather costs one:
# only for small calls, where the host time is the cost and the second buffer is small.
_SMALL_PATCHES = 1 << 16  # elements of the patch matrix (256 KiB in float32)


def _small_patches(x: Tensor, kernel_size) -> bool:
    return x.numel() * math.prod(kernel_size) <= _SMALL_PATCHES  # ≈ the patch matrix at stride 1


def _patches_by_position(x: Tensor, kernel_size, dilation, padding, stride) -> Tensor:
    ks, dil, pad, st = _as_2d(kernel_size, dilation, padding, stride)
    cols = _compat.im2col(x if x.dim() == 4 else x.unsqueeze(2), ks, dil, pad, st)
    return cols.permute(2, 0, 1).contiguous()


def _grad_by_position(grad: Tensor) -> Tensor:
    return grad.flatten(2).permute(2, 0, 1).contiguous()


def local_conv(x: Tensor, weight: Tensor, bias: Tensor | None, kernel_size, dilation, padding, stride,
               padding_mode: str) -> Tensor | None:
    """``reference.local_conv(x, ...)`` with im2col patches, or None where :func:`unfold` does not apply or
    the patches are not small.

    Raises:
        ValueError, TypeError: as :func:`convzoo._shapes.local_conv_geometry` (the same checks, first).
    """
    if not (_covered(x, padding, padding_mode) and _small_patches(x, kernel_size)):
        return None
    g = _shapes.local_conv_geometry(x, weight, bias, kernel_size, dilation, padding, stride, padding_mode)
    y = torch.bmm(_patches_by_position(x, kernel_size, dilation, padding, stride), weight.permute(2, 1, 0))
    # [L, N, O] -> [N, O, *out] (+ bias) in one pass, into a tensor of its own: the output must not be a
    # view of a temporary (autograd would refuse in-place ops on it; see convzoo.ops._dispatch.own). Runs
    # below autograd (inside the op), so out= is fine; the reference stays differentiable as an oracle.
    out = y.new_empty(_shapes.local_conv_out_shape(x, weight, g))
    flat = out.view(y.shape[1], y.shape[2], y.shape[0])
    if bias is None:
        flat.copy_(y.permute(1, 2, 0))
    else:  # [O, L] or [O]
        torch.add(y.permute(1, 2, 0), bias if bias.dim() == 2 else bias[:, None], out=flat)
    return out


def local_conv_grad_input(grad: Tensor, weight: Tensor, input_size, kernel_size, dilation, padding, stride,
                          padding_mode: str) -> Tensor | None:
    """``reference.local_conv_grad_input(grad, ...)`` folded by col2im, or None where :func:`fold` does not apply.

    Raises:
        ValueError, TypeError: as :func:`convzoo._shapes.local_conv_grad_input_geometry`.
    """
    if not _covered(grad, padding, padding_mode) or not 1 <= len(input_size) <= 2 or min(input_size) <= 0 \
            or grad.shape[0] * weight.shape[1] * weight.shape[2] > _SMALL_FOLD:  # the columns it folds
        return None
    _shapes.local_conv_grad_input_geometry(grad, weight, input_size, kernel_size, dilation, padding, stride,
                                           padding_mode)
    dcols = torch.bmm(_grad_by_position(grad), weight.permute(2, 0, 1))  # [L, N, R]
    return fold(dcols.permute(1, 2, 0), input_size, kernel_size, dilation, padding, stride, padding_mode)


def local_conv_grad_weight(grad: Tensor, x: Tensor, kernel_size, dilation, padding, stride,
                           padding_mode: str) -> tuple[Tensor, Tensor] | None:
    """``reference.local_conv_grad_weight(grad, x, ...)`` with im2col patches, or None where :func:`unfold`
    does not apply or the patches are not small.

    Raises:
        ValueError, TypeError: as :func:`convzoo._shapes.local_conv_grad_weight_geometry`.
    """
    if not (_covered(x, padding, padding_mode) and _small_patches(x, kernel_size)):
        return None
    g = _shapes.local_conv_grad_weight_geometry(grad, x, kernel_size, dilation, padding, stride, padding_mode)
    dw = torch.bmm(_grad_by_position(grad).transpose(1, 2),
                   _patches_by_position(x, kernel_size, dilation, padding, stride))  # [L, O, R]
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    db = grad.reshape(*grad.shape[:2], g.num_blocks).sum(0, dtype=acc).to(grad.dtype)
    return dw.permute(1, 2, 0), db


# ---------------------------------------------------------------------------------------------- patch_covariance
def patch_covariance(x: Tensor, kernel_size, stride, padding, dilation, padding_mode: str, groups: int, bias: bool,
                     out: Tensor | None, alpha: float, coef: float) -> Tensor | None:
    """``reference.patch_covariance`` of a convolution (not transposed) with the patch matrix from one im2col,
    or None where :func:`unfold` does not apply. The same factor up to the summation order (one matmul over
    all columns instead of one per chunk); for small calls, where the reference's chunking costs more host
    time than the work."""
    if not _covered(x, padding, padding_mode) or x.numel() * math.prod(kernel_size) > _SMALL_UNFOLD:
        return None
    _shapes.unfold_geometry(x, kernel_size, dilation, padding, stride, padding_mode)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    ks, dil, pad, st = _as_2d(kernel_size, dilation, padding, stride)
    cols = _compat.im2col(x if x.dim() == 4 else x.unsqueeze(2), ks, dil, pad, st)  # [N, C·K, L]
    n, rows, num = cols.shape
    d = rows // groups
    p = cols.new_empty((groups, d, n, num), dtype=dtype)
    p.copy_(cols.view(n, groups, d, num).permute(1, 2, 0, 3))
    read_out = out is not None and alpha != 0.0
    if out is None:
        out = x.new_empty((groups, d + bias, d + bias), dtype=dtype)
    return reference.gram_into(out, [p.view(groups, d, n * num)], bias, alpha if read_out else 0.0, coef)
