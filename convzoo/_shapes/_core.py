"""The shared core of the shape math: argument normalisation, padding resolution, the sliding-window
``Geometry`` of unfold / fold, the tensor checks every op family uses."""

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


class _Grid:
    """What every resolved geometry derives from its ``in_size``, ``kernel_size`` and ``out_size`` (per-dim tuples):
    shared by :class:`Geometry` and ``TransposeGeometry``."""

    @property
    def ndim(self) -> int:
        return len(self.in_size)

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def num_positions(self):
        """The number of output positions, ∏ out_size: the column count of the patch matrix."""
        return math.prod(self.out_size)


@dataclass(frozen=True)
class Geometry(_Grid):
    """Resolved sliding-window geometry of one unfold/fold call (all per-dim tuples)."""

    in_size: tuple
    kernel_size: tuple
    dilation: tuple
    padding: tuple  # flat (lo_0, hi_0, lo_1, hi_1, ...)
    stride: tuple
    padding_mode: str
    out_size: tuple

    @property
    def num_blocks(self):
        """L, the number of sliding-window positions."""
        return self.num_positions

    def columns_mismatch(self, columns) -> str:
        """Why a column matrix with ``columns`` columns does not fold into this geometry."""
        return (f"output_size {list(self.in_size)} with this kernel_size/dilation/padding/stride gives "
                f"{list(self.out_size)} = {self.num_blocks} blocks, but input.shape[2]={columns}")

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


def patches_out_shape(x: torch.Tensor, g) -> tuple:
    """``[N, C·∏K, L]``: the patch matrix of ``x`` ``[N, C, *spatial]`` under ``g`` (a :class:`Geometry` or a
    ``TransposeGeometry``: unfold and unfold_transpose)."""
    n, c = x.shape[:2]
    return (n, c * g.kernel_numel, g.num_positions)


def columns_out_shape(cols: torch.Tensor, g) -> tuple:
    """``[N, C, *in]``: what a column matrix ``[N, C·∏K, L]`` is summed back into under ``g`` (fold and
    unfold_transpose_backward)."""
    return (cols.shape[0], cols.shape[1] // g.kernel_numel, *g.in_size)


# the per-op names the fakes and launchers use: the gather ops share one output shape, their adjoints another
unfold_out_shape = unfold_transpose_out_shape = patches_out_shape
fold_out_shape = unfold_transpose_backward_out_shape = columns_out_shape


def columns_geometry(cols: torch.Tensor, make_geometry):
    """Checks for a column op (fold, unfold_transpose_backward) on ``cols`` ``[N, C·∏K, L]``, in order: the
    column matrix itself, ``g = make_geometry()`` (its own errors), whole kernels per row, and ``L`` the number of
    positions of ``g`` (``g.columns_mismatch`` says why not). Returns ``g``."""
    check_columns_input(cols)
    g = make_geometry()
    check_columns_divide(cols, g.kernel_numel)
    check(cols.shape[2] == g.num_positions, lambda: g.columns_mismatch(cols.shape[2]))
    return g


def fold_geometry(cols: torch.Tensor, output_size, kernel_size, dilation, padding, stride,
                  padding_mode) -> Geometry:
    """Checks for ``fold(cols, output_size, ...)``; ``cols`` is ``[N, C·∏K, L]``."""
    return columns_geometry(cols, lambda: geometry(tuple(output_size), kernel_size, dilation, padding, stride,
                                                   padding_mode))

