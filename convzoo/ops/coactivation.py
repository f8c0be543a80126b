"""``convzoo::coactivation`` (new scores) and ``convzoo::coactivation_`` (added into ``out``): how often, or how
strongly correlated, each connection ``W[o, c, k]`` of a convolution sees its input and output active, see
:func:`convzoo.functional.coactivation`.

Arguments are already resolved by :mod:`convzoo.functional`: ``weight_shape`` a list of ints, per-dim lists,
``padding`` the flat ``[lo_0, hi_0, ...]`` list, thresholds Python floats, ``x`` and ``y`` detached. Neither op
is differentiable (a statistic of the activations).

``mode='count'`` on CUDA (and under the interpreter) is the masked-conv weight-gradient kernel with the thresholds
fused into its loads (:func:`convzoo.kernels.masked_conv.masked_conv_grad_weight` with ``thresholds``; every tile
listed): no binarized copy of ``x`` or ``y``, extra memory O(weight). ``mode='correlation'`` there is
:func:`convzoo.kernels.coactivation.coactivation_correlation`: the batch-normalised tensors made in torch, then one
launch that reduces the per-position correlations inside the kernel (extra memory O(x) + O(y)). Elsewhere, and for
``x`` and ``y`` of different dtypes, the plain-torch path (:func:`convzoo.reference.coactivation`:
``torch.nn.grad.convNd_weight`` of the binarized tensors; per-position GEMMs of the batch-normalised tensors,
chunked).
"""

from __future__ import annotations

import torch
from torch import Tensor

from convzoo import _shapes, reference
from convzoo.ops import _autograd
from convzoo.ops._dispatch import own, use_triton

__all__ = ["coactivation", "coactivation_"]


def _kernel_count(x, y, weight_shape, stride, padding, dilation, groups, padding_mode, x_threshold, y_threshold):
    """The count through the fused-threshold weight-gradient kernel, or None where it does not apply."""
    if not (use_triton(x) and x.dtype == y.dtype):
        return None
    from convzoo.kernels import masked_conv as kernels
    from convzoo.ops.masked_conv import _tile_lists

    _shapes.coactivation_geometry(x, y, weight_shape, stride, padding, dilation, groups, padding_mode)
    lists = _tile_lists(None, weight_shape, groups, x.device)
    return kernels.masked_conv_grad_weight(y, x, None, lists.count, lists.index, list(weight_shape),
                                           list(weight_shape[2:]), dilation, padding, stride, padding_mode, groups,
                                           lists.block, thresholds=(x_threshold, y_threshold))


def _kernel_correlation(x, y, weight_shape, stride, padding, dilation, groups, padding_mode, out=None):
    """The correlation scores through the correlation kernel (into ``out`` when given), or None where it does
    not apply."""
    if not (use_triton(x) and x.dtype == y.dtype):
        return None
    from convzoo.kernels import coactivation as kernels

    return kernels.coactivation_correlation(x, y, list(weight_shape), stride, padding, dilation, groups,
                                            padding_mode, out=out)


def _impl(x: Tensor, y: Tensor, weight_shape: list[int], stride: list[int], padding: list[int], dilation: list[int],
          groups: int, padding_mode: str, x_threshold: float, y_threshold: float, score: str) -> Tensor:
    if score == "count":
        h = _kernel_count(x, y, weight_shape, stride, padding, dilation, groups, padding_mode, x_threshold,
                          y_threshold)
        if h is not None:
            return own(h)
    else:
        h = _kernel_correlation(x, y, weight_shape, stride, padding, dilation, groups, padding_mode)
        if h is not None:
            return own(h)
    return own(reference.coactivation(x, y, weight_shape, stride, padding, dilation, groups, padding_mode,
                                      x_threshold, y_threshold, score))


_coactivation = torch.library.custom_op("convzoo::coactivation", mutates_args=())(_impl)
coactivation = _autograd.nondifferentiable(_coactivation, _impl, 2)
coactivation.__doc__ = """``convzoo::coactivation(x, y, weight_shape, stride, padding, dilation, groups,
padding_mode, x_threshold, y_threshold, score)``: the scores as a new ``weight_shape`` tensor (fp32 for
``'count'``, ``x``'s dtype for ``'correlation'``). ``score`` is the functional's ``mode``: a schema may not name an
argument ``mode`` (torch's dispatch-mode redirection passes one of that name)."""


@_coactivation.register_fake
def _(x, y, weight_shape, stride, padding, dilation, groups, padding_mode, x_threshold, y_threshold, score):
    _shapes.coactivation_geometry(x, y, weight_shape, stride, padding, dilation, groups, padding_mode)
    return x.new_empty(weight_shape, dtype=_shapes.coactivation_dtype(x, score))


def _inplace_impl(out: Tensor, x: Tensor, y: Tensor, weight_shape: list[int], stride: list[int], padding: list[int],
                  dilation: list[int], groups: int, padding_mode: str, x_threshold: float, y_threshold: float,
                  score: str) -> None:
    # here, on real tensors (a traced functional sees fakes without addresses; a compiled graph's
    # functionalised out is a fresh buffer anyway)
    _shapes.check_out_memory(out, x=x, y=y)
    if score == "count":
        h = _kernel_count(x, y, weight_shape, stride, padding, dilation, groups, padding_mode, x_threshold,
                          y_threshold)
        if h is not None:
            out.add_(h)
            return
    elif _kernel_correlation(x, y, weight_shape, stride, padding, dilation, groups, padding_mode, out) is not None:
        return
    reference.coactivation(x, y, weight_shape, stride, padding, dilation, groups, padding_mode, x_threshold,
                           y_threshold, score, out)


_coactivation_ = torch.library.custom_op("convzoo::coactivation_", mutates_args=("out",))(_inplace_impl)
coactivation_ = _autograd.nondifferentiable(_coactivation_, _inplace_impl, 3)
coactivation_.__doc__ = """``convzoo::coactivation_(out, x, y, weight_shape, ..., score)``: ``out += H`` in place."""


@_coactivation_.register_fake
def _(out, x, y, weight_shape, stride, padding, dilation, groups, padding_mode, x_threshold, y_threshold, score):
    _shapes.coactivation_geometry(x, y, weight_shape, stride, padding, dilation, groups, padding_mode)
    return None
