"""``torch.nn.functional``-style entry points: normalise arguments, call the ops in :mod:`convzoo.ops`."""

from __future__ import annotations

import torch

from convzoo import _shapes
from convzoo.ops import local_conv as _local_conv_ops
from convzoo.ops import unfold as _unfold_ops

__all__ = ["fold", "local_conv", "unfold"]


def _spatial_ndim(input: torch.Tensor) -> int:
    """The number of spatial dims of a batched ``[N, C, *spatial]`` floating input (1-3)."""
    _shapes.check_float_tensor(input, "input")
    if not 3 <= input.dim() <= 5:
        raise ValueError(f"input must be [N, C, *spatial] with 1-3 spatial dims, got shape {tuple(input.shape)}")
    return input.dim() - 2


def _geometry_args(ndim, kernel_size, dilation, padding, stride, in_size, padding_mode):
    ks = _shapes.as_tuple(kernel_size, ndim, "kernel_size")
    dil = _shapes.as_tuple(dilation, ndim, "dilation")
    st = _shapes.as_tuple(stride, ndim, "stride")
    for name, v in (("kernel_size", ks), ("dilation", dil), ("stride", st)):
        if any(e <= 0 for e in v):
            raise ValueError(f"{name} must be positive, got {v}")
    if not isinstance(padding_mode, str) or padding_mode not in _shapes.PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_shapes.PADDING_MODES}, got {padding_mode!r}")
    pad = _shapes.resolve_padding(padding, in_size, ks, dil, st)
    return list(ks), list(dil), pad, list(st), padding_mode


def unfold(input: torch.Tensor, kernel_size, dilation=1, padding=0, stride=1, *,
           padding_mode: str = "zeros") -> torch.Tensor:
    """Extract sliding local blocks (im2col) from a batched ``[N, C, *spatial]`` input.

    Like :func:`torch.nn.functional.unfold`, for 1, 2 or 3 spatial dims: the output is
    ``[N, C·∏kernel_size, L]`` with rows ordered ``(c, k_0, k_1, ...)`` and the L blocks in
    row-major order of the output grid. One kernel launch for the whole batch on CUDA.

    Args:
        input: ``[N, C, *spatial]``, floating dtype, any strides (channels-last included).
        kernel_size, dilation, stride: int or one int per spatial dim; positive.
        padding: int, per-dim ints, per-dim ``(lo, hi)`` pairs, ``'valid'`` or ``'same'``
            (``ceil(size / stride)`` blocks per dim, strided too).
        padding_mode: ``'zeros'``, ``'circular'``, ``'reflect'`` or ``'replicate'``, read in place
            (no padded copy). ``'reflect'`` needs padding < size, ``'circular'`` padding ≤ size.

    Raises:
        TypeError: ``input`` is not a floating tensor, or an argument has the wrong type.
        ValueError: wrong number of dims, non-positive kernel_size/stride/dilation, negative
            padding, an unknown padding or padding_mode, a kernel larger than the padded input.
    """
    ndim = _spatial_ndim(input)
    args = _geometry_args(ndim, kernel_size, dilation, padding, stride, input.shape[2:], padding_mode)
    return _unfold_ops.unfold(input, *args)


def fold(input: torch.Tensor, output_size, kernel_size, dilation=1, padding=0, stride=1, *,
         padding_mode: str = "zeros") -> torch.Tensor:
    """Combine sliding local blocks into a ``[N, C, *output_size]`` tensor (col2im): the adjoint of
    :func:`unfold`, overlapping entries summed.

    Like :func:`torch.nn.functional.fold`, for 1, 2 or 3 spatial dims (the rank is the length of the
    first tuple among ``output_size``, ``kernel_size``, ... ; 2 if all are ints). Deterministic: a
    gather, no atomics, and no size limit short of memory.

    Args:
        input: ``[N, C·∏kernel_size, L]``, floating dtype, any strides.
        output_size: the spatial size of the result.
        kernel_size, dilation, padding, stride, padding_mode: as in :func:`unfold`.

    Raises:
        TypeError: ``input`` is not a floating tensor, or an argument has the wrong type.
        ValueError: ``input`` is not 3-d, its shape does not match ``output_size`` and the geometry,
            or a geometry argument is invalid (see :func:`unfold`).
    """
    _shapes.check_float_tensor(input, "input")
    if input.dim() != 3:
        raise ValueError(f"input must be [N, C*prod(kernel_size), L], got shape {tuple(input.shape)}")
    ndim = _shapes.spatial_ndim_of(output_size, kernel_size, dilation, padding, stride, default=2)
    if not 1 <= ndim <= 3:
        raise ValueError(f"expected 1, 2 or 3 spatial dims, got output_size={output_size!r}")
    out = _shapes.as_tuple(output_size, ndim, "output_size")
    if any(e <= 0 for e in out):
        raise ValueError(f"output_size must be positive, got {out}")
    args = _geometry_args(ndim, kernel_size, dilation, padding, stride, out, padding_mode)
    return _unfold_ops.fold(input, list(out), *args)


def local_conv(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, kernel_size,
               stride=1, padding=0, dilation=1, padding_mode: str = "zeros") -> torch.Tensor:
    """Locally connected convolution: a convolution without weight sharing.

    Output position ``l`` of channel ``o`` is the Frobenius inner product of the input patch at
    ``l`` with that position's own filter ``weight[o, :, l]``, plus a bias:
    ``y[n, o, l] = Σ_r unfold(input)[n, r, l] · weight[o, r, l] + bias[o, l]``, i.e. hypnettorch's
    ``einsum('nkl,okl->nol', unfold(x), W) + bias``, for 1, 2 or 3 spatial dims. The patches are
    gathered inside the kernels and never written to memory (on the CPU path: one unfold and a
    matmul per position, never the ``[N, C_out, C_in·∏K, L]`` broadcast).

    Args:
        input: ``[N, C_in, *spatial]``, floating dtype, any strides.
        weight: ``[C_out, C_in·∏kernel_size, L]`` with rows in :func:`unfold` order ``(c, k_0, ...)``
            and L the output positions in row-major order; any strides. Fastest on the GPU when
            physically ``[L, C_out, C_in·∏K]`` (pass its ``permute(1, 2, 0)``), the layout
            :class:`convzoo.LocalConv2d` keeps.
        bias: ``[C_out, L]`` (per pixel), ``[C_out]`` (per channel) or None.
        kernel_size, stride, dilation: int or one int per spatial dim; positive.
        padding: int, per-dim ints, per-dim ``(lo, hi)`` pairs, ``'valid'`` or ``'same'``.
        padding_mode: ``'zeros'``, ``'circular'``, ``'reflect'`` or ``'replicate'``.

    Returns:
        ``[N, C_out, *out_spatial]``, contiguous. Under ``torch.autocast`` the op computes in the
        autocast dtype (inputs cast as ``F.conv2d``'s are); otherwise all dtypes must match.

    Raises:
        TypeError: a non-floating tensor, or ``weight``/``bias`` dtypes differing from the input's.
        ValueError: ``weight``/``bias`` shapes that do not match the input channels, the kernel or
            the number of output positions, or an invalid geometry (see :func:`unfold`).
    """
    ndim = _spatial_ndim(input)
    _shapes.check_float_tensor(weight, "weight")
    if bias is not None:
        _shapes.check_float_tensor(bias, "bias")
    ks, dil, pad, st, mode = _geometry_args(ndim, kernel_size, dilation, padding, stride, input.shape[2:],
                                            padding_mode)
    if torch.is_autocast_enabled(input.device.type):  # like F.conv2d: compute in the autocast dtype
        dtype = torch.get_autocast_dtype(input.device.type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return _local_conv_ops.local_conv(input, weight, bias, ks, dil, pad, st, mode)
