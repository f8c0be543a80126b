"""``torch.nn.functional``-style entry points: normalise arguments, call the ops in :mod:`convzoo.ops`."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch

from convzoo import _shapes, reference
from convzoo import sparsity as _sparsity
from convzoo.ops import _autograd
from convzoo.ops import coactivation as _coactivation_ops
from convzoo.ops import ekfac as _ekfac_ops
from convzoo.ops import local_conv as _local_conv_ops
from convzoo.ops import masked_conv as _masked_conv_ops
from convzoo.ops import patch_covariance as _patch_covariance_ops
from convzoo.ops import patches as _patches_ops
from convzoo.ops import unfold as _unfold_ops
from convzoo.ops import unfold_transpose as _unfold_transpose_ops

__all__ = ["coactivation", "conv_matrix", "ekfac_eigenvalues", "extract_averaged_patches", "extract_patches", "fold",
           "local_conv", "masked_conv", "patch_covariance", "unfold", "unfold_transpose"]

# device types torch.autocast knows (torch.is_autocast_enabled raises for others, e.g. 'meta')
_AUTOCAST_DEVICE_TYPES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "ipu", "mtia", "maia")
                                   if torch.amp.is_autocast_available(d))


def _spatial_ndim(shape: tuple, *geometry) -> tuple[int, bool]:
    """``(spatial dims, batched)`` of an input of ``shape``, ``[N, C, *spatial]`` or ``[C, *spatial]``.

    The geometry arguments tell the rank when one of them is a sequence (as ``nn.Unfold((3, 3))``
    does): an input with one dim fewer than ``[N, C, *spatial]`` is then unbatched, as torch reads it.
    With ints only the input tells: ``[N, C, *spatial]``, so a 3-d input is a batch of 1-d signals.
    """
    told = _shapes.spatial_ndim_of(*geometry)
    if told is not None and 1 <= told <= 3 and len(shape) == told + 1:
        return told, False
    if not 3 <= len(shape) <= 5:
        raise ValueError(f"input must be [N, C, *spatial] with 1-3 spatial dims (or [C, *spatial] when a tuple "
                         f"argument tells the rank), got shape {tuple(shape)}")
    return len(shape) - 2, True


def _cache_key(*args) -> tuple | None:
    """``args`` as a hashable key when each is a str, a Python int or a flat tuple/list of Python ints
    (exact types: ``True``, ``3.0`` and ``np.int64(3)`` hash like ``1`` and ``3`` but must get the
    uncached path, to be rejected or converted there), else None."""
    key = []
    for v in args:
        t = type(v)
        if t is int or t is str:
            key.append(v)
        elif (t is tuple or t is list or t is torch.Size) and all(type(e) is int for e in v):
            key.append(tuple(v))  # a list and a tuple read alike; an int and a 1-tuple do not share a key
        else:
            return None
    return tuple(key)


def _resolved(resolve, cached, *args):
    """``resolve(*args)``, from its cached twin when the arguments make a cache key."""
    key = None if torch.compiler.is_compiling() else _cache_key(*args)
    return resolve(*args) if key is None else cached(*key)


def _positive_tuples(ndim, **values) -> list[tuple]:
    """Each ``name=value`` as a tuple of ``ndim`` ints (an int repeated), every entry positive, in order.

    Raises:
        TypeError, ValueError: as :func:`convzoo._shapes.as_tuple`, or an entry is not positive.
    """
    out = []
    for name, value in values.items():
        v = _shapes.as_tuple(value, ndim, name)
        if any(e <= 0 for e in v):
            raise ValueError(f"{name} must be positive, got {v}")
        out.append(v)
    return out


def _geometry_args(ndim, kernel_size, dilation, padding, stride, in_size, padding_mode):
    ks, dil, st = _positive_tuples(ndim, kernel_size=kernel_size, dilation=dilation, stride=stride)
    if not isinstance(padding_mode, str) or padding_mode not in _shapes.PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_shapes.PADDING_MODES}, got {padding_mode!r}")
    pad = _shapes.resolve_padding(padding, in_size, ks, dil, st)
    return ks, dil, tuple(pad), st, padding_mode


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
    _shapes.check_float_tensor(input, "input")
    batched, args = _resolved(_unfold_args, _cached_unfold_args, input.shape, kernel_size, dilation, padding,
                              stride, padding_mode)
    if not batched:
        return unfold(input[None], kernel_size, dilation, padding, stride, padding_mode=padding_mode)[0]
    return _unfold_ops.unfold(input, *_as_lists(args))


def _unfold_args(shape, kernel_size, dilation, padding, stride, padding_mode) -> tuple[bool, tuple]:
    """``(batched, resolved op arguments)`` of an unfold (or local_conv) call on an input of ``shape``."""
    ndim, batched = _spatial_ndim(shape, kernel_size, dilation, padding, stride)
    if not batched:
        return False, ()
    return True, _geometry_args(ndim, kernel_size, dilation, padding, stride, shape[2:], padding_mode)


# one entry per call signature (input shape and geometry arguments): the resolution and its checks run once
_cached_unfold_args = functools.lru_cache(maxsize=1024)(_unfold_args)


def _as_lists(args: tuple) -> list:
    """Fresh lists for the op (a cached resolution is shared): the string stays a string."""
    return [list(a) if isinstance(a, tuple) else a for a in args]


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
        input: ``[N, C_in, *spatial]``, floating dtype, any strides; or unbatched ``[C_in, *spatial]``
            when a tuple argument tells the rank (as for :func:`unfold`).
        weight: ``[C_out, C_in·∏kernel_size, L]`` with rows in :func:`unfold` order ``(c, k_0, ...)``
            and L the output positions in row-major order; any strides. Physically ``[L, C_out, C_in·∏K]``
            (a ``permute(1, 2, 0)`` of a contiguous tensor; :class:`convzoo.LocalConv2d` keeps this layout)
            is read in place; any other layout, hypnettorch's contiguous one included, costs one
            transposing copy of W per call (and one of its gradient).
        bias: ``[C_out, L]`` (per pixel), ``[C_out]`` (per channel) or None.
        kernel_size, stride, dilation: int or one int per spatial dim; positive.
        padding: int, per-dim ints, per-dim ``(lo, hi)`` pairs, ``'valid'`` or ``'same'``.
        padding_mode: ``'zeros'``, ``'circular'``, ``'reflect'`` or ``'replicate'``.

    Returns:
        ``[N, C_out, *out_spatial]`` (``[C_out, *out_spatial]`` for an unbatched input), contiguous.
        Under ``torch.autocast`` the op computes in the autocast dtype, tensors cast as ``F.conv2d``'s
        are (float64 ones stay float64); otherwise all dtypes must match.

    Raises:
        TypeError: a non-floating tensor, or ``weight``/``bias`` dtypes differing from the input's.
        ValueError: ``weight``/``bias`` shapes that do not match the input channels, the kernel or
            the number of output positions, or an invalid geometry (see :func:`unfold`).
    """
    _shapes.check_float_tensor(input, "input")
    batched, args = _resolved(_unfold_args, _cached_unfold_args, input.shape, kernel_size, dilation, padding,
                              stride, padding_mode)
    if not batched:
        return local_conv(input[None], weight, bias, kernel_size=kernel_size, stride=stride, padding=padding,
                          dilation=dilation, padding_mode=padding_mode)[0]
    _shapes.check_float_tensor(weight, "weight")
    if bias is not None:
        _shapes.check_float_tensor(bias, "bias")
    ks, dil, pad, st, mode = _as_lists(args)
    _check_not_unbatched(input, weight, ks)
    input, weight, bias = _autocast(input, weight, bias)
    if weight.dim() == 3 and not weight.permute(2, 0, 1).is_contiguous():  # one copy, not a strided matmul
        weight = _local_conv_ops.position_major(weight)
    return _local_conv_ops.local_conv(input, weight, bias, ks, dil, pad, st, mode)


def _check_not_unbatched(input: torch.Tensor, weight: torch.Tensor, kernel_size) -> None:
    """An int-only geometry reads a 3-d (4-d) input as a batch of 1-d (2-d) signals; when the weight says it
    is an unbatched 2-d (3-d) input instead, say so, naming the input, before the weight check does."""
    if weight.dim() != 3 or input.dim() > 4 or weight.shape[1] == input.shape[1] * math.prod(kernel_size):
        return
    k, nd = kernel_size[0], input.dim() - 1
    if all(e == k for e in kernel_size) and weight.shape[1] == input.shape[0] * k**nd:
        raise ValueError(
            f"input of shape {tuple(input.shape)} is read as a batched {nd - 1}-d input [N, C, *spatial] because "
            f"every geometry argument is an int, but the weight fits an unbatched {nd}-d input [C, *spatial]: "
            f"pass kernel_size as a {nd}-tuple, or add the batch dim (input.unsqueeze(0))")


def _autocast(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """torch's autocast rule for convolutions: under ``torch.autocast`` on the input's device type, every
    floating argument except float64 computes in the autocast dtype (custom ops are not autocast-aware)."""
    device_type = input.device.type
    if device_type not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t if t is None or t.dtype == torch.float64 else t.to(dtype)

    return cast(input), cast(weight), cast(bias)


def conv_matrix(weight: torch.Tensor, input_size, stride=1, padding=0, dilation=1, groups=1, *,
                padding_mode: str = "zeros", layout: str = "sparse_csr",
                max_dense_elements: int | None = None) -> torch.Tensor:
    """The matrix of a convolution: ``B`` with ``conv(x).flatten(1) == (B @ x.flatten(1).T).T``.

    ``conv`` is ``F.conv1d/2d/3d(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups)``
    on a batch ``x`` of shape ``[N, C_in, *input_size]`` (no bias: add it to the product). With a
    ``padding_mode`` other than ``'zeros'``, ``conv`` first pads ``x`` with ``F.pad(x, padding, mode)`` and
    then convolves without padding, as ``nn.Conv2d(padding_mode=...)`` does. The doubly-block Toeplitz
    matrix of the convolution, for 1, 2 or 3 spatial dims, built directly from index arithmetic
    (vectorised over channels, positions and taps; no convolution is run)::

        B[(o, l), (c, j)] = Σ_{k : tap k of output position l reads input pixel j} weight[o, c - g(o)·C_in/groups, k]

    for ``c`` in ``o``'s group ``g(o) = o // (C_out/groups)``, zero elsewhere. Rows are ``(o, l)`` and
    columns ``(c, j)`` in C order, matching ``flatten(1)``. With zero padding a tap reading the padding
    contributes nothing; with ``'reflect'``/``'replicate'``/``'circular'`` it reads the pixel the padding
    copies, and taps of one row that read the same pixel are summed (e.g. circular padding 1 of a 2-pixel
    input with a 3-tap kernel).

    Args:
        weight: ``[C_out, C_in/groups, *kernel]``, floating dtype, any strides, any device. The result
            has its dtype and device, and is differentiable w.r.t. it in every layout (the entries are
            a gather from ``weight``; duplicate taps are summed by ``coalesce``).
        input_size: the spatial size of the input, one int per kernel dim (an int is repeated).
        stride, dilation: int or one int per spatial dim; positive.
        padding: int, per-dim ints, per-dim ``(lo, hi)`` pairs, ``'valid'`` or ``'same'`` (stride 1 only,
            as torch; an odd total padding puts the extra element on the high side, as torch does).
        groups: as in ``F.conv2d``: ``C_in = groups·weight.shape[1]``; must divide ``C_out``.
        padding_mode: ``'zeros'``, ``'reflect'`` (padding < size), ``'replicate'`` or ``'circular'``
            (padding ≤ size).
        layout: ``'sparse_csr'`` (default), ``'sparse_coo'`` (coalesced) or ``'dense'``. Sparse indices
            are int64, so a matrix may have more than 2**31 rows, columns or entries.
        max_dense_elements: the most elements ``layout='dense'`` may allocate (default 2**28; never more
            than 2**31 whatever it says).

    Returns:
        ``B``, ``[C_out·∏out, C_in·∏input_size]`` with ``out`` the output size of the convolution, and
        about ``C_out·∏out·(C_in/groups)·∏kernel`` stored entries (fewer where taps read zero padding).

    Raises:
        TypeError: ``weight`` is not a floating tensor; ``input_size``, ``stride``, ``padding``,
            ``dilation``, ``groups`` or ``max_dense_elements`` is not an int (or a sequence of ints), or
            is a bool.
        ValueError: ``weight`` is not 3-5-d or has an empty kernel; ``input_size`` of the wrong length or
            not positive; non-positive stride/dilation/groups, negative padding, ``groups`` not dividing
            ``C_out``; ``padding='same'`` with a stride; an unknown padding, ``padding_mode`` or
            ``layout``; a kernel larger than the padded input; a padding too large for ``padding_mode``;
            ``layout='dense'`` beyond ``max_dense_elements`` or 2**31 elements.
    """
    nd = _shapes.conv_weight_ndim(weight)
    in_size = _shapes.as_tuple(input_size, nd, "input_size")
    if any(e <= 0 for e in in_size):
        raise ValueError(f"input_size must be positive, got {in_size}")
    if isinstance(padding, str) and padding == "same" and any(s != 1 for s in _shapes.as_tuple(stride, nd, "stride")):
        # torch refuses it too: with a stride, 'same' is no longer 'output size = input size'
        raise ValueError(f"padding='same' is not supported with stride {stride!r} (as in torch); pass the padding "
                         f"explicitly, e.g. as (lo, hi) pairs")
    _, dil, pad, st, mode = _geometry_args(nd, tuple(weight.shape[2:]), dilation, padding, stride, in_size,
                                           padding_mode)
    return reference.conv_matrix(weight, list(in_size), list(dil), list(pad), list(st), groups, mode, layout,
                                 max_dense_elements)


def _statistic_geometry(shape, kernel_size, stride, padding, output_padding, dilation, padding_mode,
                        transposed: bool):
    """``(batched, geom)`` of a patch statistic's layer (patch_covariance, ekfac_eigenvalues): ``geom`` is
    ``(kernel, stride, padding, output_padding, dilation, padding_mode)`` as lists, a ConvTranspose's (its inverse
    map) when ``transposed``; ``output_padding`` is refused without ``transposed``."""
    if transposed:
        return _covariance_transposed_args(shape, kernel_size, stride, padding, output_padding, dilation,
                                           padding_mode)
    if not _all_zero(output_padding):
        raise ValueError(f"output_padding={output_padding!r} applies only with transposed=True")
    batched, args = _resolved(_unfold_args, _cached_unfold_args, shape, kernel_size, dilation, padding, stride,
                              padding_mode)
    ks, dil, pad, st, pm = _as_lists(args) if batched else ([], [], [], [], padding_mode)
    return batched, (ks, st, pad, [0] * len(ks), dil, pm)


def patch_covariance(input: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, groups=1, *,
                     mode: str = "expand", group_reduction: str = "blocks", bias: bool = False, scale=None,
                     out: torch.Tensor | None = None, beta=None, transposed: bool = False, output_padding=0,
                     padding_mode: str = "zeros") -> torch.Tensor:
    """The input-side Kronecker factor of a convolution (KFAC / KFC), without forming the patch matrix.

    With ``p_{n,l}`` the patch of sample ``n`` at output position ``l`` (a column of :func:`unfold`, or of
    :func:`unfold_transpose` when ``transposed``), one per channel group ``g`` (``D = C/G·∏kernel_size`` rows):

    - ``mode='expand'`` (KFC, KFAC-expand): ``F_g = scale · Σ_n Σ_l p_{n,l} p_{n,l}ᵀ``;
    - ``mode='reduce'`` (KFAC-reduce): ``F_g = scale · Σ_n p̄_n p̄_nᵀ`` with ``p̄_n = (1/L)·Σ_l p_{n,l}``.

    ``scale=None`` is ``1/N`` in both modes: einconv's normalisation of its KFC and KFAC-reduce factors
    (``einconv.expressions.convNd_kfc`` / ``convNd_kfac_reduce``), so ``patch_covariance(x, ...)`` equals
    theirs. curvlinops' KFAC uses another normalisation (per output position, ``1/(N·L)`` for expand):
    pass ``scale=`` to match.

    ``mode='expand'`` runs on CUDA as one symmetric implicit GEMM: patch tiles gathered from ``input`` in
    the kernel and fed to ``tl.dot`` (fp32 accumulation for fp16/bf16; TF32 for fp32 only where
    ``torch.get_float32_matmul_precision()`` allows it), only the upper block-triangle computed and
    mirrored. On the CPU it is a chunked unfold + matmul whose extra memory is one chunk (≤ 32 MiB) of the
    patch matrix, never the whole. ``mode='reduce'`` never forms a patch: the per-position mean is a
    separable sum of shifted windows of ``input`` (see :func:`extract_averaged_patches`).

    Args:
        input: ``[N, C, *spatial]`` with 1, 2 or 3 spatial dims, floating dtype, any strides; or unbatched
            ``[C, *spatial]`` when a tuple argument tells the rank (as :func:`unfold` reads it; N = 1).
            Not differentiable: an input that requires grad is refused (pass ``input.detach()``).
        kernel_size, stride, dilation: int or one int per spatial dim; positive.
        padding: as in :func:`unfold` (int, per-dim, ``(lo, hi)`` pairs, ``'same'``, ``'valid'``); for a
            transposed layer an int or one int per dim, as ``nn.ConvTranspose`` takes it.
        groups: the layer's channel groups; must divide C.
        mode: ``'expand'`` or ``'reduce'``.
        group_reduction: ``'blocks'`` → ``[G, D, D]``, one factor per channel group (einconv's convention);
            ``'mean'`` → ``[D, D]``, the factor of the group-averaged input (curvlinops' convention: the
            groups of ``input`` are averaged first, then the factor is computed as for ``groups=1``).
        bias: append a constant 1 to every patch (the bias column of KFAC): ``D + 1`` rows, the last row
            and column holding ``scale·Σ p`` and ``scale·N·L`` (reduce: ``scale·Σ_n p̄_n`` and ``scale·N``).
        scale: a real number, or None for ``1/N`` (``1`` for an empty batch).
        out: the factor's buffer (its exact shape; fp32, fp64 for an fp64 input; any strides, same device):
            ``out ← out + new`` (accumulate), or ``out ← beta·out + (1 - beta)·new`` when ``beta`` is given
            (an exponential moving average), blended in the kernel's epilogue (same launch). Returned.
        beta: a real number in ``[0, 1]``; needs ``out``. ``beta=0`` overwrites ``out`` without reading it;
            a zero coefficient of the new factor (``beta=1``, ``scale=0``) does not read the input either (as
            BLAS's ``alpha = 0``): ``out`` is kept, or zeros returned, even for an input holding Inf or NaN.
        transposed: the factor of a ``ConvTranspose`` layer (patches of :func:`unfold_transpose`); then
            ``output_padding`` (int or per dim) applies and ``padding_mode`` must be ``'zeros'``.
        output_padding: see ``transposed``; must be 0 otherwise.
        padding_mode: ``'zeros'``, ``'circular'``, ``'reflect'`` or ``'replicate'``, read in place.

    Returns:
        ``[G, D, D]`` (``group_reduction='blocks'``) or ``[D, D]`` (``'mean'``), ``D = C/G·∏kernel_size
        (+ 1 with bias)``, symmetric, fp32 (fp64 for fp64 input); ``out`` itself when given.

    Raises:
        TypeError: ``input``/``out`` not a floating tensor or the wrong dtype, or an argument of the wrong
            type (``bias``/``transposed`` not bools, ``groups`` not an int, ``scale``/``beta`` not real).
        ValueError: an invalid geometry (see :func:`unfold` / :func:`unfold_transpose`), ``groups`` not
            positive or not dividing C, an unknown ``mode``/``group_reduction``/``padding_mode``, a
            non-finite ``scale``, ``beta`` outside ``[0, 1]`` or without ``out``, ``out`` of the wrong shape
            or device, ``output_padding`` without ``transposed``, a padding mode other than zeros or a
            string padding with ``transposed``, an input or ``out`` that requires grad, or an ``out`` whose
            elements share memory with each other or with ``input``.
    """
    _shapes.check_float_tensor(input, "input")
    _check_choice(mode, "mode", _shapes.COVARIANCE_MODES)
    _check_choice(group_reduction, "group_reduction", _shapes.GROUP_REDUCTIONS)
    for name, flag in (("bias", bias), ("transposed", transposed)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if input.requires_grad and torch.is_grad_enabled():
        raise ValueError("input requires grad, but patch_covariance is a statistic and not differentiable: pass "
                         "input.detach() (or call it under torch.no_grad())")
    batched, geom = _statistic_geometry(input.shape, kernel_size, stride, padding, output_padding, dilation,
                                        padding_mode, transposed)
    if not batched:
        return patch_covariance(input[None], kernel_size, stride, padding, dilation, groups, mode=mode,
                                group_reduction=group_reduction, bias=bias, scale=scale, out=out, beta=beta,
                                transposed=transposed, output_padding=output_padding, padding_mode=padding_mode)
    groups = _shapes.check_groups(groups, input.shape[1])
    # scale=None: the op divides by N itself, so a compiled graph does not specialise on the batch size
    per_sample = scale is None
    scale = 1.0 if per_sample else _real(scale, "scale")
    flags = (groups, transposed, mode == "reduce", bias, group_reduction == "mean", per_sample)
    if out is None:
        if beta is not None:
            raise ValueError("beta needs out: the moving average is kept in out")
        factor = _patch_covariance_ops.patch_covariance(input, *geom, *flags, scale)
        return factor[0] if group_reduction == "mean" else factor
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    kernel_numel = math.prod(geom[0])
    shape = _shapes.covariance_shape(input.shape[1], groups, kernel_numel, bias, group_reduction == "mean")
    _shapes.check_out_buffer(out, shape[1:] if group_reduction == "mean" else shape, dtype, input.device,
                             "the factor's accumulation dtype for this input")
    if out.requires_grad and torch.is_grad_enabled():  # torch refuses in-place ops on such leaves; a statistic too
        raise ValueError("out requires grad, but patch_covariance writes it in place, outside autograd: pass a buffer "
                         "that does not require grad (or call it under torch.no_grad())")
    if beta is None:
        alpha, coef = 1.0, scale
    else:
        beta = _real(beta, "beta")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        alpha, coef = beta, (1.0 - beta) * scale
    _patch_covariance_ops.patch_covariance_(out[None] if group_reduction == "mean" else out, input, *geom, *flags,
                                            alpha, coef)
    return out


def _all_zero(value) -> bool:
    """``value`` is the int 0 or a sequence of int zeros (an ``output_padding`` that pads nothing)."""
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else (value,)
    return all(_shapes._is_int(v) and int(v) == 0 for v in values)


def _check_choice(value, name: str, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _real(value, name: str) -> float:
    """``value`` as a finite Python float.

    Raises:
        TypeError: not a real number (a bool, a tensor, a string).
        ValueError: not finite.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # np.float64 is Real, a tensor is not
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not -math.inf < v < math.inf:  # not math.isfinite: a symbolic float under torch.compile has no such method
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _covariance_transposed_args(shape, kernel_size, stride, padding, output_padding, dilation, padding_mode):
    """``(batched, (kernel_size, stride, padding, output_padding, dilation, 'zeros'))`` of a transposed layer's
    patch_covariance call, checked as :func:`unfold_transpose` checks them."""
    if padding_mode != "zeros":
        raise ValueError(f"padding_mode must be 'zeros' with transposed=True (nn.ConvTranspose pads with zeros "
                         f"only), got {padding_mode!r}")
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int or one int per dim with transposed=True, got {padding!r}")
    ndim, batched = _spatial_ndim(shape, kernel_size, stride, padding, output_padding, dilation)
    if not batched:
        return False, ()
    ks, st, dil = _positive_tuples(ndim, kernel_size=kernel_size, stride=stride, dilation=dilation)
    pad = _shapes.as_tuple(padding, ndim, "padding")
    op = _shapes.as_tuple(output_padding, ndim, "output_padding")
    _shapes.transpose_geometry(shape[2:], ks, st, pad, op, dil)  # the geometry's errors, before any launch
    return True, (list(ks), list(st), list(pad), list(op), list(dil), "zeros")


# ----------------------------------------------------------------------------------------------
# EKFAC: the eigenvalue correction of a K-FAC block
def ekfac_eigenvalues(input: torch.Tensor, grad_output: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor,
                      kernel_size=None, stride=1, padding=0, dilation=1, groups=1, *, bias: bool = False, scale=None,
                      transposed: bool = False, output_padding=0, padding_mode: str = "zeros") -> torch.Tensor:
    """EKFAC's eigenvalue correction (George et al. 2018) of a convolution or Linear layer: the second moment of
    the per-sample weight gradients in the Kronecker factors' eigenbasis, without forming those gradients.

    ``s[g, i, j] = scale · Σ_n (Q_G[g]ᵀ dW_n[g] Q_A[g])²_{ij}`` with ``dW_n[g] = Σ_l g_{n,l} a_{n,l}ᵀ``: ``a_{n,l}``
    the patch of sample ``n`` at output position ``l`` in channel group ``g`` (a column of :func:`unfold`, or of
    :func:`unfold_transpose` when ``transposed``, with a constant 1 appended when ``bias``: the rows of
    :class:`convzoo.KFACFactors`' ``[G, D, D]`` factor A, whose eigenvectors ``Q_A`` are), ``g_{n,l}`` the layer's
    output gradient there (channels of group ``g``: the rows of the ``[G, C_out/G, C_out/G]`` gradient factor
    whose eigenvectors ``Q_G`` are). For a ``Linear`` layer (``kernel_size=None``) ``a_{n,l}`` is row ``l`` of
    sample ``n``'s input (``[N, *, in]``; the positions ``*`` share the weight, as in KFAC-expand).

    Per sample, the patches and output gradients are projected into the eigenbases (``Â = Q_Aᵀ P_n``,
    ``Ĝ = Q_Gᵀ G_n``) and contracted over the positions, the result squared and summed over the samples. On
    CUDA one fused Triton kernel: patch tiles gathered from ``input`` in the kernel (never written), both
    products ``tl.dot`` with fp32 accumulation (16-bit inputs: 16-bit operands, ``Q_A`` and the projected patches
    rounded to the input's dtype — in fp16 a projected patch entry, at most the patch's norm, must stay below
    65504; TF32 for fp32 only where ``torch.get_float32_matmul_precision()`` allows it); ``Ĝ`` is one batched
    matmul beforehand, the size of ``grad_output``. On the CPU, chunks of whole samples (≤ 32 MiB of patches
    and rotated gradients, at least one sample): the extra memory is one chunk.

    Scale: ``scale=None`` is ``N`` (the batch size), the convention for ``grad_output`` of a **mean-reduced**
    loss over the batch (``loss = (1/N)·Σ_n ℓ_n``, one loss term per sample): then ``s`` is
    ``(1/N)·Σ_n (Q_Gᵀ ∇_W ℓ_n Q_A)²``, the mean over samples of the per-sample losses' rotated gradients
    squared — what curvlinops' ``EKFACLinearOperator`` stores as its corrected eigenvalues for that batch
    (``loss_func`` with ``reduction='mean'``, ``separate_weight_and_bias=False``). For a sum-reduced loss pass
    ``scale=1`` (curvlinops' convention for ``reduction='sum'``; ``1/N`` gives the mean over samples); for a
    mean over ``N·T`` loss terms (sequence outputs) curvlinops uses ``N·T``.

    Args:
        input: the layer's input, ``[N, C_in, *spatial]`` with 1-3 spatial dims (or unbatched ``[C_in,
            *spatial]`` when a tuple argument tells the rank, N = 1); for a Linear ``[N, *, in]`` (or ``[in]``).
            Floating dtype, any strides.
        grad_output: the gradient of the loss w.r.t. the layer's output, ``[N, C_out, *out]`` (Linear:
            ``[N, *, out]``, the same ``*``), floating, same device; converted to the accumulator dtype to project.
        q_a: ``[G, D', D']`` (Linear: ``[D', D']``), ``D' = C_in/G·∏kernel_size (+1 with bias)``: the eigenvectors
            (columns) of A, as ``torch.linalg.eigh(A).eigenvectors``. Any orthogonal basis works; nothing checks
            orthogonality.
        q_g: ``[G, C_out/G, C_out/G]`` (Linear: ``[out, out]``): the eigenvectors of the gradient factor G.
        kernel_size: int or one int per spatial dim; ``None`` for a ``Linear`` layer (then the geometry
            arguments must keep their defaults).
        stride, dilation: int or one int per spatial dim; positive.
        padding: as in :func:`unfold` (int, per-dim, ``(lo, hi)`` pairs, ``'same'``, ``'valid'``); for a
            transposed layer an int or one int per dim, as ``nn.ConvTranspose`` takes it.
        groups: the layer's channel groups; must divide C_in and C_out.
        bias: append the bias column (the layer has a bias and A carries its column).
        scale: a finite real number, or None for ``N`` (see Scale).
        transposed: the statistic of a ``ConvTranspose`` layer (patches of :func:`unfold_transpose`); then
            ``output_padding`` applies and ``padding_mode`` must be ``'zeros'``.
        output_padding: see ``transposed``; must be 0 otherwise.
        padding_mode: ``'zeros'``, ``'circular'``, ``'reflect'`` or ``'replicate'``, read in place.

    Returns:
        ``[G, C_out/G, D']`` for a convolution (one block per group, like KFACFactors' A), ``[out, D']`` for a
        Linear; fp32 (fp64 for an fp64 input), non-negative. Zeros for an empty batch.

    Not differentiable (a statistic): inputs that require grad are refused.

    Raises:
        TypeError: a tensor argument that is not a floating tensor, ``bias``/``transposed`` not bools,
            ``groups`` not an int, ``scale`` not a real number.
        ValueError: an invalid geometry (see :func:`unfold` / :func:`unfold_transpose`), ``groups`` not dividing
            C_in or C_out, shapes of ``grad_output`` / ``q_a`` / ``q_g`` that do not fit the layer (named), tensors
            on different devices, a tensor that requires grad, a non-finite ``scale``, geometry arguments with
            ``kernel_size=None``, ``output_padding`` without ``transposed``.
    """
    tensors = (("input", input), ("grad_output", grad_output), ("q_a", q_a), ("q_g", q_g))
    for name, t in tensors:
        _shapes.check_float_tensor(t, name)
    for name, flag in (("bias", bias), ("transposed", transposed)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    for name, t in tensors:
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but ekfac_eigenvalues is a statistic and not differentiable: "
                             f"pass {name}.detach() (or call it under torch.no_grad())")
        if t.device != input.device:
            raise ValueError(f"{name} must be on the input's device {input.device}, got {t.device}")
    batch_scale = scale is None
    coef = 1.0 if batch_scale else _real(scale, "scale")
    if kernel_size is None:
        return _ekfac_linear(input, grad_output, q_a, q_g, stride, padding, dilation, groups, bias, batch_scale,
                             coef, transposed, output_padding, padding_mode)
    batched, geom = _statistic_geometry(input.shape, kernel_size, stride, padding, output_padding, dilation,
                                        padding_mode, transposed)
    if not batched:
        if grad_output.dim() != input.dim():
            raise ValueError(f"grad_output must be unbatched [C_out, *out] like input {tuple(input.shape)}, got shape "
                             f"{tuple(grad_output.shape)}")
        return ekfac_eigenvalues(input[None], grad_output[None], q_a, q_g, kernel_size, stride, padding, dilation,
                                 groups, bias=bias, scale=scale, transposed=transposed, output_padding=output_padding,
                                 padding_mode=padding_mode)
    groups = _shapes.check_groups(groups, input.shape[1])
    ks, st, pad, op, dil, pm = geom
    if transposed:
        out_size = _shapes.transpose_geometry(list(input.shape[2:]), ks, st, pad, op, dil).out_size
    else:
        out_size = _shapes.geometry(list(input.shape[2:]), ks, dil, pad, st, pm).out_size
    want = (input.shape[0], "C_out", *out_size)
    _shapes.check(grad_output.dim() == input.dim() and grad_output.shape[0] == input.shape[0]
                  and tuple(grad_output.shape[2:]) == tuple(out_size),
                  lambda: f"grad_output must be [N, C_out, *out] = {want} for this input and geometry, got shape "
                          f"{tuple(grad_output.shape)}")
    _shapes.check(grad_output.shape[1] % groups == 0,
                  lambda: f"groups={groups} must divide the output channels C_out={grad_output.shape[1]} "
                          f"(grad_output.shape[1])")
    dp = input.shape[1] // groups * math.prod(ks) + int(bias)
    co = grad_output.shape[1] // groups
    _check_basis(q_a, (groups, dp, dp), "q_a", "[G, C_in/G*prod(kernel_size) (+1 with bias), same]")
    _check_basis(q_g, (groups, co, co), "q_g", "[G, C_out/G, C_out/G]")
    return _ekfac_ops.ekfac_eigenvalues(input, grad_output, q_a, q_g, *geom, groups, transposed, bias, batch_scale,
                                        coef)


def _check_basis(q: torch.Tensor, shape: tuple, name: str, layout: str) -> None:
    _shapes.check(tuple(q.shape) == tuple(shape),
                  lambda: f"{name} must be {layout} = {tuple(shape)} for this layer, got shape {tuple(q.shape)}")


def _ekfac_linear(x, grad, q_a, q_g, stride, padding, dilation, groups, bias, batch_scale, coef, transposed,
                  output_padding, padding_mode) -> torch.Tensor:
    """A Linear layer's statistic: a 1-d convolution with kernel 1 over the positions ``*`` of ``[N, *, in]``."""
    defaults = {"stride": (stride, 1), "padding": (padding, 0), "dilation": (dilation, 1), "groups": (groups, 1),
                "transposed": (transposed, False), "output_padding": (output_padding, 0),
                "padding_mode": (padding_mode, "zeros")}
    for name, (value, default) in defaults.items():
        if not (type(value) is type(default) and value == default):
            raise ValueError(f"{name}={value!r} applies to a convolution only: kernel_size=None is a Linear layer")
    if x.dim() == 0:
        raise ValueError("input must be [N, *, in_features] (or [in_features]) for a Linear layer, got a scalar")
    if x.dim() == 1:  # unbatched: one sample
        if grad.dim() != 1:
            raise ValueError(f"grad_output must be [out_features] like the unbatched input, got shape "
                             f"{tuple(grad.shape)}")
        x, grad = x[None], grad[None]
    _shapes.check(grad.dim() == x.dim() and tuple(grad.shape[:-1]) == tuple(x.shape[:-1]),
                  lambda: f"grad_output must be [N, *, out_features] with input's leading dims "
                          f"{tuple(x.shape[:-1])}, got shape {tuple(grad.shape)}")
    n, d_in, d_out = x.shape[0], x.shape[-1], grad.shape[-1]
    dp = d_in + int(bias)
    _check_basis(q_a, (dp, dp), "q_a", "[in_features (+1 with bias), same]")
    _check_basis(q_g, (d_out, d_out), "q_g", "[out_features, out_features]")
    positions = math.prod(x.shape[1:-1])  # not -1: ambiguous for an empty batch
    xs = x.reshape(n, positions, d_in).transpose(1, 2)  # [N, in, positions]
    gs = grad.reshape(n, positions, d_out).transpose(1, 2)
    out = _ekfac_ops.ekfac_eigenvalues(xs, gs, q_a[None], q_g[None], [1], [1], [0, 0], [0], [1], "zeros", 1,
                                       False, bias, batch_scale, coef)
    return out[0]
# ----------------------------------------------------------------------------------------------
# KFAC patch statistics: the patches of a convolution's input in curvlinops' layout
def extract_patches(input: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, groups=1, *,
                    padding_mode: str = "zeros") -> torch.Tensor:
    """The patches a convolution multiplies with its weight, one row per output position, the channel groups
    averaged: curvlinops' ``extract_patches`` convention (the KFAC-expand input factor's rows), for 1, 2
    and 3 spatial dims.

    ``out[n, l, (c, k_0, k_1, ...)] = (1/groups)·Σ_g x_pad[n, g·C/groups + c, o_l·stride - lo + k·dilation]``
    with ``o_l`` the ``l``-th output position in row-major order and ``x_pad`` the input padded in
    ``padding_mode``: row ``l`` of sample ``n`` is column ``l`` of :func:`unfold` applied to the group-averaged
    input (``input.unflatten(1, (groups, -1)).mean(1)``). For ``groups=1`` that is
    ``unfold(input).transpose(1, 2)``, exactly (a copy). One launch on CUDA, written straight in this layout
    (no padded copy, no group-mean copy, no transposing copy); the group sum is in fp32 (fp64 for fp64) and
    rounded once. Differentiable under every transform (its adjoint, a fold broadcast to the groups, is the
    backward).

    Args:
        input: ``[N, C, *spatial]``, floating dtype, any strides; or unbatched ``[C, *spatial]`` when a tuple
            argument tells the rank (as :func:`unfold` reads it) → ``[L, C/groups·∏kernel_size]``.
        kernel_size, stride, dilation: int or one int per spatial dim; positive.
        padding: int, per-dim ints, per-dim ``(lo, hi)`` pairs, ``'valid'`` or ``'same'`` (``ceil(size /
            stride)`` positions per dim, the odd element of the padding on the high side; curvlinops refuses
            an unequal ``'same'`` padding, this takes it).
        groups: the convolution's channel groups; a positive int dividing ``C``. The patches of the groups
            are averaged (``groups=C``, depthwise: ``[N, L, ∏kernel_size]``).
        padding_mode: ``'zeros'``, ``'circular'``, ``'reflect'`` or ``'replicate'`` (the padding the
            convolution's ``padding_mode`` applies).

    Returns:
        ``[N, L, C/groups·∏kernel_size]``, contiguous, ``L = ∏ out`` positions (the convolution's output size).

    Raises:
        TypeError: ``input`` is not a floating tensor; an argument has the wrong type; ``groups`` is not an
            int (or is a bool).
        ValueError: wrong number of dims; non-positive kernel_size/stride/dilation; negative padding; an
            unknown padding or padding_mode; a kernel larger than the padded input; ``groups`` not positive
            or not dividing ``C``.
    """
    _shapes.check_float_tensor(input, "input")
    batched, args = _resolved(_unfold_args, _cached_unfold_args, input.shape, kernel_size, dilation, padding,
                              stride, padding_mode)
    if not batched:
        return extract_patches(input[None], kernel_size, stride, padding, dilation, groups,
                               padding_mode=padding_mode)[0]
    _shapes.check_groups(groups, input.shape[1])
    return _patches_ops.extract_patches(input, *_as_lists(args), _shapes.plain_ints(groups))


def extract_averaged_patches(input: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, groups=1, *,
                             padding_mode: str = "zeros") -> torch.Tensor:
    """The patches of :func:`extract_patches` averaged over the output positions: curvlinops'
    ``extract_averaged_patches`` (the KFAC-reduce input), for 1, 2 and 3 spatial dims, computed without
    forming the patches.

    ``out[n] = extract_patches(input, ...)[n].mean(0)`` (channel groups averaged too). The mean over
    positions is separable per spatial dim: tap ``k``'s sum over the output positions is the sum of a strided
    slice of the group-averaged input (:func:`convzoo.reference.averaged_patches`): O(N·C·∏in·K) work, no
    patch-sized memory, and an inf or NaN reaches only the entries whose tap reads it (curvlinops' einsum
    spreads it to every tap of its channel). Plain torch
    (small matmuls), no custom op: autograd, ``torch.func`` transforms, ``vmap`` and ``torch.compile``
    see ordinary differentiable ops. Computed in fp32 (fp64 for fp64), returned in the input's dtype.

    Args:
        input, kernel_size, stride, padding, dilation, groups, padding_mode: as in :func:`extract_patches`.

    Returns:
        ``[N, C/groups·∏kernel_size]`` (``[C/groups·∏kernel_size]`` for an unbatched input). The geometry
        check guarantees at least one output position, so the mean is always defined; an input with an
        empty spatial dim (zero padding) reads only padding and gives zeros.

    Raises:
        TypeError, ValueError: as :func:`extract_patches`.
    """
    _shapes.check_float_tensor(input, "input")
    batched, args = _resolved(_unfold_args, _cached_unfold_args, input.shape, kernel_size, dilation, padding,
                              stride, padding_mode)
    if not batched:
        return extract_averaged_patches(input[None], kernel_size, stride, padding, dilation, groups,
                                        padding_mode=padding_mode)[0]
    g = _shapes.extract_patches_geometry(input, *args, groups)
    x = input
    if groups != 1:  # summed in fp32 (fp64) and kept so: the result is rounded to the input's dtype once
        x = reference.group_mean(x, groups, torch.float64 if x.dtype == torch.float64 else torch.float32)
    return reference.averaged_patches(x, g).to(input.dtype)


def masked_conv(input: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None = None,
                stride=1, padding=0, dilation=1, groups=1, *, padding_mode: str = "zeros",
                block=None) -> torch.Tensor:
    """A convolution whose weight is multiplied by a 0/1 mask: ``F.convNd(input, weight·mask, bias, ...)``, with
    the weight gradient exactly zero where the mask is.

    1, 2 or 3 spatial dims (the rank is ``weight.dim() - 2``). A masked weight entry never contributes, even
    when it is NaN or Inf (the mask is applied with ``where``, not a product). On every device this runs the
    plain-torch path for now (``F.convNd`` on the masked weight, ``torch.nn.grad`` for its gradients); the
    tile-skipping Triton kernels of issue 12 plug into the same custom ops (``convzoo::masked_conv*``).

    Args:
        input: ``[N, C_in, *spatial]`` or unbatched ``[C_in, *spatial]``, floating, any strides.
        weight: ``[C_out, C_in/groups, *kernel]``, the input's dtype.
        mask: None (a dense convolution through the same ops), a bool tensor of the weight's shape, or 0/1
            values of the weight's dtype (checked, which reads the mask: pass a bool mask in a hot loop; not
            checked under ``torch.compile``). A floating mask that requires grad (e.g. from a straight-through
            estimator) gets the gradient autograd of ``F.convNd(input, weight·mask)`` gives it, ``dL/dW_eff ⊙ weight``
            (0 at a masked non-finite weight); such a call runs dense, as that needs ``dL/dW_eff`` everywhere.
        bias: ``[C_out]`` or None.
        stride, dilation: int or one int per spatial dim; positive.
        padding: int, per-dim ints, per-dim ``(lo, hi)`` pairs, ``'valid'`` or ``'same'`` (stride 1 only, as torch).
        groups: divides both C_in and C_out.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``, as ``nn.Conv2d``'s: the
            input padded by ``F.pad(input, padding, mode)`` then convolved without padding.
        block: None, or the mask's block ``(BO, BK)`` (powers of two ≥ 16; a ``MaskedConv``'s ``block``): the
            kernels then tile the weight matrix in that block (capped at 128 per side and at the matrix's size),
            so a mask that keeps or drops whole blocks is skipped block for block. None: the kernels' default
            tile for the layer's size. Never changes the result, only which tiles the kernels visit.

    Returns:
        ``[N, C_out, *out]`` (``[C_out, *out]`` for an unbatched input). Under ``torch.autocast`` it computes in
        the autocast dtype, as ``F.conv2d`` does.

    Raises:
        TypeError: a non-floating input/weight/bias, dtypes that differ, a mask that is neither bool nor the
            weight's dtype.
        ValueError: a weight that is not 3-5-d, a mask of another shape or with values other than 0 and 1,
            groups not dividing the channels, an input whose channels or rank do not match the weight,
            a bias that is not ``[C_out]``, an invalid geometry (see :func:`unfold`), a ``block`` entry that is
            not a power of two ≥ 16 (TypeError: ``block`` not a pair of ints).
    """
    if block is not None:
        block = list(_sparsity._check_block(block))
    _shapes.check_float_tensor(input, "input")
    _shapes.check_float_tensor(weight, "weight")
    if bias is not None:
        _shapes.check_float_tensor(bias, "bias")
    nd = _shapes.conv_weight_ndim(weight)
    if input.dim() == nd + 1:  # unbatched, as F.convNd reads it
        return masked_conv(input[None], weight, mask, bias, stride, padding, dilation, groups,
                           padding_mode=padding_mode, block=block)[0]
    if _mask_is_differentiated(mask):
        # dL/dmask = dL/dW_eff ⊙ W needs the dense weight gradient, also where the mask is 0: the op runs
        # unmasked on W_eff, which has the derivatives of weight·mask (every order) and where(mask, weight, 0)'s
        # value (a masked NaN/Inf stays invisible; its mask gradient is 0), and whose weight gradient is
        # g·mask (exactly zero where masked for a finite g)
        keep = _bool_mask(mask, weight)
        weight, mask = mask * torch.where(keep, weight, weight.nan_to_num(0.0, 0.0, 0.0)), None
    mask = _bool_mask(mask, weight)
    # shapes and geometry, resolved once per call signature; the op checks dtypes, the mask and the bias
    args = _resolved(_masked_conv_args, _cached_masked_conv_args, input.shape, weight.shape, stride, padding,
                     dilation, groups, padding_mode)
    input, weight, bias = _autocast(input, weight, bias)
    return _masked_conv_ops.masked_conv(input, weight, mask, bias, *_as_lists(args), block)


def _masked_conv_args(x_shape, w_shape, stride, padding, dilation, groups, padding_mode) -> tuple:
    """The resolved op arguments ``(stride, padding, dilation, groups, padding_mode)`` of a masked_conv call on
    shapes ``x_shape`` / ``w_shape``, after the shape checks (channels and groups named before the geometry)."""
    nd = len(w_shape) - 2
    if isinstance(padding, str) and padding == "same" and any(s != 1 for s in _shapes.as_tuple(stride, nd, "stride")):
        raise ValueError(f"padding='same' is not supported with stride {stride!r} (as in torch); pass the padding "
                         f"explicitly, e.g. as (lo, hi) pairs")
    if len(x_shape) != nd + 2:
        raise ValueError(f"input must be [N, C_in, *spatial] (or unbatched [C_in, *spatial]) with {nd} spatial dims "
                         f"for a weight of shape {tuple(w_shape)}, got shape {tuple(x_shape)}")
    _shapes.check_masked_conv_channels(x_shape, w_shape, groups)
    _, dil, pad, st, mode = _geometry_args(nd, tuple(w_shape[2:]), dilation, padding, stride, x_shape[2:],
                                           padding_mode)
    return st, pad, dil, int(groups), mode


_cached_masked_conv_args = functools.lru_cache(maxsize=1024)(_masked_conv_args)


def _mask_is_differentiated(mask) -> bool:
    """Whether ``mask`` is a floating tensor a gradient or tangent is asked of (``requires_grad`` with grad mode
    on, a ``torch.func`` transform or a forward-AD level active)."""
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
        return False
    if torch.compiler.is_compiling():
        return mask.requires_grad
    return _autograd.needs_function((mask,))


def _bool_mask(mask, weight: torch.Tensor) -> torch.Tensor | None:
    """``mask`` as the bool tensor the ops take.

    Raises:
        TypeError: not a tensor, or neither bool nor the weight's dtype.
        ValueError: another shape than the weight's, or values other than 0 and 1.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor or None, got {type(mask).__name__}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask must have the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype != weight.dtype:
        raise TypeError(f"mask must be bool or the weight's dtype {weight.dtype}, got {mask.dtype}")
    if not torch.compiler.is_compiling() and mask.device.type != "meta" and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 and 1 (a float mask is read as keep/drop, not as a scale)")
    return mask != 0


# ----------------------------------------------------------------------------------------------
# Hebbian statistics of a convolution's connections
def coactivation(x: torch.Tensor, y: torch.Tensor, weight_shape, stride=1, padding=0, dilation=1, groups=1, *,
                 x_threshold=0.0, y_threshold=0.0, mode: str = "count", out: torch.Tensor | None = None,
                 padding_mode: str = "zeros") -> torch.Tensor:
    """How much each connection ``W[o, c, k]`` of a convolution sees its input and its output active together:
    the Hebbian score of the Sparse-CNN / DSConv seed notebook, for 1, 2 and 3 spatial dims (the rank is
    ``len(weight_shape) - 2``), without its ``[N, C_out, C_in·∏K, L]`` intermediate.

    ``x`` is the convolution's input and ``y`` its output (``y = convNd(x, W, stride=..., ...)``, any bias or
    activation applied, as long as the shape is the convolution's); ``patch(x)[n, (c, k), l]`` is the input value
    that tap ``k`` of output position ``l`` reads through channel ``c`` of ``o``'s group, i.e. ``x[n, g(o)·C_in/G +
    c, l·stride - lo + k·dilation]`` (per dim; ``lo`` the low padding, ``g(o) = o // (C_out/G)``).

    - ``mode='count'``: ``H[o, c, k] = Σ_{n,l} [y[n,o,l] > y_threshold] · [patch(x)[n,(c,k),l] > x_threshold]``,
      the number of (sample, position) pairs where both ends are active (the seed's ``f3``/``f2`` with
      ``sigmoid(t) > 0.5``, i.e. ``t > 0``, as the default thresholds). A zero-padded position is absent, never
      active, whatever ``x_threshold`` (a negative one included: the seed's brute force skips those positions).
      A NaN is never active. float32, exact for counts below 2**24 (every count is at most ``N·L``).
    - ``mode='correlation'``: the seed's ``f2b`` score, ``H[o, c, k] = (1/L) Σ_l |corr_l|`` with, over the batch
      (``u = patch(x)[:, (c, k), l]``, ``v = y[:, o, l]``, N samples),
      ``corr_l = mean_n((u - ū)(v - v̄)) / (std(u)·std(v))``: the population covariance (÷ N) over the product of
      the *sample* standard deviations (÷ N-1, ``torch.std``'s default), i.e. ``(N-1)/N`` times the Pearson
      correlation, as the seed computes it; ``corr_l = 0`` where either std is 0 (a value constant over the
      batch, detected exactly: a zero-padded entry, a dead channel), and with fewer than 2 samples (one sample
      has no spread; the seed's sample std would be NaN there) every score is 0. Averaged over all ``L`` output
      positions, padded ones included (their terms are 0). Thresholds do not apply (pass the defaults).
      Computed from the batch-normalised tensors (centred first, then scaled: no ``E[x²] - E[x]²``
      cancellation) with one small GEMM per position over the batch, in fp32 (fp64 for fp64 ``x``); returned
      in ``x``'s dtype. A NaN in ``x`` (or an Inf among finite values) makes the scores of the connections that
      read it NaN; one in ``y`` those of its output channel.

    Not differentiable, and it does not need to be: ``x`` and ``y`` are read detached, so a layer may call it on
    its live input and output inside ``forward`` (no gradient flows through the scores). One call is one
    ``torch.library`` custom op (``convzoo::coactivation``, or ``convzoo::coactivation_`` with ``out``): it
    compiles under ``torch.compile(fullgraph=True, dynamic=True)``, runs on meta tensors and never synchronises
    with the host. Every device runs the plain-torch path for now: ``torch.nn.grad.convNd_weight`` of the
    binarized tensors (two fp32 0/1 copies, of ``x`` and ``y``) for ``'count'``; for ``'correlation'``, batch
    moments per position, chunked over positions so that the extra memory is the normalised copies of ``x``
    and ``y`` plus at most 32 MiB of per-position matrices.

    Args:
        x: the convolution's input ``[N, C_in, *in]`` (or unbatched ``[C_in, *in]``, with an unbatched ``y``),
            floating, any strides; may require grad.
        y: its output ``[N, C_out, *out]`` (``[C_out, *out]``), floating (any floating dtype, e.g. ``x``'s
            autocast dtype), on ``x``'s device.
        weight_shape: the convolution's weight shape ``[C_out, C_in/groups, *kernel]`` (ints, a ``torch.Size``).
        stride, dilation: int or one int per spatial dim; positive.
        padding: int, per-dim ints, per-dim ``(lo, hi)`` pairs, ``'valid'`` or ``'same'`` (stride 1 only, as torch).
        groups: the convolution's groups; divides ``C_out``, and ``C_in = weight_shape[1]·groups``.
        x_threshold, y_threshold: real numbers (Python or numpy floats/ints, ±inf allowed; not bools, not
            tensors): an entry is active when it is greater, compared in fp32 (fp64 for an fp64 tensor; an fp16/bf16
            entry is compared exactly, the threshold is not rounded to its dtype).
        mode: ``'count'`` or ``'correlation'``.
        out: a buffer of exactly ``weight_shape``, float32 (``'count'``) or ``x``'s dtype (``'correlation'``), on
            ``x``'s device, not overlapping ``x``/``y`` or itself: ``out += H`` in place (a sum over steps), and
            returned.
        padding_mode: ``'zeros'`` (the padding is absent, inactive), or ``'reflect'``, ``'replicate'``,
            ``'circular'``: then, as the convolution of ``nn.Conv2d(padding_mode=...)`` does, a padded position
            reads the input value it copies, and is active (or correlated) as that value is.

    Returns:
        ``H``, ``[C_out, C_in/groups, *kernel]`` (``out`` itself when given).

    Raises:
        TypeError: ``x``/``y`` not floating tensors; ``weight_shape`` not a sequence of ints; ``groups`` not an
            int; a threshold that is not a real number (a bool, a tensor, a string); ``out`` not a tensor or of
            the wrong dtype.
        ValueError: ``weight_shape`` not 3-5 positive entries; ``x``/``y`` ranks, batch sizes, channels or
            ``y``'s spatial size not matching the geometry (naming the argument); ``y`` on another device; an
            invalid geometry (see :func:`unfold`), ``'same'`` with a stride; an unknown ``mode`` or
            ``padding_mode``; a NaN threshold, or a non-zero threshold with ``mode='correlation'``; ``out`` of
            the wrong shape or device, requiring grad, with elements sharing memory or overlapping ``x``/``y``.
    """
    _shapes.check_float_tensor(x, "x")
    _shapes.check_float_tensor(y, "y")
    _check_choice(mode, "mode", _shapes.COACTIVATION_MODES)
    x_threshold, y_threshold = _threshold(x_threshold, "x_threshold"), _threshold(y_threshold, "y_threshold")
    if mode == "correlation" and (x_threshold != 0.0 or y_threshold != 0.0):
        raise ValueError(f"x_threshold and y_threshold apply to mode='count' only (the correlation reads the values "
                         f"themselves), got x_threshold={x_threshold}, y_threshold={y_threshold}")
    weight_shape = _shapes.check_weight_shape(weight_shape)
    nd = len(weight_shape) - 2
    if x.dim() == nd + 1:  # unbatched, as F.convNd reads it
        if y.dim() != nd + 1:
            raise ValueError(f"y must be unbatched [C_out, *out] like x (shape {tuple(x.shape)}), got shape "
                             f"{tuple(y.shape)}")
        return coactivation(x[None], y[None], weight_shape, stride, padding, dilation, groups,
                            x_threshold=x_threshold, y_threshold=y_threshold, mode=mode, out=out,
                            padding_mode=padding_mode)
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    # shapes and geometry, resolved once per call signature
    args = _resolved(_coactivation_args, _cached_coactivation_args, x.shape, y.shape, weight_shape, stride, padding,
                     dilation, groups, padding_mode)
    x, y = x.detach(), y.detach()  # a statistic of the activations: the autograd graph never sees it
    if out is None:
        return _coactivation_ops.coactivation(x, y, list(weight_shape), *_as_lists(args), x_threshold, y_threshold,
                                              mode)
    _shapes.check_out_buffer(out, weight_shape, _shapes.coactivation_dtype(x, mode), x.device,
                             "the result's dtype for this mode and x")
    if out.requires_grad and torch.is_grad_enabled():  # torch refuses in-place ops on such leaves; a statistic too
        raise ValueError("out requires grad, but coactivation adds into it in place, outside autograd: pass a buffer "
                         "that does not require grad (or call it under torch.no_grad())")
    _coactivation_ops.coactivation_(out, x, y, list(weight_shape), *_as_lists(args), x_threshold, y_threshold, mode)
    return out


def _coactivation_args(x_shape, y_shape, weight_shape, stride, padding, dilation, groups, padding_mode) -> tuple:
    """The resolved op arguments ``(stride, padding, dilation, groups, padding_mode)`` of a coactivation call on
    shapes ``x_shape`` / ``y_shape`` (``weight_shape`` already checked), after the shape checks."""
    nd = len(weight_shape) - 2
    if isinstance(padding, str) and padding == "same" and any(s != 1 for s in _shapes.as_tuple(stride, nd, "stride")):
        raise ValueError(f"padding='same' is not supported with stride {stride!r} (as in torch); pass the padding "
                         f"explicitly, e.g. as (lo, hi) pairs")
    _shapes.check_coactivation_shapes(x_shape, y_shape, weight_shape, groups)
    _, dil, pad, st, mode = _geometry_args(nd, tuple(weight_shape[2:]), dilation, padding, stride, x_shape[2:],
                                           padding_mode)
    _shapes.check_coactivation_output_size(y_shape, _shapes.geometry(tuple(x_shape[2:]), tuple(weight_shape[2:]),
                                                                       dil, pad, st, mode))
    return st, pad, dil, _shapes.plain_ints(groups), mode


_cached_coactivation_args = functools.lru_cache(maxsize=1024)(_coactivation_args)


def _threshold(value, name: str) -> float:
    """``value`` as a Python float, ±inf allowed (everything, or nothing, is above it).

    Raises:
        TypeError: not a real number (a bool, a tensor: reading one would synchronise with its device).
        ValueError: NaN (nothing is ever greater than NaN: every entry would be silently inactive).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # np.float64 is Real, a tensor is not
        raise TypeError(f"{name} must be a real number (a Python or numpy float or int), got {value!r}")
    v = float(value)
    if v != v:
        raise ValueError(f"{name} must not be NaN")
    return v
