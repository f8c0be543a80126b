"""``convzoo::local_conv`` and its two backward ops, each differentiable in turn, in both modes.

``y = local_conv(x, W, b)`` is linear in ``x`` and in ``(W, b)``. Its backward is two ops:
``local_conv_grad_input(grad, W)`` (linear in both) and ``local_conv_grad_weight(grad, x)``
(returning the weight and per-pixel bias gradients, bilinear). The adjoints close the family:

- ``grad_input``: d/d(grad) is ``local_conv(·, W)``, d/dW is ``grad_weight(grad, ·)``;
- ``grad_weight``: d/d(grad) is ``local_conv(x, ·, ·)``, d/dx is ``grad_input(grad, ·)``;

so gradients of any order stay on the Triton kernels, and so do forward-mode tangents: each op
being bilinear, its tangent is the sum of the op applied with one argument replaced by its tangent.
Arguments are resolved by :mod:`convzoo.functional` (per-dim lists, flat ``[lo_0, hi_0, ...]``
padding). :func:`local_conv`, :func:`local_conv_grad_input` and :func:`local_conv_grad_weight` are
the entry points; how they differentiate is in :mod:`convzoo.ops._autograd`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from convzoo import _shapes, reference
from convzoo.ops import _autograd, _native
from convzoo.ops._dispatch import own, use_triton

__all__ = ["local_conv", "local_conv_grad_input", "local_conv_grad_weight", "position_major"]


def _kernels():
    from convzoo.kernels import local_conv as kernels

    return kernels


# ----------------------------------------------------------------------------------------------
def _local_conv_impl(x: Tensor, weight: Tensor, bias: Tensor | None, kernel_size: list[int], dilation: list[int],
                     padding: list[int], stride: list[int], padding_mode: str) -> Tensor:
    if use_triton(x):
        return own(_kernels().local_conv(x, weight, bias, kernel_size, dilation, padding, stride, padding_mode))
    out = _native.local_conv(x, weight, bias, kernel_size, dilation, padding, stride, padding_mode)
    if out is None:
        out = reference.local_conv(x, weight, bias, kernel_size, dilation, padding, stride, padding_mode)
    return own(out)


_local_conv = torch.library.custom_op("convzoo::local_conv", mutates_args=())(_local_conv_impl)


@_local_conv.register_fake
def _(x, weight, bias, kernel_size, dilation, padding, stride, padding_mode):
    g = _shapes.local_conv_geometry(x, weight, bias, kernel_size, dilation, padding, stride, padding_mode)
    return x.new_empty(_shapes.local_conv_out_shape(x, weight, g))


def _local_conv_grad_input_impl(grad: Tensor, weight: Tensor, input_size: list[int], kernel_size: list[int],
                                dilation: list[int], padding: list[int], stride: list[int],
                                padding_mode: str) -> Tensor:
    args = (grad, weight, input_size, kernel_size, dilation, padding, stride, padding_mode)
    if use_triton(grad):
        return own(_kernels().local_conv_grad_input(*args))
    out = _native.local_conv_grad_input(*args)
    return own(reference.local_conv_grad_input(*args) if out is None else out)


_local_conv_grad_input = torch.library.custom_op("convzoo::local_conv_grad_input",
                                                 mutates_args=())(_local_conv_grad_input_impl)


@_local_conv_grad_input.register_fake
def _(grad, weight, input_size, kernel_size, dilation, padding, stride, padding_mode):
    g = _shapes.local_conv_grad_input_geometry(grad, weight, input_size, kernel_size, dilation, padding, stride,
                                               padding_mode)
    return grad.new_empty((grad.shape[0], weight.shape[1] // g.kernel_numel, *input_size))


def _local_conv_grad_weight_impl(grad: Tensor, x: Tensor, kernel_size: list[int], dilation: list[int],
                                 padding: list[int], stride: list[int], padding_mode: str) -> tuple[Tensor, Tensor]:
    args = (grad, x, kernel_size, dilation, padding, stride, padding_mode)
    if use_triton(x):
        dw, db = _kernels().local_conv_grad_weight(*args)
    else:
        out = _native.local_conv_grad_weight(*args)
        dw, db = reference.local_conv_grad_weight(*args) if out is None else out
    return own(dw), own(db)


_local_conv_grad_weight = torch.library.custom_op("convzoo::local_conv_grad_weight",
                                                  mutates_args=())(_local_conv_grad_weight_impl)


@_local_conv_grad_weight.register_fake
def _(grad, x, kernel_size, dilation, padding, stride, padding_mode):
    g = _shapes.local_conv_grad_weight_geometry(grad, x, kernel_size, dilation, padding, stride, padding_mode)
    w_shape, b_shape = _shapes.local_conv_grad_weight_shapes(grad, x, g)
    return x.new_empty(w_shape).permute(1, 2, 0), x.new_empty(b_shape)


def _bias_as_output(bias: Tensor, shape) -> Tensor:
    """A ``[C_out, L]`` or ``[C_out]`` bias broadcast to the output shape ``[N, C_out, *out]``."""
    view = (1, *shape[1:]) if bias.dim() == 2 else (1, shape[1], *([1] * (len(shape) - 2)))
    return _autograd.broadcast(bias, view, shape)


# ---------------------------------------------------------------------------------------------- local_conv
def _local_conv_setup(ctx, inputs, output):
    x, weight, bias, *geom = inputs
    ctx.save_for_backward(x, weight)
    ctx.save_for_forward(x, weight)
    ctx.bias_dim = None if bias is None else bias.dim()
    ctx.out_shape = output.shape
    ctx.geom = geom


def _local_conv_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = local_conv_grad_input(grad, weight, list(x.shape[2:]), *ctx.geom)
    if ctx.needs_input_grad[1]:  # the weight-gradient kernel yields the per-pixel bias gradient too
        dw, db = local_conv_grad_weight(grad, x, *ctx.geom)
    elif ctx.bias_dim is not None and ctx.needs_input_grad[2]:  # frozen weight: no W-sized kernel for Σ_n grad
        db = grad.flatten(2).sum(0)
    if ctx.bias_dim is None:
        db = None
    elif ctx.bias_dim == 1 and db is not None:
        db = db.sum(1)
    return dx, dw, db, None, None, None, None, None


def _local_conv_jvp(ctx, x_t, w_t, b_t):
    x, weight = ctx.saved_tensors
    y_t = None if x_t is None else local_conv(x_t, weight, None, *ctx.geom)
    if w_t is not None:
        return _autograd.add(y_t, local_conv(x, w_t, b_t, *ctx.geom))
    return _autograd.add(y_t, None if b_t is None else _bias_as_output(b_t, ctx.out_shape))


# ---------------------------------------------------------------------------------------------- grad_input
def _grad_input_setup(ctx, inputs, output):
    grad, weight, input_size, *geom = inputs
    ctx.save_for_backward(grad, weight)
    ctx.save_for_forward(grad, weight)
    ctx.input_size = input_size
    ctx.geom = geom


def _grad_input_backward(ctx, u):
    grad, weight = ctx.saved_tensors
    d_grad = d_weight = None
    if ctx.needs_input_grad[0]:
        d_grad = local_conv(u, weight, None, *ctx.geom)
    if ctx.needs_input_grad[1]:
        d_weight, _ = local_conv_grad_weight(grad, u, *ctx.geom)
    return d_grad, d_weight, None, None, None, None, None, None


def _grad_input_jvp(ctx, grad_t, w_t):
    grad, weight = ctx.saved_tensors
    out = None if grad_t is None else local_conv_grad_input(grad_t, weight, ctx.input_size, *ctx.geom)
    return _autograd.add(out, None if w_t is None else local_conv_grad_input(grad, w_t, ctx.input_size, *ctx.geom))


# ---------------------------------------------------------------------------------------------- grad_weight
def _grad_weight_setup(ctx, inputs, output):
    grad, x, *geom = inputs
    ctx.save_for_backward(grad, x)
    ctx.save_for_forward(grad, x)
    ctx.geom = geom


def _grad_weight_backward(ctx, u_weight, u_bias):
    grad, x = ctx.saved_tensors
    d_grad = d_x = None
    if ctx.needs_input_grad[0]:
        if u_weight is not None:
            d_grad = local_conv(x, u_weight, u_bias, *ctx.geom)
        elif u_bias is not None:
            d_grad = _bias_as_output(u_bias, grad.shape)
    if ctx.needs_input_grad[1] and u_weight is not None:
        d_x = local_conv_grad_input(grad, u_weight, list(x.shape[2:]), *ctx.geom)
    return d_grad, d_x, None, None, None, None, None


def _grad_weight_jvp(ctx, grad_t, x_t):
    grad, x = ctx.saved_tensors
    if grad_t is not None:
        dw_t, db_t = local_conv_grad_weight(grad_t, x, *ctx.geom)
    else:
        dw_t, db_t = None, grad.new_zeros(grad.shape[1], math.prod(grad.shape[2:]))
    return _autograd.add(dw_t, None if x_t is None else local_conv_grad_weight(grad, x_t, *ctx.geom)[0]), db_t


local_conv = _autograd.differentiable(_local_conv, _local_conv_impl, 3, _local_conv_setup, _local_conv_backward,
                                      _local_conv_jvp)
local_conv.__doc__ = """``convzoo::local_conv(x, weight, bias, kernel_size, dilation, padding, stride, padding_mode)``,
differentiable under every transform (resolved arguments)."""
local_conv_grad_input = _autograd.differentiable(_local_conv_grad_input, _local_conv_grad_input_impl, 2,
                                                 _grad_input_setup, _grad_input_backward, _grad_input_jvp)
local_conv_grad_input.__doc__ = """``convzoo::local_conv_grad_input(grad, weight, input_size, kernel_size, ...)``,
differentiable under every transform."""
local_conv_grad_weight = _autograd.differentiable(_local_conv_grad_weight, _local_conv_grad_weight_impl, 2,
                                                  _grad_weight_setup, _grad_weight_backward, _grad_weight_jvp)
local_conv_grad_weight.__doc__ = """``convzoo::local_conv_grad_weight(grad, x, kernel_size, ...)`` → ``(dW, db)``,
differentiable under every transform."""


# ---------------------------------------------------------------------------------------------- weight layout
def _to_position_major(weight: Tensor) -> Tensor:
    """A copy of ``weight`` ``[C_out, R, L]`` that is physically ``[L, C_out, R]``."""
    o, r, l = weight.shape
    if weight.is_contiguous():  # hypnettorch's layout: a 2-d transpose, which torch copies ~2x faster
        return weight.reshape(o * r, l).t().contiguous().view(l, o, r).permute(1, 2, 0)
    return weight.permute(2, 0, 1).contiguous().permute(1, 2, 0)


def _to_contiguous(grad: Tensor) -> Tensor:
    """The adjoint's layout: ``grad`` ``[C_out, R, L]`` (physically ``[L, C_out, R]``, as the weight-gradient
    op makes it) copied to a contiguous tensor, the layout of the weight it belongs to."""
    o, r, l = grad.shape
    if grad.permute(2, 0, 1).is_contiguous():
        return grad.permute(2, 0, 1).reshape(l, o * r).t().contiguous().view(o, r, l)
    return grad.contiguous()


class _PositionMajor(torch.autograd.Function):
    """The copy into the kernels' layout, with a backward that hands the gradient back in the (contiguous)
    layout of the weight, one 2-d transpose, instead of leaving AccumulateGrad a 3-d permuting copy."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight):
        return _to_position_major(weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return _to_contiguous(grad)

    @staticmethod
    def jvp(ctx, weight_t):
        return position_major(weight_t)


def position_major(weight: Tensor) -> Tensor:
    """``weight`` ``[C_out, C_in·∏K, L]`` copied once into the layout every path streams fastest, physically
    ``[L, C_out, C_in·∏K]``: far cheaper than reading W strided by L in every per-position matmul. Its
    gradient comes back contiguous, one copy too."""
    if torch.compiler.is_compiling() or not _autograd.needs_function([weight]):
        return _to_position_major(weight)
    return _autograd.apply(_PositionMajor, [weight], weight)


# ---------------------------------------------------------------------------------------------- vmap
# A vmapped dim joins a dim the op already batches over, so one launch serves the whole vmap:
# the batch dim N for x / grad, C_out for a batched weight (or output gradient in grad_weight),
# C_in for a batched weight in grad_input or input in grad_weight. When both operands of a
# contraction over N are batched (per-sample weight gradients) no such dim exists: one call per entry.
def _batched(in_dims, count: int) -> tuple[bool, ...]:
    """Which of the first ``count`` arguments are batched."""
    return tuple(d is not None for d in in_dims[:count])


def _batched_bias(bias: Tensor, bdim: int, y: Tensor) -> Tensor:
    """A bias batched at ``bdim``, shaped to broadcast against the vmapped output ``y`` ``[B, N, C_out, *out]``."""
    bias = bias.movedim(bdim, 0)
    if bias.dim() == 3:  # per pixel [B, C_out, L]
        return bias.reshape(bias.shape[0], 1, *y.shape[2:])
    return bias.reshape(bias.shape[0], 1, bias.shape[1], *([1] * (y.dim() - 3)))


@_local_conv.register_vmap
def _(info, in_dims, x, weight, bias, *geom):
    b = info.batch_size
    x_b, w_b, bias_b = _batched(in_dims, 3)
    if x_b and not w_b:  # the vmapped dim joins N (a batched bias is added per entry)
        x = x.movedim(in_dims[0], 0)
        y = _local_conv(x.flatten(0, 1), weight, None if bias_b else bias, *geom).unflatten(0, x.shape[:2])
        return (y + _batched_bias(bias, in_dims[2], y) if bias_b else y), 0
    if not x_b and w_b:  # ... joins C_out: weight [B*O, R, L], bias [B*O(, L)]
        w = _autograd.move_bdim(weight, in_dims[1], b)
        bias = None if bias is None else _autograd.move_bdim(bias, in_dims[2], b).flatten(0, 1)
        y = _local_conv(x, w.flatten(0, 1), bias, *geom)
        return y.unflatten(1, w.shape[:2]), 1
    if not (x_b or w_b):  # only the bias is batched: one call, the bias added per entry
        y = _local_conv(x, weight, None, *geom)
        return y + _batched_bias(bias, in_dims[2], y[None]), 0
    return _autograd.loop_vmap(_local_conv, b, in_dims, (x, weight, bias, *geom))


@_local_conv_grad_input.register_vmap
def _(info, in_dims, grad, weight, *args):
    b = info.batch_size
    g_b, w_b = _batched(in_dims, 2)
    if g_b and not w_b:  # joins N
        grad = grad.movedim(in_dims[0], 0)
        return _local_conv_grad_input(grad.flatten(0, 1), weight, *args).unflatten(0, grad.shape[:2]), 0
    if w_b and not g_b:  # joins C_in: the rows (b, c, k) of a [O, B*C*K, L] weight
        w = weight.movedim(in_dims[1], 1)
        dx = _local_conv_grad_input(grad, w.flatten(1, 2), *args)
        return dx.unflatten(1, (b, -1)), 1
    return _autograd.loop_vmap(_local_conv_grad_input, b, in_dims, (grad, weight, *args))


@_local_conv_grad_weight.register_vmap
def _(info, in_dims, grad, x, *geom):
    b = info.batch_size
    g_b, x_b = _batched(in_dims, 2)
    if g_b and not x_b:  # joins C_out
        grad = grad.movedim(in_dims[0], 1)
        dw, db = _local_conv_grad_weight(grad.flatten(1, 2), x, *geom)
        return (dw.unflatten(0, (b, -1)), db.unflatten(0, (b, -1))), (0, 0)
    if x_b and not g_b:  # joins C_in; the bias gradient does not depend on x
        x = x.movedim(in_dims[1], 1)
        dw, db = _local_conv_grad_weight(grad, x.flatten(1, 2), *geom)
        return (dw.unflatten(1, (b, -1)), db), (1, None)
    return _autograd.loop_vmap(_local_conv_grad_weight, b, in_dims, (grad, x, *geom))

