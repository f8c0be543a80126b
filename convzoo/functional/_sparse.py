"""Masked sparse convolution and the Hebbian (coactivation) statistics of its connections."""

from __future__ import annotations

import functools

import torch

from convzoo import _shapes
from convzoo import sparsity as _sparsity
from convzoo.functional._args import (
    _as_lists,
    _autocast,
    _check_choice,
    _check_same_unstrided,
    _geometry_args,
    _resolved,
    _threshold,
)
from convzoo.ops import _autograd
from convzoo.ops import coactivation as _coactivation_ops
from convzoo.ops import masked_conv as _masked_conv_ops


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
    _check_same_unstrided(padding, stride, nd)
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
    _check_same_unstrided(padding, stride, nd)
    _shapes.check_coactivation_shapes(x_shape, y_shape, weight_shape, groups)
    _, dil, pad, st, mode = _geometry_args(nd, tuple(weight_shape[2:]), dilation, padding, stride, x_shape[2:],
                                           padding_mode)
    _shapes.check_coactivation_output_size(y_shape, _shapes.geometry(tuple(x_shape[2:]), tuple(weight_shape[2:]),
                                                                       dil, pad, st, mode))
    return st, pad, dil, _shapes.plain_ints(groups), mode


_cached_coactivation_args = functools.lru_cache(maxsize=1024)(_coactivation_args)
