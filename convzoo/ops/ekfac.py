"""``convzoo::ekfac_eigenvalues``: EKFAC's eigenvalue correction of a convolution or transposed convolution
(a Linear layer arrives as a 1-d convolution with kernel 1), see :func:`convzoo.functional.ekfac_eigenvalues`.

Arguments are already resolved by :mod:`convzoo.functional`: per-dim lists, ``padding`` the flat
``[lo_0, hi_0, ...]`` list of a convolution or the per-dim padding of a transposed one, ``groups`` and the
shapes checked, the scale folded into ``coef`` (times the batch size N when ``batch_scale``, so that a compiled
graph does not specialise on N). Not differentiable (a statistic): a backward or a forward-mode tangent through
it raises (:func:`convzoo.ops._autograd.nondifferentiable`), and the functional refuses inputs that require grad.

CUDA (and the interpreter) runs the fused kernel (:mod:`convzoo.kernels.ekfac`); elsewhere the chunked
plain-torch path (:func:`convzoo.reference.ekfac_eigenvalues`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from convzoo import reference
from convzoo.ops import _autograd
from convzoo.ops._dispatch import use_triton

__all__ = ["ekfac_eigenvalues"]


def _impl(x: Tensor, grad_output: Tensor, q_a: Tensor, q_g: Tensor, kernel_size: list[int], stride: list[int],
          padding: list[int], output_padding: list[int], dilation: list[int], padding_mode: str, groups: int,
          transposed: bool, bias: bool, batch_scale: bool, coef: float) -> Tensor:
    if batch_scale:
        coef = coef * x.shape[0]
    args = (x, grad_output, q_a, q_g, kernel_size, stride, padding, output_padding, dilation, padding_mode, groups,
            transposed, bias, coef)
    # a custom op is not autocast-aware: its matmuls (the CPU path's, the launcher's projection of the gradients)
    # would otherwise run in the autocast dtype, silently far less precise than the fp32 statistic
    with reference._no_autocast(x.device.type):
        if use_triton(x):
            from convzoo.kernels import ekfac as kernels

            return kernels.ekfac_eigenvalues(*args)
        return reference.ekfac_eigenvalues(*args)


_ekfac_eigenvalues = torch.library.custom_op("convzoo::ekfac_eigenvalues", mutates_args=())(_impl)
ekfac_eigenvalues = _autograd.nondifferentiable(_ekfac_eigenvalues, _impl, 4)
ekfac_eigenvalues.__doc__ = """``convzoo::ekfac_eigenvalues(x, grad_output, q_a, q_g, kernel_size, stride, padding,
output_padding, dilation, padding_mode, groups, transposed, bias, batch_scale, coef)``: ``coef·s`` (``coef·N·s``
when ``batch_scale``) as a new ``[G, C_out/G, D']`` tensor."""


@_ekfac_eigenvalues.register_fake
def _(x, grad_output, q_a, q_g, kernel_size, stride, padding, output_padding, dilation, padding_mode, groups,
      transposed, bias, batch_scale, coef):
    dp = x.shape[1] // groups * math.prod(kernel_size) + int(bias)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((groups, grad_output.shape[1] // groups, dp), dtype=dtype)
