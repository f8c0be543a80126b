"""Shape math of locally connected convolution and of the convolution matrix."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from convzoo._shapes._core import Geometry, _is_int, check, check_float_tensor, geometry, unfold_geometry


# ----------------------------------------------------------------------------------------------
# locally connected convolution
def local_conv_geometry(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel_size, dilation,
                        padding, stride, padding_mode) -> Geometry:
    """Checks for ``local_conv(x, weight, bias, ...)``.

    ``x`` is ``[N, C_in, *spatial]``; ``weight`` is ``[C_out, C_in·∏K, L]`` (any strides) with
    L the number of output positions; ``bias`` is ``[C_out, L]`` (per pixel), ``[C_out]`` (per
    channel) or None.

    Raises:
        TypeError: a non-tensor or non-floating argument, or dtypes that differ from the input's.
        ValueError: a shape that does not match the input, the kernel or the output grid.
    """
    g = unfold_geometry(x, kernel_size, dilation, padding, stride, padding_mode)
    check_float_tensor(weight, "weight")
    check(weight.dtype == x.dtype, lambda: f"weight has dtype {weight.dtype} but input has {x.dtype}", TypeError)
    check(weight.device == x.device, lambda: f"weight is on {weight.device} but input is on {x.device}")
    check(weight.dim() == 3,
          lambda: f"weight must be [C_out, C_in*prod(kernel_size), L], got shape {tuple(weight.shape)}")
    r = x.shape[1] * g.kernel_numel
    check(weight.shape[1] == r, lambda: f"weight.shape[1]={weight.shape[1]} must be in_channels*prod(kernel_size) = "
                                f"{x.shape[1]}*{g.kernel_numel} = {r}")
    check(weight.shape[2] == g.num_blocks,
          lambda: f"weight.shape[2]={weight.shape[2]} must be the number of output positions L={g.num_blocks} "
          f"(an output grid of {list(g.out_size)} for input size {list(g.in_size)})")
    if bias is not None:
        check_float_tensor(bias, "bias")
        check(bias.dtype == x.dtype, lambda: f"bias has dtype {bias.dtype} but input has {x.dtype}", TypeError)
        check(bias.device == x.device, lambda: f"bias is on {bias.device} but input is on {x.device}")
        check(bias.dim() in (1, 2), lambda: f"bias must be [C_out, L] or [C_out], got shape {tuple(bias.shape)}")
        check(bias.shape[0] == weight.shape[0],
              lambda: f"bias.shape[0]={bias.shape[0]} must be out_channels = weight.shape[0] = {weight.shape[0]}")
        if bias.dim() == 2:
            check(bias.shape[1] == g.num_blocks,
                  lambda: f"bias.shape[1]={bias.shape[1]} must be the number of output positions L={g.num_blocks}")
    return g


def local_conv_out_shape(x: torch.Tensor, weight: torch.Tensor, g: Geometry) -> tuple:
    return (x.shape[0], weight.shape[0], *g.out_size)


def _check_grad_grid(grad: torch.Tensor, g: Geometry) -> None:
    """The output gradient's spatial size must be the output grid."""
    for i in range(g.ndim):
        check(grad.shape[2 + i] == g.out_size[i],
              lambda: f"grad spatial size {list(grad.shape[2:])} must be {list(g.out_size)}")


def local_conv_grad_input_geometry(grad: torch.Tensor, weight: torch.Tensor, input_size, kernel_size, dilation,
                                   padding, stride, padding_mode) -> Geometry:
    """Checks for ``local_conv_grad_input(grad, weight, input_size, ...)``: ``grad`` is ``[N, C_out, *out]``."""
    check_float_tensor(grad, "grad")
    check_float_tensor(weight, "weight")
    check(grad.dtype == weight.dtype, lambda: f"grad has dtype {grad.dtype} but weight has {weight.dtype}", TypeError)
    g = geometry(tuple(input_size), kernel_size, dilation, padding, stride, padding_mode)
    check(weight.dim() == 3 and grad.dim() == 2 + g.ndim,
          lambda: f"grad must be [N, C_out, *out] and weight [C_out, C_in*prod(kernel_size), L], "
          f"got {tuple(grad.shape)} and {tuple(weight.shape)}")
    check(weight.shape[1] % g.kernel_numel == 0,
          lambda: f"weight.shape[1]={weight.shape[1]} is not divisible by prod(kernel_size)={g.kernel_numel}")
    check(weight.shape[2] == g.num_blocks, lambda: f"weight.shape[2]={weight.shape[2]} must be L={g.num_blocks}")
    check(grad.shape[1] == weight.shape[0], lambda: f"grad.shape[1]={grad.shape[1]} must be C_out={weight.shape[0]}")
    _check_grad_grid(grad, g)
    return g


def local_conv_grad_weight_geometry(grad: torch.Tensor, x: torch.Tensor, kernel_size, dilation, padding, stride,
                                    padding_mode) -> Geometry:
    """Checks for ``local_conv_grad_weight(grad, x, ...)``: ``grad`` is ``[N, C_out, *out]``."""
    check_float_tensor(grad, "grad")
    g = unfold_geometry(x, kernel_size, dilation, padding, stride, padding_mode)
    check(grad.dtype == x.dtype, lambda: f"grad has dtype {grad.dtype} but input has {x.dtype}", TypeError)
    check(grad.dim() == x.dim(), lambda: f"grad must be [N, C_out, *out], got shape {tuple(grad.shape)}")
    check(grad.shape[0] == x.shape[0], lambda: f"grad.shape[0]={grad.shape[0]} must be the batch size {x.shape[0]}")
    _check_grad_grid(grad, g)
    return g


def local_conv_grad_weight_shapes(grad: torch.Tensor, x: torch.Tensor, g: Geometry) -> tuple[tuple, tuple]:
    """Physical shapes of (grad_weight, grad_bias): ``[L, C_out, C_in·∏K]`` (returned as its
    ``permute(1, 2, 0)`` view, the logical ``[C_out, C_in·∏K, L]``) and ``[C_out, L]``."""
    o, r, l = grad.shape[1], x.shape[1] * g.kernel_numel, g.num_blocks
    return (l, o, r), (o, l)


# ----------------------------------------------------------------------------------------------
# convolution as a matrix
CONV_MATRIX_LAYOUTS = ("sparse_csr", "sparse_coo", "dense")
DEFAULT_MAX_DENSE_ELEMENTS = 1 << 28  # 2 GiB of float64: more is almost surely a mistake; the caller may raise it
_DENSE_LIMIT = 1 << 31  # the hard cap on a dense conv matrix, whatever max_dense_elements says
_INDEX_LIMIT = 1 << 63  # a sparse tensor's sizes and int64 indices must fit int64


def conv_weight_ndim(weight: torch.Tensor) -> int:
    """The spatial rank of a convolution weight ``[C_out, C_in/groups, *kernel]``.

    Raises:
        TypeError: ``weight`` is not a floating tensor.
        ValueError: ``weight`` is not 3-, 4- or 5-d, or has an empty kernel dim.
    """
    check_float_tensor(weight, "weight")
    check(3 <= weight.dim() <= 5, lambda: f"weight must be [C_out, C_in/groups, *kernel] with 1-3 spatial dims, "
          f"got shape {tuple(weight.shape)}")
    check(all(k > 0 for k in weight.shape[2:]),
          lambda: f"weight must have a non-empty kernel, got shape {tuple(weight.shape)}")
    return weight.dim() - 2


def conv_matrix_shape(weight: torch.Tensor, g: Geometry, groups: int) -> tuple[int, int]:
    """``(rows, cols)`` of the matrix of a convolution: ``(C_out·∏out, C_in·∏input_size)`` with
    ``C_in = groups·weight.shape[1]``, as Python ints (their product may pass int64; each does not)."""
    return weight.shape[0] * math.prod(g.out_size), groups * weight.shape[1] * math.prod(g.in_size)


def conv_matrix_geometry(weight: torch.Tensor, input_size: Sequence, dilation: Sequence, padding: Sequence,
                         stride: Sequence, groups: int, padding_mode: str, layout: str,
                         max_dense_elements: int | None) -> Geometry:
    """Checks for ``conv_matrix(weight, input_size, ...)`` with resolved arguments (padding flat, as the ops take it).

    Raises:
        TypeError: ``weight`` is not a floating tensor; ``input_size``, ``groups`` or ``max_dense_elements``
            is not an int (bools refused).
        ValueError: ``weight`` is not 3-5-d; ``input_size`` has the wrong length or a non-positive entry;
            ``groups`` is not positive or does not divide ``C_out``; the kernel (with its dilation) is larger
            than the padded input; an unknown ``layout`` or ``padding_mode``; a matrix whose sizes pass int64;
            a dense matrix of more than ``max_dense_elements`` (default 2**28) or 2**31 elements.
    """
    nd = conv_weight_ndim(weight)
    if not isinstance(input_size, Sequence) or isinstance(input_size, str) or not all(_is_int(e) for e in input_size):
        raise TypeError(f"input_size must be a sequence of ints, got {input_size!r}")
    check(len(input_size) == nd, lambda: f"input_size must have {nd} entries for a {nd}-d weight of shape "
          f"{tuple(weight.shape)}, got {tuple(input_size)}")
    check(all(e > 0 for e in input_size), lambda: f"input_size must be positive, got {tuple(input_size)}")
    check(_is_int(groups), lambda: f"groups must be an int, got {groups!r}", TypeError)
    check(groups > 0, lambda: f"groups must be positive, got {groups}")
    check(weight.shape[0] % groups == 0, lambda: f"groups={groups} must divide out_channels = weight.shape[0] = "
          f"{weight.shape[0]}")
    check(isinstance(layout, str) and layout in CONV_MATRIX_LAYOUTS,
          lambda: f"layout must be one of {CONV_MATRIX_LAYOUTS}, got {layout!r}")
    if max_dense_elements is not None:
        check(_is_int(max_dense_elements), lambda: f"max_dense_elements must be an int or None, "
              f"got {max_dense_elements!r}", TypeError)
        check(max_dense_elements >= 0, lambda: f"max_dense_elements must be non-negative, got {max_dense_elements}")
    kernel = tuple(weight.shape[2:])
    for i, (n, k, d) in enumerate(zip(input_size, kernel, dilation)):
        span, padded = d * (k - 1) + 1, n + padding[2 * i] + padding[2 * i + 1]
        check(padded >= span, lambda i=i, span=span, padded=padded: f"weight's kernel {list(kernel)} with dilation "
              f"{list(dilation)} spans {span} in dim {i}, larger than the padded input {padded} "
              f"(input_size {list(input_size)}, padding {list(padding)})")
    g = geometry(tuple(input_size), kernel, dilation, padding, stride, padding_mode)
    rows, cols = conv_matrix_shape(weight, g, groups)
    check(rows < _INDEX_LIMIT and cols < _INDEX_LIMIT, lambda: f"the matrix would be {rows} x {cols}: a size past "
          f"int64 (input_size {list(input_size)}, weight {tuple(weight.shape)}, groups={groups})")
    if layout == "dense":
        limit = DEFAULT_MAX_DENSE_ELEMENTS if max_dense_elements is None else max_dense_elements
        check(rows * cols <= min(limit, _DENSE_LIMIT), lambda: f"layout='dense' would allocate {rows} x {cols} = "
              f"{rows * cols} elements, more than max_dense_elements={limit} allows (and never more than 2**31): "
              f"use layout='sparse_csr' or 'sparse_coo', or raise max_dense_elements")
    return g
