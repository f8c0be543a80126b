"""``convzoo::unfold_transpose`` and ``convzoo::unfold_transpose_backward``: each is the other's adjoint
(so its backward) and, both being linear, its own forward-mode derivative, as unfold and fold are.

Arguments are already resolved by :mod:`convzoo.functional`: per-dim lists, ``output_size`` already
turned into ``output_padding``. They are a :func:`convzoo.ops._family.linear_pair`; how they differentiate is in
:mod:`convzoo.ops._autograd`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convzoo import _shapes
from convzoo.ops import _family
from convzoo.ops._dispatch import run

__all__ = ["unfold_transpose", "unfold_transpose_backward"]


def _unfold_transpose_impl(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                           output_padding: list[int], dilation: list[int]) -> Tensor:
    return run(x, "unfold_transpose", "unfold_transpose", (x, kernel_size, stride, padding, output_padding, dilation))


_unfold_transpose = torch.library.custom_op("convzoo::unfold_transpose", mutates_args=())(_unfold_transpose_impl)
_unfold_transpose.register_fake(_family.allocating_fake(_shapes.unfold_transpose_geometry,
                                                        _shapes.unfold_transpose_out_shape))


def _backward_impl(cols: Tensor, input_size: list[int], kernel_size: list[int], stride: list[int],
                   padding: list[int], output_padding: list[int], dilation: list[int]) -> Tensor:
    return run(cols, "unfold_transpose", "unfold_transpose_backward",
               (cols, input_size, kernel_size, stride, padding, output_padding, dilation))


_backward = torch.library.custom_op("convzoo::unfold_transpose_backward", mutates_args=())(_backward_impl)
_backward.register_fake(_family.allocating_fake(_shapes.unfold_transpose_backward_geometry,
                                                _shapes.unfold_transpose_backward_out_shape))


unfold_transpose, unfold_transpose_backward = _family.linear_pair((_unfold_transpose, _unfold_transpose_impl),
                                                                  (_backward, _backward_impl))
unfold_transpose.__doc__ = """``convzoo::unfold_transpose(x, kernel_size, stride, padding, output_padding,
dilation)``, differentiable under every transform (resolved arguments)."""
unfold_transpose_backward.__doc__ = """``convzoo::unfold_transpose_backward(cols, input_size, kernel_size, stride,
padding, output_padding, dilation)``, the adjoint of :func:`unfold_transpose`, differentiable under every
transform (resolved arguments)."""
