"""``convzoo::unfold`` and ``convzoo::fold``: each is the other's backward and, both being linear,
its own forward-mode derivative.

Arguments are already resolved by :mod:`convzoo.functional`: per-dim lists, padding as the flat
``[lo_0, hi_0, ...]`` list, and a padding mode string. :func:`unfold` and :func:`fold` are the entry
points; how they differentiate is in :mod:`convzoo.ops._autograd`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convzoo import _shapes, reference
from convzoo.ops import _autograd, _native
from convzoo.ops._dispatch import own, use_triton

__all__ = ["fold", "unfold"]


def _unfold_impl(x: Tensor, kernel_size: list[int], dilation: list[int], padding: list[int], stride: list[int],
                 padding_mode: str) -> Tensor:
    if use_triton(x):
        from convzoo.kernels import unfold as kernels

        return own(kernels.unfold(x, kernel_size, dilation, padding, stride, padding_mode))
    out = _native.unfold(x, kernel_size, dilation, padding, stride, padding_mode)
    return own(reference.unfold(x, kernel_size, dilation, padding, stride, padding_mode) if out is None else out)


_unfold = torch.library.custom_op("convzoo::unfold", mutates_args=())(_unfold_impl)


@_unfold.register_fake
def _(x, kernel_size, dilation, padding, stride, padding_mode):
    g = _shapes.unfold_geometry(x, kernel_size, dilation, padding, stride, padding_mode)
    return x.new_empty(_shapes.unfold_out_shape(x, g))


def _fold_impl(cols: Tensor, output_size: list[int], kernel_size: list[int], dilation: list[int],
               padding: list[int], stride: list[int], padding_mode: str) -> Tensor:
    if use_triton(cols):
        from convzoo.kernels import unfold as kernels

        return own(kernels.fold(cols, output_size, kernel_size, dilation, padding, stride, padding_mode))
    out = _native.fold(cols, output_size, kernel_size, dilation, padding, stride, padding_mode)
    if out is None:
        out = reference.fold(cols, output_size, kernel_size, dilation, padding, stride, padding_mode)
    return own(out)


_fold = torch.library.custom_op("convzoo::fold", mutates_args=())(_fold_impl)


@_fold.register_fake
def _(cols, output_size, kernel_size, dilation, padding, stride, padding_mode):
    g = _shapes.fold_geometry(cols, output_size, kernel_size, dilation, padding, stride, padding_mode)
    return cols.new_empty(_shapes.fold_out_shape(cols, g))


# ---------------------------------------------------------------------------------------------- derivatives
def _unfold_setup(ctx, inputs, output):
    x, *geom = inputs
    ctx.in_size = list(x.shape[2:])
    ctx.geom = geom


def _unfold_backward(ctx, grad):
    return fold(grad, ctx.in_size, *ctx.geom), None, None, None, None, None


def _fold_setup(ctx, inputs, output):
    ctx.geom = inputs[2:]
    ctx.out_size = inputs[1]


def _fold_backward(ctx, grad):
    return unfold(grad, *ctx.geom), None, None, None, None, None, None


def _unfold_jvp(ctx, x_t):
    return unfold(x_t, *ctx.geom)


def _fold_jvp(ctx, cols_t):
    return fold(cols_t, ctx.out_size, *ctx.geom)


unfold = _autograd.differentiable(_unfold, _unfold_impl, 1, _unfold_setup, _unfold_backward, _unfold_jvp)
unfold.__doc__ = """``convzoo::unfold(x, kernel_size, dilation, padding, stride, padding_mode)``, differentiable
under every transform (resolved arguments)."""
fold = _autograd.differentiable(_fold, _fold_impl, 1, _fold_setup, _fold_backward, _fold_jvp)
fold.__doc__ = """``convzoo::fold(cols, output_size, kernel_size, dilation, padding, stride, padding_mode)``,
differentiable under every transform (resolved arguments)."""


# ---------------------------------------------------------------------------------------------- vmap
# The vmapped dim joins the batch dim N: one launch for the whole vmapped batch. Rules call the custom
# ops themselves: functorch runs them below the vmap level, where no autograd.Function may be applied.
@_unfold.register_vmap
def _(info, in_dims, x, *geom):
    x = x.movedim(in_dims[0], 0)
    return _unfold(x.flatten(0, 1), *geom).unflatten(0, x.shape[:2]), 0


@_fold.register_vmap
def _(info, in_dims, cols, *geom):
    cols = cols.movedim(in_dims[0], 0)
    return _fold(cols.flatten(0, 1), *geom).unflatten(0, cols.shape[:2]), 0

