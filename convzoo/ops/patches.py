"""``convzoo::extract_patches`` and ``convzoo::extract_patches_backward``: each is the other's adjoint (so
its backward) and, both being linear, its own forward-mode derivative, as unfold and fold are.

Arguments are already resolved by :mod:`convzoo.functional`: per-dim lists, padding as the flat
``[lo_0, hi_0, ...]`` list, a padding mode string, and ``groups`` dividing the channels. They are a
:func:`convzoo.ops._family.linear_pair`; how they differentiate is in :mod:`convzoo.ops._autograd`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convzoo import _shapes
from convzoo.ops import _family
from convzoo.ops._dispatch import run

__all__ = ["extract_patches", "extract_patches_backward"]


def _extract_patches_impl(x: Tensor, kernel_size: list[int], dilation: list[int], padding: list[int],
                          stride: list[int], padding_mode: str, groups: int) -> Tensor:
    return run(x, "patches", "extract_patches", (x, kernel_size, dilation, padding, stride, padding_mode, groups))


_extract_patches = torch.library.custom_op("convzoo::extract_patches", mutates_args=())(_extract_patches_impl)


@_extract_patches.register_fake
def _(x, kernel_size, dilation, padding, stride, padding_mode, groups):
    g = _shapes.extract_patches_geometry(x, kernel_size, dilation, padding, stride, padding_mode, groups)
    return x.new_empty(_shapes.extract_patches_out_shape(x, g, groups))


def _backward_impl(grad: Tensor, input_size: list[int], kernel_size: list[int], dilation: list[int],
                   padding: list[int], stride: list[int], padding_mode: str, groups: int) -> Tensor:
    return run(grad, "patches", "extract_patches_backward",
               (grad, input_size, kernel_size, dilation, padding, stride, padding_mode, groups))


_backward = torch.library.custom_op("convzoo::extract_patches_backward", mutates_args=())(_backward_impl)


@_backward.register_fake
def _(grad, input_size, kernel_size, dilation, padding, stride, padding_mode, groups):
    g = _shapes.extract_patches_backward_geometry(grad, input_size, kernel_size, dilation, padding, stride,
                                                  padding_mode, groups)
    return grad.new_empty(_shapes.extract_patches_backward_out_shape(grad, g, groups))


extract_patches, extract_patches_backward = _family.linear_pair((_extract_patches, _extract_patches_impl),
                                                                (_backward, _backward_impl))
extract_patches.__doc__ = """``convzoo::extract_patches(x, kernel_size, dilation, padding, stride, padding_mode,
groups)``, differentiable under every transform (resolved arguments)."""
extract_patches_backward.__doc__ = """``convzoo::extract_patches_backward(grad, input_size, kernel_size, dilation,
padding, stride, padding_mode, groups)``, the adjoint of :func:`extract_patches`, differentiable under every
transform (resolved arguments)."""
