"""``convzoo::unfold`` and ``convzoo::fold``: each is the other's backward and, both being linear,
its own forward-mode derivative.

Arguments are already resolved by :mod:`convzoo.functional`: per-dim lists, padding as the flat
``[lo_0, hi_0, ...]`` list, and a padding mode string. :func:`unfold` and :func:`fold` are the entry
points, a :func:`convzoo.ops._family.linear_pair` (each one's backward and tangent, vmap joining the batch
dim N); how they differentiate is in :mod:`convzoo.ops._autograd`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convzoo import _shapes, reference
from convzoo.ops import _family, _native
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


unfold, fold = _family.linear_pair((_unfold, _unfold_impl), (_fold, _fold_impl))
unfold.__doc__ = """``convzoo::unfold(x, kernel_size, dilation, padding, stride, padding_mode)``, differentiable
under every transform (resolved arguments)."""
fold.__doc__ = """``convzoo::fold(cols, output_size, kernel_size, dilation, padding, stride, padding_mode)``,
differentiable under every transform (resolved arguments)."""
