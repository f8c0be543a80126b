"""unfold / fold (im2col / col2im) and the patches of a transposed convolution."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from convzoo import _shapes
from convzoo.functional._args import (
    _as_lists,
    _batched_unfold_args,
    _geometry_args,
    _positive_tuples,
    _resolved,
    _spatial_ndim,
)
from convzoo.ops import unfold as _unfold_ops
from convzoo.ops import unfold_transpose as _unfold_transpose_ops


def unfold(input: torch.Tensor, kernel_size, dilation=1, padding=0, stride=1, *,
           padding_mode: str = "zeros") -> torch.Tensor:
    """Extract sliding local blocks (im2col) from a batched ``[N, C, *spatial]`` input.

    Like :func:`torch.nn.functional.unfold`, for 1, 2 or 3 spatial dims: the output is
    ``[N, C·∏kernel_size, L]`` with rows ordered ``(c, k_0, k_1, ...)`` and the L blocks in
    row-major order of the output grid. One kernel launch for the whole batch on CUDA.

    Args:
        input: ``[N, C, *spatial]``, floating dtype, any strides (channels-last included). An input
            with one dim fewer is unbatched, ``[C, *spatial]`` → ``[C·∏kernel_size, L]``, when a tuple
            argument tells the rank (``kernel_size=(3, 3)`` on a 3-d input, as ``nn.Unfold`` reads it);
            with int arguments only, a 3-d input is a batch of 1-d signals (as unfoldNd reads it).
        kernel_size, dilation, stride: int or one int per spatial dim (Python or numpy ints); positive.
        padding: int, per-dim ints, per-dim ``(lo, hi)`` pairs, ``'valid'`` or ``'same'``
            (``ceil(size / stride)`` blocks per dim, strided too).
        padding_mode: ``'zeros'``, ``'circular'``, ``'reflect'`` or ``'replicate'``, read in place
            (no padded copy). ``'reflect'`` needs padding < size, ``'circular'`` padding ≤ size.

    Raises:
        TypeError: ``input`` is not a floating tensor, or an argument has the wrong type.
        ValueError: wrong number of dims, non-positive kernel_size/stride/dilation, negative
            padding, an unknown padding or padding_mode, a kernel larger than the padded input.
    """
    batched, args = _batched_unfold_args(input, kernel_size, dilation, padding, stride, padding_mode)
    if not batched:
        return unfold(input[None], kernel_size, dilation, padding, stride, padding_mode=padding_mode)[0]
    return _unfold_ops.unfold(input, *_as_lists(args))


def fold(input: torch.Tensor, output_size, kernel_size, dilation=1, padding=0, stride=1, *,
         padding_mode: str = "zeros") -> torch.Tensor:
    """Combine sliding local blocks into a ``[N, C, *output_size]`` tensor (col2im): the adjoint of
    :func:`unfold`, overlapping entries summed.

    Like :func:`torch.nn.functional.fold`, for 1, 2 or 3 spatial dims (the rank is the length of the
    first tuple among ``output_size``, ``kernel_size``, ... ; 2 if all are ints). Deterministic: a
    gather, no atomics, and no size limit short of memory.

    Args:
        input: ``[N, C·∏kernel_size, L]``, or unbatched ``[C·∏kernel_size, L]`` (→ ``[C, *output_size]``),
            floating dtype, any strides.
        output_size: the spatial size of the result.
        kernel_size, dilation, padding, stride, padding_mode: as in :func:`unfold`.

    Raises:
        TypeError: ``input`` is not a floating tensor, or an argument has the wrong type.
        ValueError: ``input`` is not 3-d, its shape does not match ``output_size`` and the geometry,
            or a geometry argument is invalid (see :func:`unfold`).
    """
    _shapes.check_float_tensor(input, "input")
    if input.dim() == 2:  # unbatched, as F.fold reads it
        return fold(input[None], output_size, kernel_size, dilation, padding, stride, padding_mode=padding_mode)[0]
    if input.dim() != 3:
        raise ValueError(f"input must be [N, C*prod(kernel_size), L] or unbatched [C*prod(kernel_size), L], "
                         f"got shape {tuple(input.shape)}")
    args = _resolved(_fold_args, _cached_fold_args, output_size, kernel_size, dilation, padding, stride,
                     padding_mode)
    return _unfold_ops.fold(input, *_as_lists(args))


def _fold_args(output_size, kernel_size, dilation, padding, stride, padding_mode) -> tuple:
    """The resolved op arguments of a fold call (they do not depend on the input's shape)."""
    ndim = _shapes.spatial_ndim_of(output_size, kernel_size, dilation, padding, stride, default=2)
    if not 1 <= ndim <= 3:
        raise ValueError(f"expected 1, 2 or 3 spatial dims, got output_size={output_size!r}")
    out = _shapes.as_tuple(output_size, ndim, "output_size")
    if any(e <= 0 for e in out):
        raise ValueError(f"output_size must be positive, got {out}")
    return out, *_geometry_args(ndim, kernel_size, dilation, padding, stride, out, padding_mode)


_cached_fold_args = functools.lru_cache(maxsize=1024)(_fold_args)


def unfold_transpose(input: torch.Tensor, kernel_size, stride=1, padding=0, output_padding=0, dilation=1, *,
                     output_size=None) -> torch.Tensor:
    """The sliding local blocks a transposed convolution sees (unfoldNd's ``unfold_transposeNd``).

    ``conv_transposeNd(input, weight)`` (``groups=1``, ``weight`` ``[C_in, C_out, *kernel_size]``) equals
    ``weight.flatten(2).permute(1, 0, 2).reshape(C_out, C_in·∏K) @ unfold_transpose(input)``, reshaped to
    the output grid. Entry ``(c, t)`` at output position ``o`` is ``input[c, i]`` where
    ``o = i·stride - padding + t·dilation`` (per dim), 0 where no input index lands there. Same order
    and values as ``unfoldNd.unfold_transposeNd``, bit for bit; 1, 2 or 3 spatial dims, one launch on CUDA.

    Args:
        input: ``[N, C, *spatial]``, floating dtype, any strides; or unbatched ``[C, *spatial]`` when a
            tuple argument tells the rank (as :func:`unfold` reads it) → ``[C·∏kernel_size, L]``.
        kernel_size, stride, dilation: int or one int per spatial dim; positive.
        padding: int or one int per spatial dim (symmetric, as ``nn.ConvTranspose`` takes it); non-negative.
        output_padding: int or one int per spatial dim, each smaller than its stride or its dilation.
        output_size: the output's spatial size (optionally with the leading ``(N, C)``), as
            ``nn.ConvTranspose{1,2,3}d.forward`` takes it; it replaces ``output_padding``.

    Returns:
        ``[N, C·∏kernel_size, L]`` with rows ordered ``(c, k_0, k_1, ...)`` and ``L = ∏ out`` positions in
        row-major order, ``out = (in - 1)·stride - 2·padding + dilation·(kernel_size - 1) + output_padding + 1``.

    Raises:
        TypeError: ``input`` is not a floating tensor, or an argument is not an int / sequence of ints (bools too).
        ValueError: wrong number of dims or entries, non-positive kernel_size/stride/dilation, negative
            padding/output_padding, output_padding not smaller than stride or dilation, an ``output_size`` out
            of the reachable range, or an output size below 1.
    """
    _shapes.check_float_tensor(input, "input")
    ndim, batched = _spatial_ndim(input.shape, kernel_size, stride, padding, output_padding, dilation)
    if not batched:
        if output_size is not None and isinstance(output_size, Sequence) and len(output_size) == ndim + 1:
            output_size = output_size[1:]  # unbatched [C, *spatial], as nn.ConvTranspose reads it
        return unfold_transpose(input[None], kernel_size, stride, padding, output_padding, dilation,
                                output_size=output_size)[0]
    ks, st = _positive_tuples(ndim, kernel_size=kernel_size, stride=stride)
    pad = _shapes.as_tuple(padding, ndim, "padding")
    (dil,) = _positive_tuples(ndim, dilation=dilation)
    if output_size is None:
        op = _shapes.as_tuple(output_padding, ndim, "output_padding")
    else:
        op = _shapes.transpose_output_padding(input.shape[2:], output_size, ks, st, pad, dil)
    return _unfold_transpose_ops.unfold_transpose(input, list(ks), list(st), list(pad), list(op), list(dil))
