"""Curvature statistics of a layer: KFAC patch covariances, EKFAC eigenvalues, curvlinops-style patches."""

from __future__ import annotations

import math

import torch

from convzoo import _shapes, reference
from convzoo.functional._args import (
    _all_zero,
    _as_lists,
    _batched_unfold_args,
    _cached_unfold_args,
    _check_choice,
    _positive_tuples,
    _real,
    _resolved,
    _spatial_ndim,
    _unfold_args,
)
from convzoo.ops import ekfac as _ekfac_ops
from convzoo.ops import patch_covariance as _patch_covariance_ops
from convzoo.ops import patches as _patches_ops


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
    batched, args = _batched_unfold_args(input, kernel_size, dilation, padding, stride, padding_mode)
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
    batched, args = _batched_unfold_args(input, kernel_size, dilation, padding, stride, padding_mode)
    if not batched:
        return extract_averaged_patches(input[None], kernel_size, stride, padding, dilation, groups,
                                        padding_mode=padding_mode)[0]
    g = _shapes.extract_patches_geometry(input, *args, groups)
    x = input
    if groups != 1:  # summed in fp32 (fp64) and kept so: the result is rounded to the input's dtype once
        x = reference.group_mean(x, groups, torch.float64 if x.dtype == torch.float64 else torch.float32)
    return reference.averaged_patches(x, g).to(input.dtype)
