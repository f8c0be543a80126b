"""Shape math of the transposed-convolution patches (unfold_transpose and its backward)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from convzoo._shapes._core import (
    _GEOMETRY_LIMIT,
    _Grid,
    _is_int,
    check,
    check_spatial_input,
    columns_geometry,
    plain_ints,
)


# ----------------------------------------------------------------------------------------------
# unfold_transpose: the patches a transposed convolution sees
@dataclass(frozen=True)
class TransposeGeometry(_Grid):
    """Resolved geometry of one transposed-convolution unfold (all per-dim tuples): input position ``i``
    reaches output position ``o = i·stride - padding + t·dilation`` through tap ``t``."""

    in_size: tuple
    kernel_size: tuple
    stride: tuple
    padding: tuple  # symmetric, one per dim (as nn.ConvTranspose takes it)
    output_padding: tuple
    dilation: tuple
    out_size: tuple

    def columns_mismatch(self, columns) -> str:
        """Why a column matrix with ``columns`` columns is not this geometry's patch matrix."""
        return (f"input.shape[2]={columns} must be the number of output positions {self.num_positions} "
                f"(an output of {list(self.out_size)} for input size {list(self.in_size)})")


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



def unfold_transpose_backward_geometry(cols: torch.Tensor, input_size, kernel_size, stride, padding, output_padding,
                                       dilation) -> TransposeGeometry:
    """Checks for ``unfold_transpose_backward(cols, input_size, ...)``; ``cols`` is ``[N, C·∏K, ∏out]``."""
    return columns_geometry(cols, lambda: transpose_geometry(tuple(input_size), kernel_size, stride, padding,
                                                             output_padding, dilation))

