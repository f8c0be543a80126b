"""``convzoo::extract_patches`` and ``convzoo::extract_patches_backward``: each is the other's adjoint (so
its backward) and, both being linear, its own forward-mode derivative, as unfold and fold are.

Arguments are already resolved by :mod:`convzoo.functional`: per-dim lists, padding as the flat
``[lo_0, hi_0, ...]`` list, a padding mode string, and ``groups`` dividing the channels. How they
differentiate is in :mod:`convzoo.ops._autograd`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convzoo import _shapes, reference
from convzoo.ops import _autograd
from convzoo.ops._dispatch import own, use_triton

__all__ = ["extract_patches", "extract_patches_backward"]


def _extract_patches_impl(x: Tensor, kernel_size: list[int], dilation: list[int], padding: list[int],
                          stride: list[int], padding_mode: str, groups: int) -> Tensor:
    if use_triton(x):
        from convzoo.kernels import patches as kernels

        return own(kernels.extract_patches(x, kernel_size, dilation, padding, stride, padding_mode, groups))
    return own(reference.extract_patches(x, kernel_size, dilation, padding, stride, padding_mode, groups))


_extract_patches = torch.library.custom_op("convzoo::extract_patches", mutates_args=())(_extract_patches_impl)


@_extract_patches.register_fake
def _(x, kernel_size, dilation, padding, stride, padding_mode, groups):
    g = _shapes.extract_patches_geometry(x, kernel_size, dilation, padding, stride, padding_mode, groups)
    return x.new_empty(_shapes.extract_patches_out_shape(x, g, groups))


def _backward_impl(grad: Tensor, input_size: list[int], kernel_size: list[int], dilation: list[int],
                   padding: list[int], stride: list[int], padding_mode: str, groups: int) -> Tensor:
    if use_triton(grad):
        from convzoo.kernels import patches as kernels

        return own(kernels.extract_patches_backward(grad, input_size, kernel_size, dilation, padding, stride,
                                                    padding_mode, groups))
    return own(reference.extract_patches_backward(grad, input_size, kernel_size, dilation, padding, stride,
                                                  padding_mode, groups))


_backward = torch.library.custom_op("convzoo::extract_patches_backward", mutates_args=())(_backward_impl)


@_backward.register_fake
def _(grad, input_size, kernel_size, dilation, padding, stride, padding_mode, groups):
    g = _shapes.extract_patches_backward_geometry(grad, input_size, kernel_size, dilation, padding, stride,
                                                  padding_mode, groups)
    return grad.new_empty(_shapes.extract_patches_backward_out_shape(grad, g, groups))


# ---------------------------------------------------------------------------------------------- derivatives
def _forward_setup(ctx, inputs, output):
    x, *geom = inputs
    ctx.in_size = list(x.shape[2:])
    ctx.geom = geom


def _forward_backward(ctx, grad):
    return extract_patches_backward(grad, ctx.in_size, *ctx.geom), None, None, None, None, None, None


def _forward_jvp(ctx, x_t):
    return extract_patches(x_t, *ctx.geom)


def _backward_setup(ctx, inputs, output):
    ctx.in_size = inputs[1]
    ctx.geom = inputs[2:]


def _backward_backward(ctx, grad):
    return extract_patches(grad, *ctx.geom), None, None, None, None, None, None, None


def _backward_jvp(ctx, grad_t):
    return extract_patches_backward(grad_t, ctx.in_size, *ctx.geom)


extract_patches = _autograd.differentiable(_extract_patches, _extract_patches_impl, 1, _forward_setup,
                                           _forward_backward, _forward_jvp)
extract_patches.__doc__ = """``convzoo::extract_patches(x, kernel_size, dilation, padding, stride, padding_mode,
groups)``, differentiable under every transform (resolved arguments)."""
extract_patches_backward = _autograd.differentiable(_backward, _backward_impl, 1, _backward_setup,
                                                    _backward_backward, _backward_jvp)
extract_patches_backward.__doc__ = """``convzoo::extract_patches_backward(grad, input_size, kernel_size, dilation,
padding, stride, padding_mode, groups)``, the adjoint of :func:`extract_patches`, differentiable under every
transform (resolved arguments)."""


# ---------------------------------------------------------------------------------------------- vmap
# The vmapped dim joins the batch dim N: one launch for the whole vmapped batch (see ops/unfold.py).
@_extract_patches.register_vmap
def _(info, in_dims, x, *geom):
    x = x.movedim(in_dims[0], 0)
    return _extract_patches(x.flatten(0, 1), *geom).unflatten(0, x.shape[:2]), 0


@_backward.register_vmap
def _(info, in_dims, grad, *geom):
    grad = grad.movedim(in_dims[0], 0)
    return _backward(grad.flatten(0, 1), *geom).unflatten(0, grad.shape[:2]), 0
