"""``convzoo::local_conv`` and its two backward ops, each differentiable in turn.

``y = local_conv(x, W, b)`` is linear in ``x`` and in ``(W, b)``. Its backward is two ops:
``local_conv_grad_input(grad, W)`` (linear in both) and ``local_conv_grad_weight(grad, x)``
(returning the weight and per-pixel bias gradients, bilinear). The adjoints close the family:

- ``grad_input``: d/d(grad) is ``local_conv(·, W)``, d/dW is ``grad_weight(grad, ·)``;
- ``grad_weight``: d/d(grad) is ``local_conv(x, ·, ·)``, d/dx is ``grad_input(grad, ·)``;

so gradients of any order stay on the Triton kernels. Arguments are resolved by
:mod:`convzoo.functional` (per-dim lists, flat ``[lo_0, hi_0, ...]`` padding).
"""

from __future__ import annotations

import torch
from torch import Tensor

from convzoo import _shapes, reference
from convzoo.ops._dispatch import use_triton


def _kernels():
    from convzoo.kernels import local_conv as kernels

    return kernels


# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("convzoo::local_conv", mutates_args=())
def local_conv(x: Tensor, weight: Tensor, bias: Tensor | None, kernel_size: list[int], dilation: list[int],
               padding: list[int], stride: list[int], padding_mode: str) -> Tensor:
    impl = _kernels() if use_triton(x) else reference
    return impl.local_conv(x, weight, bias, kernel_size, dilation, padding, stride, padding_mode)


@local_conv.register_fake
def _(x, weight, bias, kernel_size, dilation, padding, stride, padding_mode):
    g = _shapes.local_conv_geometry(x, weight, bias, kernel_size, dilation, padding, stride, padding_mode)
    return x.new_empty(_shapes.local_conv_out_shape(x, weight, g))


def _local_conv_setup(ctx, inputs, output):
    x, weight, bias, *geom = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dim = None if bias is None else bias.dim()
    ctx.geom = geom


def _local_conv_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.convzoo.local_conv_grad_input(grad, weight, list(x.shape[2:]), *ctx.geom)
    if ctx.needs_input_grad[1]:  # the weight-gradient kernel yields the per-pixel bias gradient too
        dw, db = torch.ops.convzoo.local_conv_grad_weight(grad, x, *ctx.geom)
    elif ctx.bias_dim is not None and ctx.needs_input_grad[2]:  # frozen weight: no W-sized kernel for Σ_n grad
        db = grad.flatten(2).sum(0)
    if ctx.bias_dim is None:
        db = None
    elif ctx.bias_dim == 1 and db is not None:
        db = db.sum(1)
    return dx, dw, db, None, None, None, None, None


local_conv.register_autograd(_local_conv_backward, setup_context=_local_conv_setup)


# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("convzoo::local_conv_grad_input", mutates_args=())
def local_conv_grad_input(grad: Tensor, weight: Tensor, input_size: list[int], kernel_size: list[int],
                          dilation: list[int], padding: list[int], stride: list[int], padding_mode: str) -> Tensor:
    impl = _kernels() if use_triton(grad) else reference
    return impl.local_conv_grad_input(grad, weight, input_size, kernel_size, dilation, padding, stride, padding_mode)


@local_conv_grad_input.register_fake
def _(grad, weight, input_size, kernel_size, dilation, padding, stride, padding_mode):
    g = _shapes.local_conv_grad_input_geometry(grad, weight, input_size, kernel_size, dilation, padding, stride,
                                               padding_mode)
    return grad.new_empty((grad.shape[0], weight.shape[1] // g.kernel_numel, *input_size))


def _grad_input_setup(ctx, inputs, output):
    grad, weight, _input_size, *geom = inputs
    ctx.save_for_backward(grad, weight)
    ctx.geom = geom


def _grad_input_backward(ctx, u):
    grad, weight = ctx.saved_tensors
    d_grad = d_weight = None
    if ctx.needs_input_grad[0]:
        d_grad = torch.ops.convzoo.local_conv(u, weight, None, *ctx.geom)
    if ctx.needs_input_grad[1]:
        d_weight, _ = torch.ops.convzoo.local_conv_grad_weight(grad, u, *ctx.geom)
    return d_grad, d_weight, None, None, None, None, None, None


local_conv_grad_input.register_autograd(_grad_input_backward, setup_context=_grad_input_setup)


# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("convzoo::local_conv_grad_weight", mutates_args=())
def local_conv_grad_weight(grad: Tensor, x: Tensor, kernel_size: list[int], dilation: list[int],
                           padding: list[int], stride: list[int], padding_mode: str) -> tuple[Tensor, Tensor]:
    impl = _kernels() if use_triton(x) else reference
    return impl.local_conv_grad_weight(grad, x, kernel_size, dilation, padding, stride, padding_mode)


@local_conv_grad_weight.register_fake
def _(grad, x, kernel_size, dilation, padding, stride, padding_mode):
    g = _shapes.local_conv_grad_weight_geometry(grad, x, kernel_size, dilation, padding, stride, padding_mode)
    w_shape, b_shape = _shapes.local_conv_grad_weight_shapes(grad, x, g)
    return x.new_empty(w_shape).permute(1, 2, 0), x.new_empty(b_shape)


def _grad_weight_setup(ctx, inputs, output):
    grad, x, *geom = inputs
    ctx.save_for_backward(grad, x)
    ctx.geom = geom


def _grad_weight_backward(ctx, u_weight, u_bias):
    grad, x = ctx.saved_tensors
    d_grad = d_x = None
    if ctx.needs_input_grad[0]:
        if u_weight is not None:
            d_grad = torch.ops.convzoo.local_conv(x, u_weight, u_bias, *ctx.geom)
        elif u_bias is not None:
            d_grad = u_bias.view(1, *grad.shape[1:]).expand_as(grad).contiguous()
    if ctx.needs_input_grad[1] and u_weight is not None:
        d_x = torch.ops.convzoo.local_conv_grad_input(grad, u_weight, list(x.shape[2:]), *ctx.geom)
    return d_grad, d_x, None, None, None, None, None


local_conv_grad_weight.register_autograd(_grad_weight_backward, setup_context=_grad_weight_setup)
