"""Coactivation correlation scores (:func:`convzoo.functional.coactivation` with ``mode='correlation'``): one
Triton launch that reduces the per-position Pearson correlations over the positions inside the kernel, and
its launcher.

The score of connection ``W[o, c, k]`` of a convolution with input ``x`` and output ``y`` is
``S[o, c, k] = (N-1)/N · (1/L) Σ_l |Σ_n ŷ[n, o, l] · x̂_patch[n, (c, k), l]|``, ``ŷ`` and ``x̂`` the tensors
normalised over the batch (:func:`convzoo.reference._normalized_over_batch`: centred, unit norm over ``n``,
exactly 0 where constant over the batch; ``x`` in input space, so a patch entry reads a normalised input
value, and zero padding reads 0, the normalised value of a constant). The two normalised tensors are made in
torch (elementwise, O(x) + O(y) memory); the kernel never writes anything per position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from convzoo import _shapes, autotune, reference
from convzoo.autotune import Config, ConfigSpace, KernelSpec, TuneProblem
from convzoo.kernels import _common as cm

__all__ = ["coactivation_correlation"]


# ----------------------------------------------------------------------------------------------
@triton.jit
def coactivation_correlation_kernel(
    # output: the partial sums as [SPLIT, CO, CG, KT] (any strides); (o, k) of group g is (g·OG + o, k % CG, k // CG):
    # the tap-major column k = t·CG + c
    out_ptr,
    # inputs: the normalised output ŷ [N, CO, OD, OH, OW] and input x̂ [N, C, ID, IH, IW] (any strides)
    y_ptr, x_ptr,
    # runtime sizes: L = ∏out positions, OG = CO/G and CG = C/G channels per group, K = CG·∏kernel
    N, L, OG, CG, K, TO, TK, ROWS, ID, IH, IW, OH, OW,
    stride_yn, stride_yc, stride_yd, stride_yh, stride_yw,
    stride_xn, stride_xc, stride_xd, stride_xh, stride_xw,
    stride_os, stride_oo, stride_oc, stride_ot,
    # geometry
    KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, DIL: tl.constexpr,
    MODE: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    # tiles: a BLOCK_O × BLOCK_K score tile per program, BLOCK_N the batch step, SPLIT shares of the positions
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    """``out[s, g·OG + o, c, t] = Σ_{l in share s} |Σ_n ŷ[n, g·OG + o, l] · x̂_patch[n, (c, t), l]|``: one score
    tile (group ``g``, o-tile ``to``, k-tile ``j``) and one share ``s`` of the positions per program; per
    position one ``[BLOCK_O, N] @ [N, BLOCK_K]`` product over the batch (``BLOCK_N`` at a time, fp32
    accumulation, fp64 broadcast-sum for fp64), its magnitude added to the tile's accumulator. Every entry of
    ``out`` is written exactly once (no memset, no atomics).

    Roofline (``e`` bytes per operand element): FLOPs = 2·N·L·CO·(C/G)·∏kernel, the weight gradient's (plus
    CO·(C/G)·∏kernel·L absolute values and adds); bytes ≥ (N·C·∏in [x̂] + N·CO·L [ŷ])·e + SPLIT·CO·(C/G)·∏kernel·a
    (the partials, ``a`` the accumulator's bytes), plus the operand re-reads: each score tile gathers its own
    patch columns and ŷ rows at every position of its share, so x̂ is read by each o-tile of its group and ŷ
    by each k-tile (L2 hits when the tiles of one share run together, which the program order makes them
    do). The intensity per position is ~2·BO·BK/((BO + BK)·e) FLOP per gathered byte, as for the weight
    gradient: tensor-core bound for 64 × 64 tiles in fp16/bf16, but a batch of N < BLOCK_N pads the
    reduction with masked zeros (N = 32 with BLOCK_N = 64 wastes half the MMA) and the per-position |·|
    breaks the reduction over positions into L short products, each with its own accumulator round trip.
    Depthwise layers (OG = 1) use one lane of BLOCK_O: correct, not fast.

    Layout: the launcher stores ŷ and x̂ batch-innermost, so the ``[BLOCK_O, BLOCK_N]`` and ``[BLOCK_N,
    BLOCK_K]`` operand tiles are read with consecutive threads on consecutive samples (contiguous); the
    strides are free, any layout is correct.
    """
    # program id -> (share s, row (g, to), k-tile j), k-tiles fastest, shares slowest: the programs of one
    # share read the same positions of x̂ and ŷ, so they run together and hit in L2; the tile's output
    # channels (co in all of ŷ) and their mask
    s, _, j, g, o_ok, co = cm._split_tile(TK, ROWS, TO, OG, BLOCK_O)

    # offsets and masks: the tile's columns k = t·CG + c
    k = j * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    c = k % CG
    t = k // CG
    # tap-major k = t·CG + c as _patch_columns' unfold-order row c·∏kernel + t
    r = c * cm._taps(KS) + t
    x_g = x_ptr + g * CG * stride_xc
    y_rows = y_ptr + co * stride_yc

    # the share's positions: cdiv(L, SPLIT) each (L ≥ 1), the last ones may hold fewer or none
    per = (L - 1) // SPLIT + 1
    l0 = s * per
    count = tl.maximum(tl.minimum(per, L - l0), 0)

    # loop over the share's positions: per position the correlations over the batch, their magnitude summed
    acc = tl.zeros([BLOCK_O, BLOCK_K], dtype=ACC_DTYPE)
    for i in range(0, count):
        l = l0 + i
        ow = l % OW
        oh = (l // OW) % OH
        od = l // OW // OH  # not l // (OW * OH): an int32 product of two sizes
        y_l = y_rows + od * stride_yd + oh * stride_yh + ow * stride_yw
        # the patch columns of position l: an offset into x̂[n], and whether the tap reads anything (zero
        # padding reads nothing: 0, the normalised value of a constant); other modes read the copied entry
        off, ok = cm._patch_columns(r, l, ID, IH, IW, OH, OW, stride_xc, stride_xd, stride_xh, stride_xw,
                                    KS, ST, LO, DIL, MODE, False)
        col_ok = k_ok & ok
        x_l = x_g + off
        corr = tl.zeros([BLOCK_O, BLOCK_K], dtype=ACC_DTYPE)
        for n0 in range(0, N, BLOCK_N):
            n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            n_ok = n < N
            # samples past N read 0: they add nothing, so BLOCK_N ≥ 16 pads a small batch for tl.dot
            yt = tl.load(y_l[:, None] + n[None, :] * stride_yn, mask=o_ok[:, None] & n_ok[None, :], other=0)
            xt = tl.load(x_l[None, :] + n[:, None] * stride_xn, mask=n_ok[:, None] & col_ok[None, :], other=0)
            corr = cm._mma(yt, xt, corr, FP64, PRECISION, UPCAST)
        acc += tl.abs(corr)

    # masked store of the share's partial sums
    out = out_ptr + s * stride_os + co[:, None] * stride_oo + c[None, :] * stride_oc + t[None, :] * stride_ot
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=o_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------
# configs: a score tile BLOCK_O × BLOCK_K, the batch step BLOCK_N, the position split SPLIT
def _split(dims, bo: int, bk: int) -> int:
    """Shares of the positions: enough for two programs per SM, each share still ≥ 4 positions (a share costs
    a BO × BK partial written and summed). From the bucketed dims (``O`` per group; the groups are not a
    lookup dim, so a grouped layer gets more shares than it needs, never fewer)."""
    b = autotune.bucket
    tiles = max(1, b(dims["O"]) // bo) * max(1, b(dims["K"]) // bk)
    return cm._split_count(tiles, b(dims["L"]) // 4)


def _fits(bo: int, bk: int, bn: int, warps: int, stages: int, dtype) -> bool:
    """Two fp32 ``BO × BK`` accumulators (the position's correlations and the running sum) within 64 values
    per thread, the two operand tiles too, and the staged operand tiles within 160 KiB of the H100's 227
    (masked_conv's rule). ``elem``: the operands are the normalised tensors, fp32 for fp32, else 16-bit."""
    elem = 4 if dtype == torch.float32 else 2
    threads = 32 * warps
    return (2 * bo * bk <= 64 * threads and (bo + bk) * bn <= 64 * threads
            and stages * (bo + bk) * bn * elem <= 160 * 1024)


def _default(dims, dtype, interpret: bool) -> Config:
    """64 × 64 score tiles where the per-group ``[C_out/G, K]`` matrix has that much (the weight gradient's
    block), a batch step of 64 samples for the 16-bit dtypes and 32 for fp32's twice larger operands (at
    most the bucketed batch, at least 16 for ``tl.dot``), stages as :func:`_fits` allows, then SPLIT
    (:func:`_split`). fp64 is a broadcast-sum holding a BO × BLOCK_N × BK product: ≤ 8192 values. The
    interpreter pays per program and per step: the largest tiles, one share."""
    if interpret:
        return Config({"BLOCK_O": cm._fit(dims["O"], 16, 64), "BLOCK_K": cm._fit(dims["K"], 16, 128),
                       "BLOCK_N": cm._fit(dims["N"], 16, 64), "SPLIT": 1}, num_warps=4, num_stages=1)
    if dtype == torch.float64:
        bo, bk = cm._fit(dims["O"], 1, 16), cm._fit(dims["K"], 1, 32)
        bn = max(1, min(cm._fit(dims["N"], 1, 16), 8192 // (bo * bk)))
        return Config({"BLOCK_O": bo, "BLOCK_K": bk, "BLOCK_N": bn, "SPLIT": _split(dims, bo, bk)},
                      num_warps=4, num_stages=1)
    bo, bk = cm._fit(dims["O"], 16, 64), cm._fit(dims["K"], 16, 64)
    bn = cm._fit(dims["N"], 16, 64 if dtype in (torch.float16, torch.bfloat16) else 32)
    if bo < 64 and dtype in (torch.float16, torch.bfloat16):
        # fewer than 64 output channels per group: an MMA M of 32 rows (mma.sync, not wgmma). A 128-wide K tile
        # keeps the MMA work per step, a batch step of 32 keeps it spill-free (32 × 64 × 64 spilled 20 bytes;
        # 32 × 128 × 32, 4 warps: 168 registers, issue bound 0.78 on the static sm_90 report's local_2d_b256)
        bk, bn = cm._fit(dims["K"], 16, 128), min(bn, 32)
    warps = 4 if _fits(bo, bk, bn, 4, 1, dtype) else 8
    stages = 3 if dtype in (torch.float16, torch.bfloat16) else 2
    while stages > 1 and not _fits(bo, bk, bn, warps, stages, dtype):
        stages -= 1
    return Config({"BLOCK_O": bo, "BLOCK_K": bk, "BLOCK_N": bn, "SPLIT": _split(dims, bo, bk)},
                  num_warps=warps, num_stages=stages)


def _keep(cfg: Config, dtype) -> bool:
    """``tl.dot`` tiles ≥ 16 within :func:`_fits`' budgets (fp64: no ``tl.dot``, one stage, a broadcast product
    of ≤ 8192 values)."""
    bo, bk, bn = cfg.meta["BLOCK_O"], cfg.meta["BLOCK_K"], cfg.meta["BLOCK_N"]
    if dtype == torch.float64:
        return bo * bk * bn <= 8192 and cfg.num_stages == 1
    return min(bo, bk, bn) >= 16 and cfg.num_warps >= 4 and _fits(bo, bk, bn, cfg.num_warps, cfg.num_stages, dtype)


def _candidates(dims, dtype):
    fp64 = dtype == torch.float64
    for bo in (8, 16, 32, 64, 128):
        for bk in (8, 16, 32, 64, 128):
            for bn in (4, 8, 16, 32, 64) if fp64 else (16, 32, 64):
                for warps in (4, 8):
                    for stages in (1,) if fp64 else (2, 3):
                        for split in (1, 4, 16, 64):
                            if split > max(1, dims["L"]):
                                continue
                            cfg = Config({"BLOCK_O": bo, "BLOCK_K": bk, "BLOCK_N": bn, "SPLIT": split},
                                         num_warps=warps, num_stages=stages)
                            if _keep(cfg, dtype):
                                yield cfg


_SPACE = ConfigSpace({"BLOCK_O": (1, 128), "BLOCK_K": (1, 128), "BLOCK_N": (1, 128), "SPLIT": (1, 64)},
                     num_warps=(4, 8), num_stages=(1, 3), keep=_keep)


def _problem(layer, dtype, device) -> TuneProblem:
    """A tuning grid layer (groups 1): random input and output, the plain-torch path as the reference."""
    kernel, dil, pad, stride, mode = layer.geometry()
    o = layer.out_channels
    g = layer.resolved()
    dims = {"N": layer.n, "L": g.num_blocks, "O": o, "K": layer.c * layer.kernel_numel}
    weight_shape = [o, layer.c, *kernel]

    def setup():
        x = torch.randn(layer.n, layer.c, *layer.size, device=device, dtype=dtype)
        y = torch.randn(layer.n, o, *g.out_size, device=device, dtype=dtype)
        return (lambda cfg: coactivation_correlation(x, y, weight_shape, stride, pad, dil, 1, mode, config=cfg),
                lambda: reference.coactivation(x, y, weight_shape, stride, pad, dil, 1, mode, 0.0, 0.0,
                                               "correlation"))

    return TuneProblem(dims, setup)


SPEC = autotune.register(KernelSpec(
    "coactivation_correlation", coactivation_correlation_kernel, ("N", "L", "O", "K"), _default, _candidates,
    _problem, _SPACE))


# ----------------------------------------------------------------------------------------------
# launcher
def _batch_innermost(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` ``[N, C, *spatial]`` normalised over the batch, in ``dtype``, stored ``[*spatial, C, N]`` (returned as
    an ``[N, C, *spatial]`` view): the kernel's operand tiles then read consecutive samples."""
    nd = t.dim() - 2
    normalised = reference._normalized_over_batch(t, reference._acc(t.dtype))
    buf = t.new_empty((*t.shape[2:], t.shape[1], t.shape[0]), dtype=dtype)
    buf.copy_(normalised.permute(*range(2, 2 + nd), 1, 0))
    return buf.permute(nd + 1, nd, *range(nd))


def coactivation_correlation(x: torch.Tensor, y: torch.Tensor, weight_shape: list[int], stride: list[int],
                             padding: list[int], dilation: list[int], groups: int, padding_mode: str,
                             out: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """The correlation scores ``[C_out, C_in/groups, *kernel]`` of the convolution with input ``x`` ``[N, C_in,
    *in]`` and output ``y`` ``[N, C_out, *out]`` (1-3 spatial dims, any strides, one dtype), as
    :func:`convzoo.reference.coactivation` with ``mode='correlation'`` computes them: ``(N-1)/N · (1/L) Σ_l |r_l|``,
    ``r_l`` the Pearson correlations over the batch at output position ``l`` (0 where either std is 0; all 0
    for N < 2). Returned in ``x``'s dtype, or added into ``out`` (``out += S``, from the fp32 (fp64) scores)
    and ``out`` returned.

    ``padding`` is the flat ``[lo_0, hi_0, ...]`` list read in ``padding_mode`` (a padded tap reads the copied
    normalised input; zero padding reads 0). The normalised tensors are made in torch (fp32, fp64 for fp64;
    stored batch-innermost in ``x``'s dtype for fp16/bf16, the tensor cores' operands), then one launch plus a
    fixed-order sum of the SPLIT partials and the scale: deterministic, no atomics, extra memory O(x) + O(y) +
    SPLIT·O(weight). ``config`` overrides the autotune lookup.

    Raises:
        TypeError: ``x`` or ``y`` not a floating tensor, dtypes that differ, ``groups`` not an int.
        ValueError: shapes that do not match the geometry (naming ``x``, ``y``, ``weight_shape`` or
            ``groups``), bad geometry, another device, ``out`` not of ``weight_shape`` on ``x``'s device, or a
            device the kernels cannot run on.
    """
    # (1) check
    g = _shapes.coactivation_geometry(x, y, weight_shape, stride, padding, dilation, groups, padding_mode)
    _shapes.check(y.dtype == x.dtype, lambda: f"y has dtype {y.dtype} but x has {x.dtype}", TypeError)
    if out is not None:
        _shapes.check(isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(weight_shape)
                      and out.device == x.device,
                      lambda: f"out must be a tensor of weight_shape {list(weight_shape)} on {x.device}")
    cm._check_device(x)
    # (2) allocate: the scores in the accumulator's dtype; no launch for an empty result or fewer than two
    # samples (no spread: every score 0)
    acc_dtype = reference._acc(x.dtype)
    n, c = x.shape[0], x.shape[1]
    co, cg = int(weight_shape[0]), int(weight_shape[1])
    kt = g.kernel_numel
    og, k = co // groups, cg * kt
    if n < 2 or co == 0 or c == 0:
        h = x.new_zeros([int(v) for v in weight_shape], dtype=acc_dtype)
        return h.to(x.dtype) if out is None else out.add_(h)
    operand = acc_dtype if x.dtype == torch.float32 or acc_dtype == torch.float64 else x.dtype
    xn, yn = _batch_innermost(x, operand), _batch_innermost(y, operand)
    # (3) look up config and launch
    L = g.num_blocks
    cfg = config or autotune.lookup("coactivation_correlation", x.device, x.dtype, N=n, L=L, O=og, K=k)
    bo, bk, split = cfg.meta["BLOCK_O"], cfg.meta["BLOCK_K"], cfg.meta["SPLIT"]
    to, tk = triton.cdiv(og, bo), triton.cdiv(k, bk)
    part = torch.empty((split, co, cg, kt), dtype=acc_dtype, device=x.device)
    a = cm._as_3d(g)
    xs, ys = cm._as_5d(xn, g.ndim), cm._as_5d(yn, g.ndim)
    rows = groups * to
    grid = (split * rows * tk,)
    with cm._device(x):
        coactivation_correlation_kernel[grid](
            part, ys, xs,
            n, L, og, cg, k, to, tk, rows, *a["in"], a["out"][1], a["out"][2],
            *ys.stride(), *xs.stride(), *part.stride(),
            a["k"], a["s"], a["lo"], a["d"],
            _shapes.PADDING_MODE_CODES[g.padding_mode],
            **cm._math_args(operand, coactivation_correlation_kernel), **cfg.launch_kwargs(),
        )
    # the partials summed in a fixed order (deterministic), then scaled as the reference does
    h = (part[0] if split == 1 else part.sum(0)).mul_((n - 1) / (n * L)).view([int(v) for v in weight_shape])
    return h.to(x.dtype) if out is None else out.add_(h)

