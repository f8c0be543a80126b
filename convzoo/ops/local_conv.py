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
the entry points, a :class:`convzoo.ops._family.Bilinear` family (:class:`_LocalConv`); how they
differentiate is in :mod:`convzoo.ops._family` and :mod:`convzoo.ops._autograd`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from convzoo import _shapes
from convzoo.ops import _autograd, _family
from convzoo.ops._dispatch import run

__all__ = ["local_conv", "local_conv_grad_input", "local_conv_grad_weight", "position_major"]


# ----------------------------------------------------------------------------------------------
def _local_conv_impl(x: Tensor, weight: Tensor, bias: Tensor | None, kernel_size: list[int], dilation: list[int],
                     padding: list[int], stride: list[int], padding_mode: str) -> Tensor:
    return run(x, "local_conv", "local_conv", (x, weight, bias, kernel_size, dilation, padding, stride, padding_mode),
               native=True)


_local_conv = torch.library.custom_op("convzoo::local_conv", mutates_args=())(_local_conv_impl)


@_local_conv.register_fake
def _(x, weight, bias, kernel_size, dilation, padding, stride, padding_mode):
    g = _shapes.local_conv_geometry(x, weight, bias, kernel_size, dilation, padding, stride, padding_mode)
    return x.new_empty(_shapes.local_conv_out_shape(x, weight, g))


def _local_conv_grad_input_impl(grad: Tensor, weight: Tensor, input_size: list[int], kernel_size: list[int],
                                dilation: list[int], padding: list[int], stride: list[int],
                                padding_mode: str) -> Tensor:
    return run(grad, "local_conv", "local_conv_grad_input",
               (grad, weight, input_size, kernel_size, dilation, padding, stride, padding_mode), native=True)


_local_conv_grad_input = torch.library.custom_op("convzoo::local_conv_grad_input",
                                                 mutates_args=())(_local_conv_grad_input_impl)


@_local_conv_grad_input.register_fake
def _(grad, weight, input_size, kernel_size, dilation, padding, stride, padding_mode):
    g = _shapes.local_conv_grad_input_geometry(grad, weight, input_size, kernel_size, dilation, padding, stride,
                                               padding_mode)
    return grad.new_empty((grad.shape[0], weight.shape[1] // g.kernel_numel, *input_size))


def _local_conv_grad_weight_impl(grad: Tensor, x: Tensor, kernel_size: list[int], dilation: list[int],
                                 padding: list[int], stride: list[int], padding_mode: str) -> tuple[Tensor, Tensor]:
    return run(x, "local_conv", "local_conv_grad_weight", (grad, x, kernel_size, dilation, padding, stride,
                                                           padding_mode), native=True)


_local_conv_grad_weight = torch.library.custom_op("convzoo::local_conv_grad_weight",
                                                  mutates_args=())(_local_conv_grad_weight_impl)


@_local_conv_grad_weight.register_fake
def _(grad, x, kernel_size, dilation, padding, stride, padding_mode):
    g = _shapes.local_conv_grad_weight_geometry(grad, x, kernel_size, dilation, padding, stride, padding_mode)
    w_shape, b_shape = _shapes.local_conv_grad_weight_shapes(grad, x, g)
    return x.new_empty(w_shape).permute(1, 2, 0), x.new_empty(b_shape)


# ---------------------------------------------------------------------------------------------- the family
class _LocalConv(_family.Bilinear):
    """local_conv as a :class:`convzoo.ops._family.Bilinear` family: no constant tensors, a weight gradient that
    brings the per-position bias gradient with it, and vmaps that join a channel dim (see the vmap section)."""

    weight_grad_sized = False
    weight_grad_has_bias = True

    def conv(self, x, w, consts, bias, geom):
        return local_conv(x, w, bias, *geom)

    def grad_input(self, grad, w, consts, input_size, geom):
        return local_conv_grad_input(grad, w, input_size, *geom)

    def grad_weight(self, grad, x, consts, weight_size, geom):
        return local_conv_grad_weight(grad, x, *geom)

    def bias_as_output(self, bias, shape):  # a [C_out, L] or [C_out] bias
        view = (1, *shape[1:]) if bias.dim() == 2 else (1, shape[1], *([1] * (len(shape) - 2)))
        return _autograd.broadcast(bias, view, shape)

    def bias_grad(self, grad, bias_dim, from_weight_grad):
        # frozen weight: no W-sized kernel for Σ_n grad
        db = grad.flatten(2).sum(0) if from_weight_grad is None else from_weight_grad
        return db.sum(1) if bias_dim == 1 else db

    def zero_bias_grad(self, grad):
        return grad.new_zeros(grad.shape[1], math.prod(grad.shape[2:]))

    # A vmapped dim joins a dim the op already batches over, so one launch serves the whole vmap: the batch
    # dim N for x / grad (the family's default), C_out for a batched weight (or output gradient in
    # grad_weight), C_in for a batched weight in grad_input or input in grad_weight. When both operands of a
    # contraction over N are batched (per-sample weight gradients) no such dim exists: one call per entry.
    def vmap_conv(self, op, b, in_dims, args, batched):
        x, weight, bias, *geom = args
        x_b, w_b, _ = batched
        if x_b and not w_b:  # the vmapped dim joins N, the batched bias added per entry
            y, _ = _autograd.join(op, b, (x, weight, None, *geom), in_dims)
            return y + _batched_bias(bias, in_dims[2], y), 0
        if w_b and not x_b:  # ... joins C_out: weight [B*O, R, L], bias [B*O(, L)]
            w = _autograd.move_bdim(weight, in_dims[1], b)
            bias = None if bias is None else _autograd.move_bdim(bias, in_dims[2], b).flatten(0, 1)
            return op(x, w.flatten(0, 1), bias, *geom).unflatten(1, w.shape[:2]), 1
        if not (x_b or w_b):  # only the bias is batched: one call, the bias added per entry
            y = op(x, weight, None, *geom)
            return y + _batched_bias(bias, in_dims[2], y[None]), 0
        return None

    def vmap_grad_input(self, op, b, in_dims, args, batched):
        if batched[1] and not batched[0]:  # joins C_in: the rows (b, c, k) of a [O, B*C*K, L] weight
            return _autograd.join(op, b, args, in_dims, index=1, dim=1, out_dims=1, same_size=False)
        return None

    def vmap_grad_weight(self, op, b, in_dims, args, batched):
        if batched[0] and not batched[1]:  # joins C_out
            return _autograd.join(op, b, args, in_dims, index=0, dim=1, out_dims=(0, 0), same_size=False)
        if batched[1] and not batched[0]:  # joins C_in; the bias gradient does not depend on x
            return _autograd.join(op, b, args, in_dims, index=1, dim=1, out_dims=(1, None), same_size=False)
        return None


local_conv, local_conv_grad_input, local_conv_grad_weight = _LocalConv().build(
    (_local_conv, _local_conv_impl), (_local_conv_grad_input, _local_conv_grad_input_impl),
    (_local_conv_grad_weight, _local_conv_grad_weight_impl))
local_conv.__doc__ = """``convzoo::local_conv(x, weight, bias, kernel_size, dilation, padding, stride, padding_mode)``,
differentiable under every transform (resolved arguments)."""
local_conv_grad_input.__doc__ = """``convzoo::local_conv_grad_input(grad, weight, input_size, kernel_size, ...)``,
differentiable under every transform."""
local_conv_grad_weight.__doc__ = """``convzoo::local_conv_grad_weight(grad, x, kernel_size, ...)`` → ``(dW, db)``,
differentiable under every transform."""


def _batched_bias(bias: Tensor, bdim: int, y: Tensor) -> Tensor:
    """A bias batched at ``bdim``, shaped to broadcast against the vmapped output ``y`` ``[B, N, C_out, *out]``."""
    bias = bias.movedim(bdim, 0)
    if bias.dim() == 3:  # per pixel [B, C_out, L]
        return bias.reshape(bias.shape[0], 1, *y.shape[2:])
    return bias.reshape(bias.shape[0], 1, bias.shape[1], *([1] * (y.dim() - 3)))


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
