"""torch's own CPU im2col/col2im, for the calls where they compute exactly what :mod:`convzoo.reference`
does: 1-d and 2-d, ``'zeros'`` padding with the same padding on both sides, a non-empty input. There the
reference's pad-window-permute (or tap-by-tap scatter, for fold) costs several times more host time
than the one ATen call. Each returns None where it does not apply; :mod:`convzoo.reference` then runs.

Bitwise the same as the reference: unfold moves data; col2im adds each output's taps in the order
``(c, k_0, k_1)``, from zero, as the reference does, so fold's float32/float64 sums are the same sums;
half-precision inputs are summed in float32 and rounded once, as in the reference and the kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convzoo import _shapes

_WIDE = (torch.float32, torch.float64)


def _covered(t: Tensor, padding, padding_mode: str) -> bool:
    return (t.device.type == "cpu" and padding_mode == "zeros" and t.numel() > 0
            and len(padding) in (2, 4) and padding[0::2] == padding[1::2])


def _as_2d(kernel_size, dilation, padding, stride) -> tuple[list, list, list, list]:
    """The 2-d ATen arguments, a 1-d call being a 2-d one over a unit height."""
    if len(kernel_size) == 2:
        return list(kernel_size), list(dilation), list(padding[0::2]), list(stride)
    return [1, kernel_size[0]], [1, dilation[0]], [0, padding[0]], [1, stride[0]]


def unfold(x: Tensor, kernel_size, dilation, padding, stride, padding_mode: str) -> Tensor | None:
    """``reference.unfold(x, ...)`` through ``torch._C._nn.im2col``, or None where that does not apply.

    Raises:
        ValueError, TypeError: as :func:`convzoo._shapes.unfold_geometry` (the same checks, first).
    """
    if not _covered(x, padding, padding_mode):
        return None
    _shapes.unfold_geometry(x, kernel_size, dilation, padding, stride, padding_mode)
    ks, dil, pad, st = _as_2d(kernel_size, dilation, padding, stride)
    return torch._C._nn.im2col(x if x.dim() == 4 else x.unsqueeze(2), ks, dil, pad, st)


def fold(cols: Tensor, output_size, kernel_size, dilation, padding, stride, padding_mode: str) -> Tensor | None:
    """``reference.fold(cols, ...)`` through ``torch._C._nn.col2im``, or None where that does not apply.

    Raises:
        ValueError, TypeError: as :func:`convzoo._shapes.fold_geometry` (the same checks, first).
    """
    if not _covered(cols, padding, padding_mode):
        return None
    _shapes.fold_geometry(cols, output_size, kernel_size, dilation, padding, stride, padding_mode)
    ks, dil, pad, st = _as_2d(kernel_size, dilation, padding, stride)
    size = list(output_size) if len(output_size) == 2 else [1, output_size[0]]
    wide = cols if cols.dtype in _WIDE else cols.float()
    out = torch._C._nn.col2im(wide, size, ks, dil, pad, st).to(cols.dtype)
    return out if len(output_size) == 2 else out.squeeze(2)
