"""Locally connected convolution (a convolution without weight sharing)."""

from __future__ import annotations

import math

import torch

from convzoo import _shapes
from convzoo.functional._args import _as_lists, _autocast, _batched_unfold_args
from convzoo.ops import local_conv as _local_conv_ops


def local_conv(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, kernel_size,
               stride=1, padding=0, dilation=1, padding_mode: str = "zeros") -> torch.Tensor:
    """Locally connected convolution: a convolution without weight sharing.

    Output position ``l`` of channel ``o`` is the Frobenius inner product of the input patch at
    ``l`` with that position's own filter ``weight[o, :, l]``, plus a bias:
    ``y[n, o, l] = Σ_r unfold(input)[n, r, l] · weight[o, r, l] + bias[o, l]``, i.e. hypnettorch's
    ``einsum('nkl,okl->nol', unfold(x), W) + bias``, for 1, 2 or 3 spatial dims. The patches are
    gathered inside the kernels and never written to memory (on the CPU path: one unfold and a
    matmul per position, never the ``[N, C_out, C_in·∏K, L]`` broadcast).

    Args:
        input: ``[N, C_in, *spatial]``, floating dtype, any strides; or unbatched ``[C_in, *spatial]``
            when a tuple argument tells the rank (as for :func:`unfold`).
        weight: ``[C_out, C_in·∏kernel_size, L]`` with rows in :func:`unfold` order ``(c, k_0, ...)``
            and L the output positions in row-major order; any strides. Physically ``[L, C_out, C_in·∏K]``
            (a ``permute(1, 2, 0)`` of a contiguous tensor; :class:`convzoo.LocalConv2d` keeps this layout)
            is read in place; any other layout, hypnettorch's contiguous one included, costs one
            transposing copy of W per call (and one of its gradient).
        bias: ``[C_out, L]`` (per pixel), ``[C_out]`` (per channel) or None.
        kernel_size, stride, dilation: int or one int per spatial dim; positive.
        padding: int, per-dim ints, per-dim ``(lo, hi)`` pairs, ``'valid'`` or ``'same'``.
        padding_mode: ``'zeros'``, ``'circular'``, ``'reflect'`` or ``'replicate'``.

    Returns:
        ``[N, C_out, *out_spatial]`` (``[C_out, *out_spatial]`` for an unbatched input), contiguous.
        Under ``torch.autocast`` the op computes in the autocast dtype, tensors cast as ``F.conv2d``'s
        are (float64 ones stay float64); otherwise all dtypes must match.

    Raises:
        TypeError: a non-floating tensor, or ``weight``/``bias`` dtypes differing from the input's.
        ValueError: ``weight``/``bias`` shapes that do not match the input channels, the kernel or
            the number of output positions, or an invalid geometry (see :func:`unfold`).
    """
    batched, args = _batched_unfold_args(input, kernel_size, dilation, padding, stride, padding_mode)
    if not batched:
        return local_conv(input[None], weight, bias, kernel_size=kernel_size, stride=stride, padding=padding,
                          dilation=dilation, padding_mode=padding_mode)[0]
    _shapes.check_float_tensor(weight, "weight")
    if bias is not None:
        _shapes.check_float_tensor(bias, "bias")
    ks, dil, pad, st, mode = _as_lists(args)
    _check_not_unbatched(input, weight, ks)
    input, weight, bias = _autocast(input, weight, bias)
    if weight.dim() == 3 and not weight.permute(2, 0, 1).is_contiguous():  # one copy, not a strided matmul
        weight = _local_conv_ops.position_major(weight)
    return _local_conv_ops.local_conv(input, weight, bias, ks, dil, pad, st, mode)


def _check_not_unbatched(input: torch.Tensor, weight: torch.Tensor, kernel_size) -> None:
    """An int-only geometry reads a 3-d (4-d) input as a batch of 1-d (2-d) signals; when the weight says it
    is an unbatched 2-d (3-d) input instead, say so, naming the input, before the weight check does."""
    if weight.dim() != 3 or input.dim() > 4 or weight.shape[1] == input.shape[1] * math.prod(kernel_size):
        return
    k, nd = kernel_size[0], input.dim() - 1
    if all(e == k for e in kernel_size) and weight.shape[1] == input.shape[0] * k**nd:
        raise ValueError(
            f"input of shape {tuple(input.shape)} is read as a batched {nd - 1}-d input [N, C, *spatial] because "
            f"every geometry argument is an int, but the weight fits an unbatched {nd}-d input [C, *spatial]: "
            f"pass kernel_size as a {nd}-tuple, or add the batch dim (input.unsqueeze(0))")
