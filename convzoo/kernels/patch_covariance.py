"""patch_covariance (KFAC-expand / KFC input factor) for 1-, 2- and 3-d convolutions and transposed
convolutions: a symmetric implicit GEMM, Triton kernel and launcher.

For each channel group ``g`` the factor is ``F_g = Σ_{n,l} p_{n,l} p_{n,l}ᵀ`` over the ``D = C/G·∏K`` rows
of the patch matrix (plus a constant-1 bias row). The kernel tiles ``F_g`` in ``BLOCK_D × BLOCK_D`` tiles,
computes only the upper block-triangle (the diagonal tiles whole), loops over the reduction dim
``M = N·L`` (every sample and position) in ``BLOCK_M`` steps, gathers both operand tiles from ``x``
with the unfold index math (``_patch_columns``; for a transposed layer the inverse map, as
``unfold_transpose`` does), and feeds them to ``tl.dot``; the patch matrix is never written. Each
upper tile is stored twice, as itself and mirrored. A split over ``M`` (``SPLIT`` programs per tile,
each writing a partial into a workspace that the launcher sums) fills the GPU when ``F`` has few tiles;
no atomics, so the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from convzoo import _shapes, autotune, reference
from convzoo.autotune import Config, ConfigSpace, KernelSpec, TuneProblem
from convzoo.kernels._common import (
    _as_5d,
    _check_device,
    _device,
    _math_args,
    _mma,
    _pad3,
    _patch_columns,
    _widen,
)

__all__ = ["patch_covariance"]


@triton.jit
def _patch_tile(x_ptr, r, m, D, M, L, ID, IH, IW, OH, OW,
                stride_xn, stride_xc, stride_xd, stride_xh, stride_xw,
                KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                MODE: tl.constexpr, TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr):
    """The patch-matrix tile ``P[r, m]`` (rows ``r`` ``[BLOCK_D, 1]``, columns ``m = n·L + l``
    ``[1, BLOCK_M]``) of one channel group (``x_ptr`` at its first channel): 0 outside ``r < D``,
    ``m < M`` and where padding reads nothing; row ``D`` is the constant 1 when ``HAS_BIAS``. ``UPCAST``
    (bf16 under the interpreter, which has no bf16 constants either) widens the tile to fp32 here."""
    n = m // L
    l = m % L
    off, ok = _patch_columns(r, l, ID, IH, IW, OH, OW, stride_xc, stride_xd, stride_xh, stride_xw,
                             KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, MODE, TRANSPOSED)
    m_ok = m < M
    v = tl.load(x_ptr + n * stride_xn + off, mask=ok & (r < D) & m_ok, other=0)
    if UPCAST:
        v = _widen(v, tl.float32, UPCAST)
    if HAS_BIAS:
        one = tl.full(v.shape, 1, v.dtype)
        v = tl.where((r == D) & m_ok, one, v)
    return v


@triton.jit
def patch_covariance_kernel(
    # output: [SPLIT or 1, G, DP, DP] (a workspace when SPLIT > 1), any strides
    out_ptr,
    # input: [N, C, ID, IH, IW], any strides
    x_ptr,
    # runtime sizes: CG channels per group, D patch rows (DP = D + bias), T tiles per side,
    # M = N·L columns of the patch matrix
    CG, ID, IH, IW, OH, OW, L, M, D, DP, T,
    stride_xn, stride_xc, stride_xd, stride_xh, stride_xw,
    stride_os, stride_og, stride_oi, stride_oj,
    # out ← alpha·out + coef·F (alpha is only read when READ_OUT)
    alpha, coef,
    # geometry
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    MODE: tl.constexpr, TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, READ_OUT: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    # tiles
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr,
):
    """One ``BLOCK_D × BLOCK_D`` tile ``(ti, tj)``, ``ti ≤ tj``, of group ``g``'s factor over the
    ``SPLIT``-th share ``s`` of the columns: ``Σ_m P[i, m]·P[j, m]``, stored at ``(i, j)`` and ``(j, i)``.

    Roofline: FLOPs = 2·G·DP²·M, of which the kernel does about half (the upper block-triangle:
    G·T(T+1)/2 tiles of 2·BLOCK_D²·M). Bytes: x is read ``T`` times per tile row (from L2 after the
    first pass: each tile gathers its two row blocks of the patch matrix) and the G·DP² result is
    written once; the arithmetic intensity is ~BLOCK_D/2 FLOP per gathered element, so the kernel is
    compute bound at BLOCK_D ≥ 64 in bf16: TFLOP/s = G·DP²·M·2 / t against the measured tensor-core
    peak (the "useful" FLOPs of the full product; the mirrored half costs nothing). Loads are
    coalesced along the positions (the contiguous dim of x for stride 1) in both operand tiles.
    """
    # program id -> (tile pair, group, split); the grid covers T×T pairs and the lower ones exit
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)
    ti = pid // T
    tj = pid % T
    if ti <= tj:
        # offsets: the two row blocks of the patch matrix, the columns of this split
        ri = (ti * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        rj = (tj * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        x_g = x_ptr + g * CG * stride_xc
        # the share's column steps, cdiv(cdiv(M, BLOCK_M), SPLIT) for M ≥ 1 without tl.cdiv's M + BLOCK_M - 1
        # (nor steps · BLOCK_M), which wrap in int32 for M within BLOCK_M of 2^31: the loop ran 0 times
        steps = (M - 1) // BLOCK_M // SPLIT + 1
        start = s * steps * BLOCK_M

        # loop over the columns, fp32 (fp64) accumulation
        acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=ACC_DTYPE)
        for step in range(0, steps):
            m = start + step * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # step · BLOCK_M < M: no wrap
            a = _patch_tile(x_g, ri[:, None], m[None, :], D, M, L, ID, IH, IW, OH, OW,
                            stride_xn, stride_xc, stride_xd, stride_xh, stride_xw,
                            KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, MODE, TRANSPOSED, HAS_BIAS, UPCAST)
            b = _patch_tile(x_g, rj[None, :], m[:, None], D, M, L, ID, IH, IW, OH, OW,
                            stride_xn, stride_xc, stride_xd, stride_xh, stride_xw,
                            KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, MODE, TRANSPOSED, HAS_BIAS, UPCAST)
            acc = _mma(a, b, acc, FP64, PRECISION, False)  # UPCAST: the tiles are fp32 already

        # epilogue: scale, blend into out, store the tile and its mirror
        acc = acc * coef
        base = out_ptr + s * stride_os + g * stride_og
        ok = (ri < DP)[:, None] & (rj < DP)[None, :]
        upper = base + ri[:, None] * stride_oi + rj[None, :] * stride_oj
        val = acc
        if READ_OUT:
            val += alpha * tl.load(upper, mask=ok, other=0)
        tl.store(upper, val.to(out_ptr.dtype.element_ty), mask=ok)
        if ti < tj:
            mirror = base + rj[None, :] * stride_oi + ri[:, None] * stride_oj
            val = acc
            if READ_OUT:
                val += alpha * tl.load(mirror, mask=ok, other=0)
            tl.store(mirror, val.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# configs
_SMS = 132  # the heuristic's GPU: an H100 SXM (tuned tables pick SPLIT for other GPUs)


def _fit(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, autotune.bucket(v)))


def _split(dims, block_d: int, block_m: int, interpret: bool) -> int:
    """Programs per tile: enough to give every SM two tiles' work, while each still runs ≥ 8 column
    steps (a partial tile written to the workspace costs one extra BLOCK_D² write)."""
    if interpret:
        return 1
    t = -(-dims["D"] // block_d)
    tiles = dims["G"] * t * (t + 1) // 2
    want = autotune.bucket(-(-2 * _SMS // tiles))
    most = max(1, dims["M"] // (8 * block_m))
    return max(1, min(want, 1 << (most.bit_length() - 1), 64))


def _default(dims, dtype, interpret: bool) -> Config:
    """BLOCK_D 64 (the tile pair's arithmetic intensity grows with it; 128 spills on an H100 with
    two gathered operands), BLOCK_M 32-64 along the positions; fp64 is a broadcast-sum: small tiles.
    The interpreter pays per program and per step: the largest tiles."""
    if interpret:
        bd, bm, warps, stages = _fit(dims["D"], 16, 64), _fit(dims["M"], 16, 256), 4, 1
    elif dtype == torch.float64:
        bd, bm, warps, stages = 16, 16, 4, 1
    else:
        bd = _fit(dims["D"], 16, 64)
        bm = 64 if dtype in (torch.float16, torch.bfloat16) else 32
        warps, stages = 4, 2
    return Config({"BLOCK_D": bd, "BLOCK_M": bm, "SPLIT": _split(dims, bd, bm, interpret)},
                  num_warps=warps, num_stages=stages)


def _keep(cfg: Config, dtype) -> bool:
    """Validity: tiles ≥ 16 for ``tl.dot``; the accumulator and both operand tiles fit in registers
    (≤ 64 fp32 values per thread each); fp64 (broadcast-sum) keeps the BLOCK_D²·BLOCK_M product small."""
    d, m = cfg.meta["BLOCK_D"], cfg.meta["BLOCK_M"]
    threads = 32 * cfg.num_warps
    if dtype == torch.float64:
        return d * d * m <= 8192 and cfg.num_stages == 1
    return min(d, m) >= 16 and d * d <= 64 * threads and 2 * d * m <= 64 * threads


def _candidates(dims, dtype):
    for d in (16, 32, 64, 128):
        for m in (16, 32, 64, 128):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    for split in (1, 2, 4, 8, 16, 32):
                        cfg = Config({"BLOCK_D": d, "BLOCK_M": m, "SPLIT": split}, num_warps=warps,
                                     num_stages=stages)
                        if _keep(cfg, dtype) and split <= max(1, dims["M"] // (8 * m)):
                            yield cfg


_SPACE = ConfigSpace({"BLOCK_D": (16, 128), "BLOCK_M": (16, 256), "SPLIT": (1, 64)}, num_warps=(4, 8),
                     num_stages=(1, 3), keep=_keep)


def _problem(layer, dtype, device) -> TuneProblem:
    """A tuning grid layer's factor (groups 1, no bias), against the plain-torch path."""
    kernel, dil, pad, stride, mode = layer.geometry()
    geom = {"kernel_size": kernel, "stride": stride, "padding": pad, "output_padding": [0] * layer.ndim,
            "dilation": dil, "padding_mode": mode}
    g = layer.resolved()
    dims = {"D": layer.c * g.kernel_numel, "M": layer.n * g.num_blocks, "G": 1}

    def setup():
        x = torch.randn(layer.n, layer.c, *layer.size, device=device, dtype=dtype)
        return (lambda cfg: patch_covariance(x, **geom, groups=1, transposed=False, bias=False, config=cfg),
                lambda: reference.patch_covariance(x, **geom, groups=1, transposed=False, bias=False))

    return TuneProblem(dims, setup)


PATCH_COVARIANCE_SPEC = autotune.register(KernelSpec(
    "patch_covariance", patch_covariance_kernel, ("D", "M", "G"), _default, _candidates, _problem, _SPACE))


# ----------------------------------------------------------------------------------------------
# launcher
_MAX_GRID_YZ = 65535  # CUDA's limit on grid dims 1 and 2

def _kernel_geometry(x: torch.Tensor, kernel_size, stride, padding, output_padding, dilation, padding_mode,
                     transposed: bool) -> dict:
    """The call's geometry as 3-d kernel arguments (``lo``: the low padding, or the transposed padding)."""
    if transposed:
        g = _shapes.transpose_geometry(list(x.shape[2:]), kernel_size, stride, padding, output_padding, dilation)
        lo, mode, num = g.padding, 0, g.num_positions
    else:
        g = _shapes.geometry(list(x.shape[2:]), kernel_size, dilation, padding, stride, padding_mode)
        lo, mode, num = g.pad_lo, _shapes.PADDING_MODE_CODES[padding_mode], g.num_blocks
    return {"in": _pad3(g.in_size, 1), "out": _pad3(g.out_size, 1), "k": _pad3(g.kernel_size, 1),
            "s": _pad3(g.stride, 1), "p": _pad3(lo, 0), "d": _pad3(g.dilation, 1), "mode": mode, "L": num,
            "K": g.kernel_numel, "ndim": g.ndim}


def patch_covariance(x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                     output_padding: list[int], dilation: list[int], padding_mode: str, groups: int,
                     transposed: bool, bias: bool, out: torch.Tensor | None = None, alpha: float = 0.0,
                     coef: float = 1.0, config: Config | None = None) -> torch.Tensor:
    """``coef·F`` (``+ alpha·out`` when ``out`` is given and ``alpha != 0``) with ``F[g]`` the unscaled
    patch second moment ``Σ_{n,l} p p^T`` of channel group ``g`` of ``x`` ``[N, C, *spatial]``, written into
    ``out`` (``[G, DP, DP]``, the accumulator dtype, any strides) or a new tensor, and returned.

    ``padding`` is the flat ``[lo_0, hi_0, ...]`` list of a convolution, or the per-dim symmetric padding of a
    transposed one (``transposed=True``, with ``output_padding``; ``padding_mode`` must then be ``'zeros'``).
    ``config`` overrides the autotune lookup (tests use it to run partial tiles and splits).

    Raises:
        ValueError / TypeError: bad geometry (see :func:`convzoo._shapes.geometry` and
            :func:`convzoo._shapes.transpose_geometry`) or a device the kernels cannot run on.
    """
    # (1) check
    a = _kernel_geometry(x, kernel_size, stride, padding, output_padding, dilation, padding_mode, transposed)
    _check_device(x)
    n, c = x.shape[0], x.shape[1]
    cg = c // groups
    d = cg * a["K"]
    dp = d + int(bias)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    # (2) allocate; an empty reduction (N = 0 or no positions) gives F = 0
    read_out = out is not None and alpha != 0.0
    if out is None:
        out = x.new_empty((groups, dp, dp), dtype=acc_dtype)
    if out.numel() == 0:
        return out
    m = n * a["L"]
    if m == 0 or (cg == 0 and not bias):
        return out.mul_(alpha) if read_out else out.zero_()
    # (3) look up config and launch
    cfg = config or autotune.lookup("patch_covariance", x.device, x.dtype, D=dp, M=m, G=groups)
    bd, split = cfg.meta["BLOCK_D"], cfg.meta["SPLIT"]
    t = triton.cdiv(dp, bd)
    target = out if split == 1 else torch.empty((split, groups, dp, dp), device=x.device, dtype=acc_dtype)
    target4 = target[None] if split == 1 else target
    xs = _as_5d(x, a["ndim"])
    with _device(x):
        # grid dims 1 (groups) and 2 (SPLIT) are limited to 65535 on CUDA: a depthwise layer may have more
        # channels, so the groups go in launches of at most that many (each on its slices of x and target)
        for g0 in range(0, groups, _MAX_GRID_YZ):
            ng = min(_MAX_GRID_YZ, groups - g0)
            patch_covariance_kernel[(t * t, ng, split)](
                target4[:, g0:g0 + ng], xs[:, g0 * cg:(g0 + ng) * cg],
                cg, *a["in"], a["out"][1], a["out"][2], a["L"], m, d, dp, t,
                *xs.stride(), *target4.stride(),
                alpha if split == 1 else 0.0, coef if split == 1 else 1.0,
                *a["k"], *a["s"], *a["p"], *a["d"],
                a["mode"], transposed, bias, read_out and split == 1,
                **_math_args(x.dtype, patch_covariance_kernel),
                **cfg.launch_kwargs(),
            )
    if split > 1:  # the partials, summed in a fixed order: deterministic
        total = target.sum(0)
        if read_out:
            out.mul_(alpha).add_(total, alpha=coef)
        else:
            torch.mul(total, coef, out=out)
    return out
