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

from convzoo import _shapes
from convzoo.ops import _family
from convzoo.ops._dispatch import run

__all__ = ["fold", "unfold"]


def _unfold_impl(x: Tensor, kernel_size: list[int], dilation: list[int], padding: list[int], stride: list[int],
                 padding_mode: str) -> Tensor:
    return run(x, "unfold", "unfold", (x, kernel_size, dilation, padding, stride, padding_mode), native=True)


_unfold = torch.library.custom_op("convzoo::unfold", mutates_args=())(_unfold_impl)
_unfold.register_fake(_family.allocating_fake(_shapes.unfold_geometry, _shapes.unfold_out_shape))


def _fold_impl(cols: Tensor, output_size: list[int], kernel_size: list[int], dilation: list[int],
               padding: list[int], stride: list[int], padding_mode: str) -> Tensor:
    return run(cols, "unfold", "fold", (cols, output_size, kernel_size, dilation, padding, stride, padding_mode),
               native=True)


_fold = torch.library.custom_op("convzoo::fold", mutates_args=())(_fold_impl)
_fold.register_fake(_family.allocating_fake(_shapes.fold_geometry, _shapes.fold_out_shape))


unfold, fold = _family.linear_pair((_unfold, _unfold_impl), (_fold, _fold_impl))
unfold.__doc__ = """``convzoo::unfold(x, kernel_size, dilation, padding, stride, padding_mode)``, differentiable
under every transform (resolved arguments)."""
fold.__doc__ = """``convzoo::fold(cols, output_size, kernel_size, dilation, padding, stride, padding_mode)``,
differentiable under every transform (resolved arguments)."""
