"""Shape math and argument checks shared by fakes, launchers and references.

Everything about sliding-window geometry lives here, once: normalising ``int``/tuple arguments,
resolving ``'same'``/``'valid'`` padding, output sizes, and the checks that give a bad argument a
clear ``ValueError``/``TypeError`` naming it.

Internally padding is a flat list ``[lo_0, hi_0, lo_1, hi_1, ...]`` in spatial order (dim 0 is
the outermost spatial dim), so asymmetric padding (``'same'`` with an even kernel or a stride)
is one case, not a special one.

All functions here work on plain ``int`` and on ``torch.SymInt``: the fakes call them while
tracing with dynamic shapes.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from convzoo import _compat

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")
# Integer codes passed to kernels as constexprs.
PADDING_MODE_CODES = {mode: i for i, mode in enumerate(PADDING_MODES)}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check(cond, message, exc: type[Exception] = ValueError) -> None:
    """Raise ``exc(message)`` unless ``cond``; a symbolic condition becomes a ``torch._check``.

    ``message`` is a string or a zero-argument callable returning one: call sites on the hot path
    pass ``lambda: f"..."`` so that the message is only formatted when the check fails.
    """
    if isinstance(cond, torch.SymBool):
        torch._check(cond, message if callable(message) else lambda: message)
    elif not cond:
        raise exc(message() if callable(message) else message)


def _is_int(v) -> bool:
    """A Python int, a ``SymInt``, or any other integer type (``np.int64``, as ``F.unfold`` takes); not a bool."""
    return isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, (bool, np.bool_))


def plain_ints(value):
    """``value`` with every integer in it (nested in tuples/lists too) a Python int, ``SymInt`` left as is:
    what the ops' ``SymInt[]`` arguments take, and what a module keeps, so that ``torch.compile`` never
    traces a numpy integer (Dynamo reads those as tensors)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int, torch.SymInt)):
        return int(value)
    if isinstance(value, (tuple, list)):
        return type(value)(plain_ints(v) for v in value)
    return value


def as_tuple(value, ndim: int, name: str) -> tuple:
    """``value`` as a tuple of ``ndim`` ints (an int is repeated).

    Raises:
        TypeError: ``value`` is neither an int nor a sequence of ints.
        ValueError: a sequence of the wrong length.
    """
    if _is_int(value):
        return (plain_ints(value),) * ndim
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not all(_is_int(v) for v in value):
            raise TypeError(f"{name} must be an int or a sequence of ints, got {value!r}")
        if len(value) != ndim:
            raise ValueError(f"{name} must have {ndim} entries for {ndim}-d input, got {tuple(value)}")
        return tuple(plain_ints(v) for v in value)
    raise TypeError(f"{name} must be an int or a sequence of ints, got {type(value).__name__}")


def spatial_ndim_of(*args, default: int | None = None) -> int | None:
    """The number of spatial dims told by the first sequence argument, else ``default``."""
    for a in args:
        if isinstance(a, Sequence) and not isinstance(a, str):
            return len(a)
    return default


def resolve_padding(padding, in_size: Sequence, kernel_size: Sequence, dilation: Sequence,
                    stride: Sequence) -> list:
    """Padding as the flat ``[lo_0, hi_0, ...]`` list the ops take.

    ``padding`` is an int, a per-dim sequence (symmetric), a sequence of ``(lo, hi)`` pairs,
    ``'valid'`` (no padding) or ``'same'``. ``'same'`` gives ``ceil(in / stride)`` outputs per dim
    (TensorFlow's rule; with stride 1 it equals PyTorch's ``'same'``), the odd element of the
    total padding going to the high side.
    """
    ndim = len(in_size)
    if isinstance(padding, str):
        if padding == "valid":
            return [0] * (2 * ndim)
        if padding != "same":
            raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
        flat = []
        for n, k, d, s in zip(in_size, kernel_size, dilation, stride):
            out = (n + s - 1) // s
            total = _compat.sym_max((out - 1) * s + d * (k - 1) + 1 - n, 0)
            flat += [total // 2, total - total // 2]
        return flat
    if isinstance(padding, Sequence) and any(isinstance(p, Sequence) for p in padding):
        if len(padding) != ndim or not all(
            isinstance(p, Sequence) and len(p) == 2 and all(_is_int(v) for v in p) for p in padding
        ):
            raise ValueError(f"padding as pairs must be {ndim} (lo, hi) pairs of ints, got {padding!r}")
        flat = [plain_ints(v) for p in padding for v in p]
    else:
        flat = [v for p in as_tuple(padding, ndim, "padding") for v in (p, p)]
    for v in flat:
        check(v >= 0, lambda: f"padding must be non-negative, got {padding!r}")
    return flat


@dataclass(frozen=True)
class Geometry:
    """Resolved sliding-window geometry of one unfold/fold call (all per-dim tuples)."""

    in_size: tuple
    kernel_size: tuple
    dilation: tuple
    padding: tuple  # flat (lo_0, hi_0, lo_1, hi_1, ...)
    stride: tuple
    padding_mode: str
    out_size: tuple

    @property
    def ndim(self) -> int:
        return len(self.in_size)

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def num_blocks(self):
        """L, the number of sliding-window positions."""
        return math.prod(self.out_size)

    @property
    def pad_lo(self) -> tuple:
        return self.padding[0::2]

    @property
    def pad_hi(self) -> tuple:
        return self.padding[1::2]


def geometry(in_size: Sequence, kernel_size: Sequence, dilation: Sequence, padding: Sequence,
             stride: Sequence, padding_mode: str) -> Geometry:
    """Check one call's resolved arguments and compute its output (block-grid) size.

    Checked and computed once per distinct set of Python-int arguments (the fake, the reference and the
    launcher of one call all ask, and so does every later call of the same signature); ``SymInt`` and
    other integer types take the uncached path, and so does a call under ``torch.compile`` (Dynamo traces
    through an ``lru_cache`` wrapper, and says so in a warning on torch 2.11).

    Raises:
        ValueError: wrong lengths, non-positive kernel_size/stride/dilation, negative padding,
            a padding too large for ``padding_mode``, an unknown ``padding_mode``, or a kernel
            larger than the padded input.
    """
    key = (tuple(in_size), tuple(kernel_size), tuple(dilation), tuple(padding), tuple(stride))
    if (type(padding_mode) is str and all(type(e) is int for part in key for e in part)
            and not torch.compiler.is_compiling()):
        return _cached_geometry(*key, padding_mode)
    return _geometry(in_size, kernel_size, dilation, padding, stride, padding_mode)


_GEOMETRY_LIMIT = 1 << 60  # sums of a few of these stay inside int64 in every kernel


def _geometry(in_size: Sequence, kernel_size: Sequence, dilation: Sequence, padding: Sequence,
              stride: Sequence, padding_mode: str) -> Geometry:
    ndim = len(in_size)
    check(1 <= ndim <= 3, lambda: f"expected 1, 2 or 3 spatial dims, got {ndim}")
    for name, v in (("kernel_size", kernel_size), ("dilation", dilation), ("stride", stride)):
        check(len(v) == ndim, lambda name=name, v=v: f"{name} must have {ndim} entries, got {list(v)}")
        for e in v:
            check(e > 0, lambda name=name, v=v: f"{name} must be positive, got {list(v)}")
    check(len(padding) == 2 * ndim, lambda: f"padding must have {2 * ndim} (lo, hi) entries, got {list(padding)}")
    for e in padding:
        check(e >= 0, lambda: f"padding must be non-negative, got {list(padding)}")
    check(padding_mode in PADDING_MODES, lambda: f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    for name, v in (("kernel_size", kernel_size), ("dilation", dilation), ("padding", padding), ("stride", stride)):
        # a bool is an int to Python and 1 to the schema, an int past int64 overflows a kernel's argument
        check(not any(isinstance(e, bool) or (isinstance(e, int) and e >= _GEOMETRY_LIMIT) for e in v),
              lambda name=name, v=v: f"{name} must be ints (not bools) below 2**60, got {list(v)}")
    out = []
    for i, (n, k, d, s) in enumerate(zip(in_size, kernel_size, dilation, stride)):
        lo, hi = padding[2 * i], padding[2 * i + 1]
        if padding_mode == "reflect":
            check(lo < n and hi < n, lambda lo=lo, hi=hi, n=n, i=i: f"padding ({lo}, {hi}) must be smaller "
                  f"than the input size {n} in dim {i} for padding_mode='reflect'")
        elif padding_mode == "replicate":  # an empty dim has nothing to replicate (a kernel would read index -1)
            check(n > 0, lambda n=n, i=i, size=list(in_size): f"padding_mode='replicate' needs a non-empty input "
                  f"along every spatial dim (there is nothing to replicate), got input size {size} (dim {i} is {n})")
        elif padding_mode == "circular":
            check(lo <= n and hi <= n, lambda lo=lo, hi=hi, n=n, i=i: f"padding ({lo}, {hi}) must be at most "
                  f"the input size {n} in dim {i} for padding_mode='circular'")
        span = d * (k - 1) + 1
        check(n + lo + hi >= span, lambda span=span, i=i, padded=n + lo + hi: f"kernel_size {list(kernel_size)} "
              f"with dilation {list(dilation)} spans {span} in dim {i}, larger than the padded input {padded}")
        out.append((n + lo + hi - span) // s + 1)
    return Geometry(tuple(in_size), tuple(kernel_size), tuple(dilation), tuple(padding), tuple(stride),
                    padding_mode, tuple(out))


_cached_geometry = functools.lru_cache(maxsize=4096)(_geometry)  # a Geometry is frozen: safe to share


def check_float_tensor(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check(t.dtype in FLOAT_DTYPES, lambda: f"{name} must have a floating dtype {FLOAT_DTYPES}, got {t.dtype}",
          TypeError)


def check_spatial_input(x: torch.Tensor) -> None:
    """``x`` is a floating ``[N, C, *spatial]`` tensor with 1-3 spatial dims (named ``input``)."""
    check_float_tensor(x, "input")
    check(3 <= x.dim() <= 5,
          lambda: f"input must be [N, C, *spatial] with 1-3 spatial dims, got shape {tuple(x.shape)}")


def check_columns_input(cols: torch.Tensor) -> None:
    """``cols`` is a floating ``[N, C·∏K, L]`` column matrix (named ``input``)."""
    check_float_tensor(cols, "input")
    check(cols.dim() == 3, lambda: f"input must be [N, C*prod(kernel_size), L], got shape {tuple(cols.shape)}")


def check_columns_divide(cols: torch.Tensor, kernel_numel: int) -> None:
    """``cols``' rows are whole kernels: ``C·∏K`` divisible by ``∏K``."""
    check(cols.shape[1] % kernel_numel == 0,
          lambda: f"input.shape[1]={cols.shape[1]} is not divisible by prod(kernel_size)={kernel_numel}")


def unfold_geometry(x: torch.Tensor, kernel_size, dilation, padding, stride, padding_mode) -> Geometry:
    """Checks for ``unfold(x, ...)``; ``x`` is ``[N, C, *spatial]``."""
    check_spatial_input(x)
    return geometry(tuple(x.shape[2:]), kernel_size, dilation, padding, stride, padding_mode)


def unfold_out_shape(x: torch.Tensor, g: Geometry) -> tuple:
    n, c = x.shape[:2]
    return (n, c * g.kernel_numel, g.num_blocks)


def fold_geometry(cols: torch.Tensor, output_size, kernel_size, dilation, padding, stride,
                  padding_mode) -> Geometry:
    """Checks for ``fold(cols, output_size, ...)``; ``cols`` is ``[N, C·∏K, L]``."""
    check_columns_input(cols)
    g = geometry(tuple(output_size), kernel_size, dilation, padding, stride, padding_mode)
    check_columns_divide(cols, g.kernel_numel)
    check(cols.shape[2] == g.num_blocks,
          lambda: f"output_size {list(output_size)} with this kernel_size/dilation/padding/stride gives "
          f"{list(g.out_size)} = {g.num_blocks} blocks, but input.shape[2]={cols.shape[2]}")
    return g


def fold_out_shape(cols: torch.Tensor, g: Geometry) -> tuple:
    return (cols.shape[0], cols.shape[1] // g.kernel_numel, *g.in_size)


# ----------------------------------------------------------------------------------------------
# unfold_transpose: the patches a transposed convolution sees
@dataclass(frozen=True)
class TransposeGeometry:
    """Resolved geometry of one transposed-convolution unfold (all per-dim tuples): input position ``i``
    reaches output position ``o = i·stride - padding + t·dilation`` through tap ``t``."""

    in_size: tuple
    kernel_size: tuple
    stride: tuple
    padding: tuple  # symmetric, one per dim (as nn.ConvTranspose takes it)
    output_padding: tuple
    dilation: tuple
    out_size: tuple

    @property
    def ndim(self) -> int:
        return len(self.in_size)

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def num_positions(self):
        """The number of output positions, ∏ out_size."""
        return math.prod(self.out_size)


def transpose_geometry(in_size: Sequence, kernel_size: Sequence, stride: Sequence, padding: Sequence,
                       output_padding: Sequence, dilation: Sequence) -> TransposeGeometry:
    """Check one transposed call's resolved arguments and compute its output size, as
    ``nn.ConvTranspose{1,2,3}d`` does: ``(in - 1)·stride - 2·padding + dilation·(kernel - 1) + output_padding + 1``.

    Raises:
        ValueError: wrong lengths, non-positive kernel_size/stride/dilation, negative padding or
            output_padding, an output_padding not smaller than stride or dilation (torch's rule), bools or
            ints from 2**60, or an output size below 1.
    """
    ndim = len(in_size)
    check(1 <= ndim <= 3, lambda: f"expected 1, 2 or 3 spatial dims, got {ndim}")
    args = (("kernel_size", kernel_size), ("stride", stride), ("padding", padding),
            ("output_padding", output_padding), ("dilation", dilation))
    for name, v in args:
        check(len(v) == ndim, lambda name=name, v=v: f"{name} must have {ndim} entries, got {list(v)}")
        check(not any(isinstance(e, bool) or (isinstance(e, int) and e >= _GEOMETRY_LIMIT) for e in v),
              lambda name=name, v=v: f"{name} must be ints (not bools) below 2**60, got {list(v)}")
        positive = name in ("kernel_size", "stride", "dilation")
        for e in v:
            check(e > 0 if positive else e >= 0, lambda name=name, v=v, positive=positive:
                  f"{name} must be {'positive' if positive else 'non-negative'}, got {list(v)}")
    out = []
    for i, (n, k, s, p, op, d) in enumerate(zip(in_size, kernel_size, stride, padding, output_padding, dilation)):
        check(op < s or op < d, lambda op=op, s=s, d=d, i=i: f"output_padding must be smaller than either stride "
              f"or dilation (as torch requires), got output_padding={op} with stride={s}, dilation={d} in dim {i}")
        o = (n - 1) * s - 2 * p + d * (k - 1) + op + 1
        check(o >= 1, lambda o=o, i=i: f"padding {list(padding)} leaves an output size of {o} (< 1) in dim {i} "
              f"for input size {list(in_size)}")
        out.append(o)
    return TransposeGeometry(tuple(in_size), tuple(kernel_size), tuple(stride), tuple(padding), tuple(output_padding),
                             tuple(dilation), tuple(out))


def transpose_output_padding(in_size: Sequence, output_size: Sequence, kernel_size: Sequence, stride: Sequence,
                             padding: Sequence, dilation: Sequence) -> tuple:
    """The ``output_padding`` that makes a transposed call's output ``output_size``, as
    ``nn.ConvTranspose{1,2,3}d.forward(input, output_size)`` resolves it: ``output_size`` may also carry the
    leading ``(N, C)`` (they are dropped), and each entry must lie in ``[min, min + stride - 1]`` with
    ``min`` the size at ``output_padding = 0``.

    Raises:
        TypeError: ``output_size`` is not a sequence of ints.
        ValueError: ``output_size`` has neither ``ndim`` nor ``ndim + 2`` entries, or a size out of that range.
    """
    ndim = len(in_size)
    if not (isinstance(output_size, Sequence) and not isinstance(output_size, str)
            and all(_is_int(v) for v in output_size)):
        raise TypeError(f"output_size must be a sequence of ints, got {output_size!r}")
    if len(output_size) == ndim + 2:
        output_size = output_size[2:]
    if len(output_size) != ndim:
        raise ValueError(f"output_size must have {ndim} or {ndim + 2} entries for {ndim}-d input, got "
                         f"{list(output_size)}")
    lo = [(n - 1) * s - 2 * p + d * (k - 1) + 1
          for n, k, s, p, d in zip(in_size, kernel_size, stride, padding, dilation)]
    hi = [m + s - 1 for m, s in zip(lo, stride)]
    for size, a, b in zip(output_size, lo, hi):
        check(a <= size <= b, lambda: f"output_size {list(output_size)} is unreachable: valid sizes range from "
              f"{lo} to {hi} (for an input of size {list(in_size)})")
    return tuple(plain_ints(size) - a for size, a in zip(output_size, lo))


def unfold_transpose_geometry(x: torch.Tensor, kernel_size, stride, padding, output_padding,
                              dilation) -> TransposeGeometry:
    """Checks for ``unfold_transpose(x, ...)``; ``x`` is ``[N, C, *spatial]``."""
    check_spatial_input(x)
    return transpose_geometry(tuple(x.shape[2:]), kernel_size, stride, padding, output_padding, dilation)


def unfold_transpose_out_shape(x: torch.Tensor, g: TransposeGeometry) -> tuple:
    n, c = x.shape[:2]
    return (n, c * g.kernel_numel, g.num_positions)


def unfold_transpose_backward_geometry(cols: torch.Tensor, input_size, kernel_size, stride, padding, output_padding,
                                       dilation) -> TransposeGeometry:
    """Checks for ``unfold_transpose_backward(cols, input_size, ...)``; ``cols`` is ``[N, C·∏K, ∏out]``."""
    check_columns_input(cols)
    g = transpose_geometry(tuple(input_size), kernel_size, stride, padding, output_padding, dilation)
    check_columns_divide(cols, g.kernel_numel)
    check(cols.shape[2] == g.num_positions,
          lambda: f"input.shape[2]={cols.shape[2]} must be the number of output positions {g.num_positions} "
          f"(an output of {list(g.out_size)} for input size {list(input_size)})")
    return g


def unfold_transpose_backward_out_shape(cols: torch.Tensor, g: TransposeGeometry) -> tuple:
    return (cols.shape[0], cols.shape[1] // g.kernel_numel, *g.in_size)


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


# ---------------------------------------------------------------------------------------------- patch_covariance
COVARIANCE_MODES = ("expand", "reduce")
GROUP_REDUCTIONS = ("blocks", "mean")


def check_groups(groups, channels: int) -> int:
    """``groups`` as a positive Python int dividing ``channels``.

    Raises:
        TypeError: ``groups`` is not an int (a bool neither).
        ValueError: ``groups`` is not positive or does not divide ``channels``.
    """
    check(_is_int(groups), lambda: f"groups must be an int, got {groups!r}", TypeError)
    groups = int(groups)
    check(groups > 0, lambda: f"groups must be positive, got {groups}")
    check(channels % groups == 0, lambda: f"groups={groups} must divide the input channels C={channels}")
    return groups


def covariance_shape(channels: int, groups: int, kernel_numel: int, bias: bool, group_mean: bool) -> tuple:
    """The factor's shape, ``[G', D', D']`` (``G' = 1`` when the groups are averaged first) with
    ``D' = C/G·∏K (+ 1 for the bias)``."""
    d = channels // groups * kernel_numel + int(bias)
    return (1 if group_mean else groups, d, d)


def check_out_buffer(out, shape: tuple, dtype: torch.dtype, device: torch.device, dtype_why: str) -> None:
    """``out`` must be the result's buffer: a tensor of exactly ``shape``, ``dtype`` (``dtype_why`` says why that
    one, in the message) and ``device`` (the input's).

    Raises:
        TypeError: ``out`` is not a tensor, or has another dtype.
        ValueError: ``out`` has another shape or device.
    """
    check(isinstance(out, torch.Tensor), lambda: f"out must be a tensor, got {type(out).__name__}", TypeError)
    check(out.dtype == dtype, lambda: f"out must be {dtype} ({dtype_why}), got {out.dtype}", TypeError)
    check(tuple(out.shape) == tuple(shape), lambda: f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    check(out.device == device, lambda: f"out must be on the input's device {device}, got {out.device}")


# ----------------------------------------------------------------------------------------------
# extract_patches: the patches of unfold, channel groups averaged, as [N, L, C/groups·∏K]
def extract_patches_geometry(x: torch.Tensor, kernel_size, dilation, padding, stride, padding_mode,
                             groups) -> Geometry:
    """Checks for ``extract_patches(x, ..., groups)``; ``x`` is ``[N, C, *spatial]``, ``groups`` divides C."""
    g = unfold_geometry(x, kernel_size, dilation, padding, stride, padding_mode)
    check_groups(groups, x.shape[1])
    return g


def extract_patches_out_shape(x: torch.Tensor, g: Geometry, groups) -> tuple:
    n, c = x.shape[:2]
    return (n, g.num_blocks, c // groups * g.kernel_numel)


def extract_patches_backward_geometry(grad: torch.Tensor, input_size, kernel_size, dilation, padding, stride,
                                      padding_mode, groups) -> Geometry:
    """Checks for ``extract_patches_backward(grad, input_size, ..., groups)``; ``grad`` is ``[N, L, C/groups·∏K]``."""
    check_float_tensor(grad, "grad")
    check(grad.dim() == 3, lambda: f"grad must be [N, L, C/groups*prod(kernel_size)], got shape {tuple(grad.shape)}")
    g = geometry(tuple(input_size), kernel_size, dilation, padding, stride, padding_mode)
    check(_is_int(groups) and groups > 0, lambda: f"groups must be a positive int, got {groups!r}")
    check(grad.shape[2] % g.kernel_numel == 0,
          lambda: f"grad.shape[2]={grad.shape[2]} is not divisible by prod(kernel_size)={g.kernel_numel}")
    check(grad.shape[1] == g.num_blocks,
          lambda: f"grad.shape[1]={grad.shape[1]} must be the number of positions L={g.num_blocks} (an output "
          f"grid of {list(g.out_size)} for input size {list(input_size)})")
    return g


def extract_patches_backward_out_shape(grad: torch.Tensor, g: Geometry, groups) -> tuple:
    return (grad.shape[0], groups * (grad.shape[2] // g.kernel_numel), *g.in_size)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range ``[first, last]`` that ``t`` (non-empty, non-negative strides) may touch."""
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size() - 1


def _self_overlapping(t: torch.Tensor) -> bool:
    """True unless each dim's stride steps past everything the smaller strides reach (a sufficient test:
    it also refuses a few exotic interleaved layouts that do not overlap)."""
    reach = 0  # the largest offset the dims of smaller strides reach
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def check_out_memory(out: torch.Tensor, **inputs: torch.Tensor) -> None:
    """``out`` must be distinct memory: no two of its elements at one address (an expanded buffer), none
    inside one of ``inputs`` (named by keyword). An in-place accumulation would otherwise read what it wrote.

    Raises:
        ValueError: ``out`` has elements that share memory, or shares memory with an input (named).
    """
    if out.numel() == 0 or out.device.type == "meta":
        return
    check(not _self_overlapping(out), lambda: f"out has elements that share memory (strides {out.stride()} for "
          f"shape {tuple(out.shape)}, an expanded view?): pass a buffer of distinct elements")
    for name, t in inputs.items():
        if t.numel():
            (a0, a1), (b0, b1) = _span(out), _span(t)
            check(a1 < b0 or b1 < a0, lambda name=name: f"out shares memory with {name}: it cannot accumulate "
                  f"over a tensor it is computed from; pass a separate buffer")


# ---------------------------------------------------------------------------------------------- masked_conv
def check_masked_conv_channels(x_shape, w_shape, groups) -> None:
    """The channel arithmetic of a (masked) convolution: a 3-5-d weight ``[C_out, C_in/groups, *kernel]``, a
    positive int ``groups`` dividing C_out, and ``C_in = weight.shape[1]·groups``.

    Raises:
        ValueError: any of these fails (naming weight, groups or the input's channels).
    """
    check(len(w_shape) in (3, 4, 5), lambda: f"weight must be [C_out, C_in/groups, *kernel] with 1-3 kernel dims, "
          f"got shape {tuple(w_shape)}")
    check(_is_int(groups) and groups > 0, lambda: f"groups must be a positive int, got {groups!r}")
    check(w_shape[0] % groups == 0, lambda: f"groups={groups} must divide the output channels "
          f"C_out={w_shape[0]} (weight.shape[0])")
    check(x_shape[1] == w_shape[1] * groups, lambda: f"input has C_in={x_shape[1]} channels but the weight "
          f"expects weight.shape[1]·groups = {w_shape[1]}·{groups} = {w_shape[1] * groups}")


def _check_masked_weight(weight: torch.Tensor, mask: torch.Tensor | None) -> None:
    if mask is not None:
        check(mask.dtype == torch.bool, lambda: f"mask must be a bool tensor here, got {mask.dtype}", TypeError)
        check(mask.shape == weight.shape, lambda: f"mask must have the weight's shape {tuple(weight.shape)}, got "
              f"{tuple(mask.shape)}")


def masked_conv_geometry(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None,
                         bias: torch.Tensor | None, stride, padding, dilation, groups: int,
                         padding_mode: str) -> Geometry:
    """Checks for ``masked_conv(x, weight, mask, bias, ...)`` with resolved geometry arguments.

    Raises:
        ValueError / TypeError: shapes, dtypes or devices that do not match (naming the argument), or a bad
            geometry.
    """
    nd = weight.dim() - 2
    check(x.dim() == nd + 2, lambda: f"input must be [N, C_in, *spatial] with {nd} spatial dims (the weight's "
          f"kernel dims), got shape {tuple(x.shape)}")
    check_masked_conv_channels(x.shape, weight.shape, groups)
    _check_masked_weight(weight, mask)
    # one meta operand among real ones sends the call to the fake (the Meta kernel), which would return an
    # uninitialised real tensor: refuse every device mix here, where both the fake and the torch path look
    for name, t in (("weight", weight), ("mask", mask), ("bias", bias)):
        check(t is None or t.device == x.device,
              lambda name=name, t=t: f"{name} is on {t.device} but input is on {x.device}")
    check(x.dtype == weight.dtype, lambda: f"input and weight must have the same dtype, got {x.dtype} and "
          f"{weight.dtype}", TypeError)
    if bias is not None:
        check(bias.dtype == weight.dtype, lambda: f"bias must have the weight's dtype {weight.dtype}, got "
              f"{bias.dtype}", TypeError)
        check(tuple(bias.shape) == (weight.shape[0],), lambda: f"bias must be [C_out] = [{weight.shape[0]}], got "
              f"shape {tuple(bias.shape)}")
    return geometry(tuple(x.shape[2:]), tuple(weight.shape[2:]), dilation, padding, stride, padding_mode)


def masked_conv_out_shape(x: torch.Tensor, weight: torch.Tensor, g: Geometry) -> tuple:
    return (x.shape[0], weight.shape[0], *g.out_size)


# ---------------------------------------------------------------------------------------------- coactivation
COACTIVATION_MODES = ("count", "correlation")


def check_weight_shape(weight_shape) -> tuple:
    """``weight_shape`` as a tuple of ints ``(C_out, C_in/groups, *kernel)`` with 1-3 kernel dims, every entry
    positive (torch's convolutions refuse an empty weight).

    Raises:
        TypeError: not a sequence of ints (bools refused).
        ValueError: not 3-5 entries, or an entry that is not positive.
    """
    if (not isinstance(weight_shape, Sequence) or isinstance(weight_shape, str)
            or not all(_is_int(e) for e in weight_shape)):
        raise TypeError(f"weight_shape must be a sequence of ints [C_out, C_in/groups, *kernel], got {weight_shape!r}")
    shape = tuple(plain_ints(e) for e in weight_shape)
    check(3 <= len(shape) <= 5, lambda: f"weight_shape must be [C_out, C_in/groups, *kernel] with 1-3 kernel dims, "
          f"got {shape}")
    for e in shape:
        check(e > 0, lambda: f"weight_shape must be positive, got {shape}")
    return shape


def check_coactivation_shapes(x_shape, y_shape, weight_shape: tuple, groups) -> None:
    """The ranks, batch and channels of ``coactivation(x, y, weight_shape, ..., groups)``: ``x`` ``[N, C_in, *in]``
    and ``y`` ``[N, C_out, *out]`` with ``weight_shape``'s number of kernel dims, ``C_in = weight_shape[1]·groups``,
    ``C_out = weight_shape[0]``, a positive int ``groups`` dividing it.

    Raises:
        TypeError: ``groups`` is not an int (a bool neither).
        ValueError: any of the rest fails, naming ``x``, ``y``, ``weight_shape`` or ``groups``.
    """
    nd = len(weight_shape) - 2
    check(len(x_shape) == nd + 2, lambda: f"x must be [N, C_in, *spatial] with {nd} spatial dims (weight_shape "
          f"{tuple(weight_shape)} has {nd} kernel dims), got shape {tuple(x_shape)}")
    check(len(y_shape) == nd + 2, lambda: f"y must be [N, C_out, *out] with {nd} spatial dims (weight_shape "
          f"{tuple(weight_shape)} has {nd} kernel dims), got shape {tuple(y_shape)}")
    check(_is_int(groups), lambda: f"groups must be an int, got {groups!r}", TypeError)
    check(groups > 0, lambda: f"groups must be positive, got {groups}")
    check(weight_shape[0] % groups == 0, lambda: f"groups={groups} must divide the output channels "
          f"C_out={weight_shape[0]} (weight_shape[0])")
    check(x_shape[1] == weight_shape[1] * groups, lambda: f"x has C_in={x_shape[1]} channels but weight_shape "
          f"{tuple(weight_shape)} with groups={groups} expects weight_shape[1]·groups = {weight_shape[1] * groups}")
    check(y_shape[1] == weight_shape[0], lambda: f"y has {y_shape[1]} channels but weight_shape "
          f"{tuple(weight_shape)} has C_out={weight_shape[0]}")
    check(y_shape[0] == x_shape[0], lambda: f"y has batch size {y_shape[0]} but x has {x_shape[0]}")


def check_coactivation_output_size(y_shape, g: Geometry) -> None:
    """``y``'s spatial size must be the convolution's output size.

    Raises:
        ValueError: it is not (naming ``y``, with the geometry that gives the expected size).
    """
    for i in range(g.ndim):
        check(y_shape[2 + i] == g.out_size[i], lambda: f"y must have the convolution's output size "
              f"{list(g.out_size)} (x's size {list(g.in_size)} with kernel {list(g.kernel_size)}, stride "
              f"{list(g.stride)}, padding {list(g.padding)}, dilation {list(g.dilation)}), got {list(y_shape[2:])}")


def coactivation_geometry(x: torch.Tensor, y: torch.Tensor, weight_shape, stride, padding, dilation, groups,
                          padding_mode: str) -> Geometry:
    """Checks for ``coactivation(x, y, weight_shape, ...)`` with resolved geometry arguments: ``x`` is the
    convolution's input ``[N, C_in, *in]``, ``y`` its output ``[N, C_out, *out]``, ``weight_shape`` its weight's
    ``[C_out, C_in/groups, *kernel]``, and the shapes must be what that convolution gives.

    Raises:
        TypeError: ``x`` or ``y`` is not a floating tensor, ``groups`` not an int.
        ValueError: a rank, batch, channel count or spatial size that does not match (naming ``x``, ``y``,
            ``weight_shape`` or ``groups``), tensors on two devices, or an invalid geometry.
    """
    check_float_tensor(x, "x")
    check_float_tensor(y, "y")
    check(y.device == x.device, lambda: f"y is on {y.device} but x is on {x.device}")
    check_coactivation_shapes(x.shape, y.shape, weight_shape, groups)
    g = geometry(tuple(x.shape[2:]), tuple(weight_shape[2:]), dilation, padding, stride, padding_mode)
    check_coactivation_output_size(y.shape, g)
    return g


def coactivation_dtype(x: torch.Tensor, mode: str) -> torch.dtype:
    """The result's dtype: float32 for ``'count'``, ``x``'s for ``'correlation'``."""
    return torch.float32 if mode == "count" else x.dtype
