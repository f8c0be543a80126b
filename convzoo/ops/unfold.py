"""``convzoo::unfold`` and ``convzoo::fold``: each is the other's backward.

Arguments are already resolved by :mod:`convzoo.functional`: per-dim lists, padding as the flat
``[lo_0, hi_0, ...]`` list, and a padding mode string.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convzoo import _shapes, reference
from convzoo.ops._dispatch import use_triton


@torch.library.custom_op("convzoo::unfold", mutates_args=())
def unfold(x: Tensor, kernel_size: list[int], dilation: list[int], padding: list[int], stride: list[int],
           padding_mode: str) -> Tensor:
    if use_triton(x):
        from convzoo.kernels import unfold as kernels

        return kernels.unfold(x, kernel_size, dilation, padding, stride, padding_mode)
    return reference.unfold(x, kernel_size, dilation, padding, stride, padding_mode)


@unfold.register_fake
def _(x, kernel_size, dilation, padding, stride, padding_mode):
    g = _shapes.unfold_geometry(x, kernel_size, dilation, padding, stride, padding_mode)
    return x.new_empty(_shapes.unfold_out_shape(x, g))


def _unfold_setup(ctx, inputs, output):
    x, *geom = inputs
    ctx.in_size = list(x.shape[2:])
    ctx.geom = geom


def _unfold_backward(ctx, grad):
    return torch.ops.convzoo.fold(grad, ctx.in_size, *ctx.geom), None, None, None, None, None


unfold.register_autograd(_unfold_backward, setup_context=_unfold_setup)


@torch.library.custom_op("convzoo::fold", mutates_args=())
def fold(cols: Tensor, output_size: list[int], kernel_size: list[int], dilation: list[int], padding: list[int],
         stride: list[int], padding_mode: str) -> Tensor:
    if use_triton(cols):
        from convzoo.kernels import unfold as kernels

        return kernels.fold(cols, output_size, kernel_size, dilation, padding, stride, padding_mode)
    return reference.fold(cols, output_size, kernel_size, dilation, padding, stride, padding_mode)


@fold.register_fake
def _(cols, output_size, kernel_size, dilation, padding, stride, padding_mode):
    g = _shapes.fold_geometry(cols, output_size, kernel_size, dilation, padding, stride, padding_mode)
    return cols.new_empty(_shapes.fold_out_shape(cols, g))


def _fold_setup(ctx, inputs, output):
    ctx.geom = inputs[2:]


def _fold_backward(ctx, grad):
    return torch.ops.convzoo.unfold(grad, *ctx.geom), None, None, None, None, None, None


fold.register_autograd(_fold_backward, setup_context=_fold_setup)
