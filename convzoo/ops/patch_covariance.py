"""``convzoo::patch_covariance`` (a new factor) and ``convzoo::patch_covariance_`` (blended into ``out``):
the KFAC input factor of a convolution or transposed convolution, see
:func:`convzoo.functional.patch_covariance`.

Arguments are already resolved by :mod:`convzoo.functional`: per-dim lists, ``padding`` the flat
``[lo_0, hi_0, ...]`` list of a convolution or the per-dim padding of a transposed one, ``groups`` checked,
the scale folded into ``coef``. Neither op is differentiable (a statistic: the functional refuses inputs that
require grad).

``mode='expand'`` runs the symmetric implicit-GEMM kernel (:mod:`convzoo.kernels.patch_covariance`) on CUDA
(and under the interpreter), else the chunked plain-torch path; ``mode='reduce'`` needs only the patches
averaged over positions (``[N, D]``, computed without forming the patches), so it is one small batched
matmul on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convzoo import _shapes, reference
from convzoo.ops import _autograd, _native
from convzoo.ops._dispatch import use_triton

__all__ = ["patch_covariance", "patch_covariance_"]


def _compute(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], output_padding: list[int],
             dilation: list[int], padding_mode: str, groups: int, transposed: bool, reduce: bool, bias: bool,
             group_mean: bool, per_sample: bool, out: Tensor | None, alpha: float, coef: float) -> Tensor:
    if per_sample and x.shape[0]:
        coef = coef / x.shape[0]
    if coef == 0.0:  # as BLAS's alpha = 0: F is not read (no 0·Inf = NaN from the input), as alpha = 0 ignores out
        if out is None:
            k = _kernel_numel(x, kernel_size, stride, padding, output_padding, dilation, padding_mode, transposed)
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            out = x.new_empty(_shapes.covariance_shape(x.shape[1], groups, k, bias, group_mean), dtype=dtype)
        return out.mul_(alpha) if alpha != 0.0 else out.zero_()
    if group_mean and groups > 1:
        x, groups = reference.group_mean(x, groups, torch.float64 if x.dtype == torch.float64 else torch.float32), 1
    geom = (kernel_size, stride, padding, output_padding, dilation, padding_mode, groups, transposed, bias)
    if reduce:
        return _reduce(x, *geom, out, alpha, coef)
    if use_triton(x):
        from convzoo.kernels import patch_covariance as kernels

        return kernels.patch_covariance(x, *geom, out=out, alpha=alpha, coef=coef)
    if not transposed:  # small calls: one im2col, no chunking
        small = _native.patch_covariance(x, kernel_size, stride, padding, dilation, padding_mode, groups, bias, out,
                                         alpha, coef)
        if small is not None:
            return small
    return reference.patch_covariance(x, *geom, out=out, alpha=alpha, coef=coef)


def _reduce(x: Tensor, kernel_size, stride, padding, output_padding, dilation, padding_mode, groups, transposed,
            bias, out: Tensor | None, alpha: float, coef: float) -> Tensor:
    """``coef·Σ_n p̄_n p̄_nᵀ (+ alpha·out)`` per group, ``p̄_n`` sample n's patches averaged over positions."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    g, _ = reference._covariance_geometry(x, kernel_size, stride, padding, output_padding, dilation, padding_mode,
                                          transposed)
    xa = x.to(dtype)
    mean = reference.averaged_transpose_patches(xa, g) if transposed else reference.averaged_patches(xa, g)
    n = x.shape[0]
    p = mean.view(n, groups, -1).transpose(0, 1)  # [G, N, D]
    if bias:
        p = torch.cat([p, p.new_ones(groups, n, 1)], 2)
    read_out = out is not None and alpha != 0.0
    if out is None:
        out = x.new_empty((groups, p.shape[2], p.shape[2]), dtype=dtype)
    # baddbmm ignores out (NaN included) at beta = 0
    return out.baddbmm_(p.transpose(1, 2), p, beta=alpha if read_out else 0.0, alpha=coef)


def _impl(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], output_padding: list[int],
          dilation: list[int], padding_mode: str, groups: int, transposed: bool, reduce: bool, bias: bool,
          group_mean: bool, per_sample: bool, coef: float) -> Tensor:
    return _compute(x, kernel_size, stride, padding, output_padding, dilation, padding_mode, groups, transposed,
                    reduce, bias, group_mean, per_sample, None, 0.0, coef)


_patch_covariance = torch.library.custom_op("convzoo::patch_covariance", mutates_args=())(_impl)
patch_covariance = _autograd.nondifferentiable(_patch_covariance, _impl, 1)
patch_covariance.__doc__ = """``convzoo::patch_covariance(x, kernel_size, stride, padding, output_padding, dilation,
padding_mode, groups, transposed, reduce, bias, group_mean, per_sample, coef)``: ``coef·F`` (``coef/N·F`` when
``per_sample``) as a new ``[G', D', D']`` tensor."""


def _kernel_numel(x: Tensor, kernel_size, stride, padding, output_padding, dilation, padding_mode, transposed):
    g, _ = reference._covariance_geometry(x, kernel_size, stride, padding, output_padding, dilation, padding_mode,
                                          transposed)
    return g.kernel_numel


@_patch_covariance.register_fake
def _(x, kernel_size, stride, padding, output_padding, dilation, padding_mode, groups, transposed, reduce, bias,
      group_mean, per_sample, coef):
    k = _kernel_numel(x, kernel_size, stride, padding, output_padding, dilation, padding_mode, transposed)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(_shapes.covariance_shape(x.shape[1], groups, k, bias, group_mean), dtype=dtype)


def _inplace_impl(out: Tensor, x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                  output_padding: list[int], dilation: list[int], padding_mode: str, groups: int, transposed: bool,
                  reduce: bool, bias: bool, group_mean: bool, per_sample: bool, alpha: float, coef: float) -> None:
    # here, on real tensors (a traced functional sees fakes without addresses; a compiled graph's
    # functionalised out is a fresh buffer anyway)
    # the kernel stores each tile and its mirror while other programs still gather x: an overlap would race
    _shapes.check_out_memory(out, input=x)
    _compute(x, kernel_size, stride, padding, output_padding, dilation, padding_mode, groups, transposed, reduce,
             bias, group_mean, per_sample, out, alpha, coef)


_patch_covariance_ = torch.library.custom_op("convzoo::patch_covariance_", mutates_args=("out",))(_inplace_impl)
patch_covariance_ = _autograd.nondifferentiable(_patch_covariance_, _inplace_impl, 2)
patch_covariance_.__doc__ = """``convzoo::patch_covariance_(out, x, ..., per_sample, alpha, coef)``:
``out ← alpha·out + coef·F`` in place (``out`` is not read when ``alpha`` is 0), in the same launch as ``F``
on the kernel path."""


@_patch_covariance_.register_fake
def _(out, x, kernel_size, stride, padding, output_padding, dilation, padding_mode, groups, transposed, reduce, bias,
      group_mean, per_sample, alpha, coef):
    return None
