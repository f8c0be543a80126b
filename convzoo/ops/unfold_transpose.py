"""``convzoo::unfold_transpose`` and ``convzoo::unfold_transpose_backward``: each is the other's adjoint
(so its backward) and, both being linear, its own forward-mode derivative, as unfold and fold are.

Arguments are already resolved by :mod:`convzoo.functional`: per-dim lists, ``output_size`` already
turned into ``output_padding``. How they differentiate is in :mod:`convzoo.ops._autograd`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convzoo import _shapes, reference
from convzoo.ops import _autograd
from convzoo.ops._dispatch import own, use_triton

__all__ = ["unfold_transpose", "unfold_transpose_backward"]


def _unfold_transpose_impl(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                           output_padding: list[int], dilation: list[int]) -> Tensor:
    if use_triton(x):
        from convzoo.kernels import unfold_transpose as kernels

        return own(kernels.unfold_transpose(x, kernel_size, stride, padding, output_padding, dilation))
    return own(reference.unfold_transpose(x, kernel_size, stride, padding, output_padding, dilation))


_unfold_transpose = torch.library.custom_op("convzoo::unfold_transpose", mutates_args=())(_unfold_transpose_impl)


@_unfold_transpose.register_fake
def _(x, kernel_size, stride, padding, output_padding, dilation):
    g = _shapes.unfold_transpose_geometry(x, kernel_size, stride, padding, output_padding, dilation)
    return x.new_empty(_shapes.unfold_transpose_out_shape(x, g))


def _backward_impl(cols: Tensor, input_size: list[int], kernel_size: list[int], stride: list[int],
                   padding: list[int], output_padding: list[int], dilation: list[int]) -> Tensor:
    if use_triton(cols):
        from convzoo.kernels import unfold_transpose as kernels

        return own(kernels.unfold_transpose_backward(cols, input_size, kernel_size, stride, padding,
                                                     output_padding, dilation))
    return own(reference.unfold_transpose_backward(cols, input_size, kernel_size, stride, padding, output_padding,
                                                   dilation))


_backward = torch.library.custom_op("convzoo::unfold_transpose_backward", mutates_args=())(_backward_impl)


@_backward.register_fake
def _(cols, input_size, kernel_size, stride, padding, output_padding, dilation):
    g = _shapes.unfold_transpose_backward_geometry(cols, input_size, kernel_size, stride, padding, output_padding,
                                                   dilation)
    return cols.new_empty(_shapes.unfold_transpose_backward_out_shape(cols, g))


# ---------------------------------------------------------------------------------------------- derivatives
def _forward_setup(ctx, inputs, output):
    x, *geom = inputs
    ctx.in_size = list(x.shape[2:])
    ctx.geom = geom


def _forward_backward(ctx, grad):
    return unfold_transpose_backward(grad, ctx.in_size, *ctx.geom), None, None, None, None, None


def _forward_jvp(ctx, x_t):
    return unfold_transpose(x_t, *ctx.geom)


def _backward_setup(ctx, inputs, output):
    ctx.in_size = inputs[1]
    ctx.geom = inputs[2:]


def _backward_backward(ctx, grad):
    return unfold_transpose(grad, *ctx.geom), None, None, None, None, None, None


def _backward_jvp(ctx, cols_t):
    return unfold_transpose_backward(cols_t, ctx.in_size, *ctx.geom)


unfold_transpose = _autograd.differentiable(_unfold_transpose, _unfold_transpose_impl, 1, _forward_setup,
                                            _forward_backward, _forward_jvp)
unfold_transpose.__doc__ = """``convzoo::unfold_transpose(x, kernel_size, stride, padding, output_padding,
dilation)``, differentiable under every transform (resolved arguments)."""
unfold_transpose_backward = _autograd.differentiable(_backward, _backward_impl, 1, _backward_setup,
                                                     _backward_backward, _backward_jvp)
unfold_transpose_backward.__doc__ = """``convzoo::unfold_transpose_backward(cols, input_size, kernel_size, stride,
padding, output_padding, dilation)``, the adjoint of :func:`unfold_transpose`, differentiable under every
transform (resolved arguments)."""


# ---------------------------------------------------------------------------------------------- vmap
# The vmapped dim joins the batch dim N: one launch for the whole vmapped batch (see ops/unfold.py).
@_unfold_transpose.register_vmap
def _(info, in_dims, x, *geom):
    x = x.movedim(in_dims[0], 0)
    return _unfold_transpose(x.flatten(0, 1), *geom).unflatten(0, x.shape[:2]), 0


@_backward.register_vmap
def _(info, in_dims, cols, *geom):
    cols = cols.movedim(in_dims[0], 0)
    return _backward(cols.flatten(0, 1), *geom).unflatten(0, cols.shape[:2]), 0
