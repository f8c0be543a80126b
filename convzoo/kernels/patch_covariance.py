"""patch_covariance (KFAC-expand / KFC input factor) for 1-, 2- and 3-d convolutions and transposed
convolutions: a symmetric implicit GEMM, Triton kernel and launcher.

For each channel group ``g`` the factor is ``F_g = Σ_{n,l} p_{n,l} p_{n,l}ᵀ`` over the ``D = C/G·∏K`` rows
of the patch matrix (plus a constant-1 bias row). The kernel tiles the ``D × D`` block in ``BLOCK_D × BLOCK_D``
tiles, computes only the upper block-triangle (the diagonal tiles whole) and stores each upper tile twice, as
itself and mirrored; the patch matrix is never written. A tile side is ``BLOCK_D / BLOCK_C`` (tap, channel
block) pairs: ``BLOCK_C`` channels of one tap, contiguous in the channels-last copy of ``x`` the launcher makes
(16-byte loads, ``cp.async``). The reduction over every sample and position walks l-blocks of ``BLOCK_M``
positions (per l-block, once: each tap's offset and padding-validity vectors, ``_patch_columns``'s index math,
or for a transposed layer the inverse map as ``unfold_transpose`` does) and, inside, the samples: the hot loop
is two pointer increments, two masked tile loads and the MMA. The bias row and corner (``Σ p`` and ``N·L``) come
from the patches of the sample sum ``Σ_n x[n]``, outside the kernel. A split of the (l-block, sample) reduction
into chunks (``SPLIT`` programs per tile, each writing a partial into a workspace that the launcher sums) fills
the GPU when ``F`` has few tiles; no atomics, so the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from convzoo import autotune, reference
from convzoo.autotune import Config, ConfigSpace, KernelSpec, TuneProblem
from convzoo.kernels import _common as cm

__all__ = ["patch_covariance"]


@triton.jit
def _tap_columns(k, l, ID, IH, IW, OH, OW, L, stride_xd, stride_xh, stride_xw,
                 KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, DIL: tl.constexpr,
                 MODE: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Tap ``k`` (a scalar, or one per row) of positions ``l`` (int64): the offset into a sample's channel 0
    each reads and whether it reads anything (``l < L`` and the padding). One vector per (tap, l-block): the
    hot loop over samples reuses it."""
    off, ok = cm._patch_columns(k, l, ID, IH, IW, OH, OW, 0, stride_xd, stride_xh, stride_xw,
                                KS, ST, LO, DIL, MODE, TRANSPOSED)
    return off, ok & (l < L)


@triton.jit
def patch_covariance_kernel(
    # output: [SPLIT or 1, G, D, D] (a workspace when split), any strides; the bias row is the launcher's
    out_ptr,
    # input: [N, C, ID, IH, IW], any strides (the launcher passes channels-last: stride_xc = 1)
    x_ptr,
    # runtime sizes: CG channels per group, N samples, L positions, TC channel blocks per tap, TQ = K·TC
    # (tap, channel block) pairs in TT tile rows, the split's chunks: SN sample chunks of NS samples, l-block
    # chunks of LS l-blocks
    CG, N, ID, IH, IW, OH, OW, L, TC, TQ, TT, SN, NS, LS,
    stride_xn, stride_xc, stride_xd, stride_xh, stride_xw,
    stride_os, stride_og, stride_oi, stride_oj,
    # out ← alpha·out + coef·F (alpha is only read when READ_OUT)
    alpha, coef,
    # geometry
    KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, DIL: tl.constexpr,
    MODE: tl.constexpr, TRANSPOSED: tl.constexpr, READ_OUT: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    # tiles: BLOCK_D rows per tile side, BLOCK_D / BLOCK_C taps of BLOCK_C channels each (BLOCK_C: the
    # launcher's, from the group's channels), BLOCK_M positions per step; SPLIT is the launcher's (chunks)
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr,
):
    """One tile ``(ti, tj)``, ``ti ≤ tj``, of group ``g``'s factor over chunk ``s`` of the (l-block, sample)
    reduction: ``Σ_{n,l} P[i, (n, l)]·P[j, (n, l)]``, stored at ``(i, j)`` and ``(j, i)``.

    The patch rows are walked as (tap, channel block) pairs ``q`` (tap ``q // TC``, channels
    ``(q % TC)·BLOCK_C + [0, BLOCK_C)``), ``BLOCK_D / BLOCK_C`` pairs per tile side, and stored at unfold's row
    ``c·K + k``: in channels-last input a pair is ``BLOCK_C`` contiguous channels (16-byte loads), and its padding
    test is one value per (tap, position), not a div/mod of a flat row index per element. The reduction walks
    l-blocks (outer: the per-tap offset and validity vectors of ``BLOCK_M`` positions, computed once per
    l-block) and samples (inner, the hot loop: two pointer increments, two masked loads and the MMA).

    Roofline: FLOPs = 2·G·D²·N·L, of which the kernel does about half (the upper block-triangle). x is
    read ``TT`` times per tile row (from L2 after the first pass); the arithmetic intensity is ~BLOCK_D/2
    FLOP per gathered element: compute bound at BLOCK_D ≥ 64 in bf16.
    """
    # program id -> (tile pair, group, chunk); the grid covers TT×TT pairs and the lower ones exit
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)
    ti = pid // TT
    tj = pid % TT
    if ti <= tj:
        # offsets: each row's tap and channel (int64: channel c at c · stride_xc may pass 2^31); a tile side is
        # BLOCK_D / BLOCK_C (tap, channel block) pairs of BLOCK_C channels
        # (one tap per tile side when BLOCK_D == BLOCK_C: a scalar, its offsets one vector per l-block; else a tap
        # per BLOCK_C rows: small channel groups still fill BLOCK_D ≥ 64 rows, wgmma)
        ki, ci, ci_ok = cm._tap_pairs(ti, TC, TQ, CG, BLOCK_D, BLOCK_C)
        kj, cj, cj_ok = cm._tap_pairs(tj, TC, TQ, CG, BLOCK_D, BLOCK_C)
        ki_a = ki if BLOCK_D == BLOCK_C else ki[:, None]
        kj_b = kj if BLOCK_D == BLOCK_C else kj[None, :]
        x_g = x_ptr + g * CG * stride_xc
        # this chunk: samples [n0, n1), l-blocks [b0, b1)
        n0 = s % SN * NS
        n1 = tl.minimum(n0 + NS, N)
        b0 = s // SN * LS
        b1 = tl.minimum(b0 + LS, (L - 1) // BLOCK_M + 1)  # cdiv(L, BLOCK_M) without L + BLOCK_M - 1's wrap
        x_n0 = x_g + n0 * stride_xn

        # loop over the l-blocks (offset/validity vectors once) and the samples (the hot loop)
        acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=ACC_DTYPE)
        for b in range(b0, b1):
            l = tl.arange(0, BLOCK_M).to(tl.int64) + b * BLOCK_M  # int64 (b is a Python int when interpreted)
            off_i, ok_i = _tap_columns(ki_a, l[None, :], ID, IH, IW, OH, OW, L, stride_xd, stride_xh, stride_xw,
                                       KS, ST, LO, DIL, MODE, TRANSPOSED)
            off_j, ok_j = _tap_columns(kj_b, l[:, None], ID, IH, IW, OH, OW, L, stride_xd, stride_xh, stride_xw,
                                       KS, ST, LO, DIL, MODE, TRANSPOSED)
            a_ptrs = x_n0 + ci[:, None] * stride_xc + off_i  # [BLOCK_D, BLOCK_M]
            b_ptrs = x_n0 + off_j + cj[None, :] * stride_xc  # [BLOCK_M, BLOCK_D]
            a_ok = ci_ok[:, None] & ok_i
            b_ok = ok_j & cj_ok[None, :]
            for _ in range(n0, n1):
                a = tl.load(a_ptrs, mask=a_ok, other=0)
                b_ = tl.load(b_ptrs, mask=b_ok, other=0)
                if UPCAST:
                    a = cm._widen(a, tl.float32, UPCAST)
                    b_ = cm._widen(b_, tl.float32, UPCAST)
                acc = cm._mma(a, b_, acc, FP64, PRECISION, False)  # UPCAST: the tiles are fp32 already
                a_ptrs += stride_xn
                b_ptrs += stride_xn

        # epilogue: scale, blend into out, store the tile and its mirror at patch rows c·K + k
        acc = acc * coef
        base = out_ptr + s * stride_os + g * stride_og
        ri = ci * cm._taps(KS) + ki
        rj = cj * cm._taps(KS) + kj
        ok = ci_ok[:, None] & cj_ok[None, :]
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
def _tiles(dims, block_d: int) -> int:
    """Tile rows (one side): the (tap, channel block) pairs over the pairs per tile."""
    return cm._pair_walk(dims["C"], dims["K"], block_d)[3]


def _split(dims, block_d: int, block_m: int, interpret: bool) -> int:
    """Programs per tile: enough to give every SM two tiles' work, while each still runs ≥ 8 column
    steps (a partial tile written to the workspace costs one extra BLOCK_D² write)."""
    if interpret:
        return 1
    t = _tiles(dims, block_d)
    return cm._split_count(dims["G"] * t * (t + 1) // 2, dims["M"] // (8 * block_m))


def _default(dims, dtype, interpret: bool) -> Config:
    """BLOCK_D 64 rows (wgmma; the tile pair's arithmetic intensity grows with it): 64 channels of one tap, or
    several taps of a smaller group's channels; BLOCK_M 64 positions, 4 warps, 3 stages (a cp.async ring of both
    gathered operands): 103-116 SASS instructions per 4 wgmma, ≤ 210 registers, no spills (static sm_90 report).
    fp32 (an FMA dot under torch's default precision): BLOCK_M 32, 8 warps, 1 stage (4 warps, or 2-3 stages,
    spill 4-16 bytes on some problems). fp64 is a
    broadcast-sum: small tiles. The interpreter pays per program and per step: the largest
    tiles."""
    rows = dims["K"] * triton.next_power_of_2(max(dims["C"], 1))  # the pairs' rows, padded
    if interpret:
        bd, bm, warps, stages = cm._fit(rows, 16, 64), cm._fit(dims["L"], 16, 256), 4, 1
    elif dtype == torch.float64:
        bd, bm, warps, stages = 16, 16, 4, 1
    else:
        bd = cm._fit(rows, 16, 64)
        half = dtype in (torch.float16, torch.bfloat16)
        bm, warps, stages = (64, 4, 3) if half else (32, 8, 1)
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
    geom = cm._layer_conv_args(layer)
    g = layer.resolved()
    dims = {"D": layer.c * g.kernel_numel, "M": layer.n * g.num_blocks, "G": 1, "C": layer.c, "K": g.kernel_numel,
            "L": g.num_blocks}

    def setup():
        x = torch.randn(layer.n, layer.c, *layer.size, device=device, dtype=dtype)
        return (lambda cfg: patch_covariance(x, **geom, groups=1, transposed=False, bias=False, config=cfg),
                lambda: reference.patch_covariance(x, **geom, groups=1, transposed=False, bias=False))

    return TuneProblem(dims, setup)


PATCH_COVARIANCE_SPEC = autotune.register(KernelSpec(
    "patch_covariance", patch_covariance_kernel, ("D", "M", "G", "C", "K", "L"), _default, _candidates, _problem,
    _SPACE))


# ----------------------------------------------------------------------------------------------
# launcher
def patch_covariance(x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                     output_padding: list[int], dilation: list[int], padding_mode: str, groups: int,
                     transposed: bool, bias: bool, out: torch.Tensor | None = None, alpha: float = 0.0,
                     coef: float = 1.0, config: Config | None = None) -> torch.Tensor:
    """``coef·F`` (``+ alpha·out`` when ``out`` is given and ``alpha != 0``) with ``F[g]`` the unscaled
    patch second moment ``Σ_{n,l} p p^T`` of channel group ``g`` of ``x`` ``[N, C, *spatial]``, written into
    ``out`` (``[G, DP, DP]``, the accumulator dtype, any strides) or a new tensor, and returned.

    The geometry arguments (``padding``'s two forms among them) are ``_common._conv_geometry_3d``'s, and so
    are the errors on bad ones (``ValueError`` / ``TypeError``). ``config`` overrides the autotune lookup (tests
    use it to run partial tiles and splits).
    """
    # (1) check
    a = cm._conv_geometry_3d(x, kernel_size, stride, padding, output_padding, dilation, padding_mode, transposed,
                             groups, bias)
    n, cg, d, dp, acc_dtype = x.shape[0], a["CG"], a["D"], a["DP"], a["acc"]
    # (2) allocate; an empty reduction (N = 0 or no positions) gives F = 0
    read_out = out is not None and alpha != 0.0
    if out is None:
        out = x.new_empty((groups, dp, dp), dtype=acc_dtype)
    if out.numel() == 0:
        return out
    m = n * a["L"]
    if m == 0 or (cg == 0 and not bias):
        return out.mul_(alpha) if read_out else out.zero_()
    # (3) look up config and launch: the kernel computes the D × D patch block (into a view of out, or per
    # chunk into a workspace), the bias row and corner come from one sum over the samples (below)
    if d > 0:
        cfg = config or autotune.lookup("patch_covariance", x.device, x.dtype, D=dp, M=m, G=groups, C=cg,
                                        K=a["K"], L=a["L"])
        _launch(out[:, :d, :d], x, a, cg, read_out, alpha, coef, cfg)
    if bias:
        _bias_row(out, x, kernel_size, stride, padding, output_padding, dilation, padding_mode, transposed,
                  groups, d, m, read_out, alpha, coef)
    return out


def _chunks(n: int, blocks: int, split: int) -> tuple[int, int, int, int]:
    """The split's chunks of the (l-block, sample) reduction: (SN sample chunks, NS samples each, SL l-block
    chunks, LS l-blocks each), l-blocks first (the hot loop runs over the samples), none empty."""
    ls = -(-blocks // min(split, blocks))
    sl = -(-blocks // ls)
    ns = -(-n // min(n, -(-split // sl)))
    return -(-n // ns), ns, sl, ls


def _launch(target: torch.Tensor, x: torch.Tensor, a: dict, cg: int, read_out: bool, alpha: float, coef: float,
            cfg: Config) -> None:
    """The kernel on ``target`` (``[G, D, D]``). ``x`` goes in channels-last (one copy when it is not): a tile is
    then ``BLOCK_D`` contiguous channels of one tap, read with 16-byte loads; channels-first input would gather
    one element per load along the positions (measured on the static sm_90 report: README, kernel notes)."""
    groups = target.shape[0]
    bd, bm = cfg.meta["BLOCK_D"], cfg.meta["BLOCK_M"]
    bc, tc, tq, tt = cm._pair_walk(cg, a["K"], bd)
    n = x.shape[0]
    sn, ns, sl, ls = _chunks(n, triton.cdiv(a["L"], bm), cfg.meta["SPLIT"])
    split = sn * sl
    work = cm._split_workspace(target, split)
    xs = cm._as_5d(x, a["ndim"])
    if cg > 1:
        xs = cm._channels_last(xs)
    with cm._device(x):
        # grid dims 1 (groups) and 2 (chunks) are limited to 65535 on CUDA: a depthwise layer may have more
        # channels, so the groups go in launches of at most that many (each on its slices of x and target)
        for g0, ng in cm._group_slices(groups):
            patch_covariance_kernel[(tt * tt, ng, split)](
                work[:, g0:g0 + ng], xs[:, g0 * cg:(g0 + ng) * cg],
                cg, n, *a["in"], a["out"][1], a["out"][2], a["L"], tc, tq, tt, sn, ns, ls,
                *xs.stride(), *work.stride(),
                alpha if split == 1 else 0.0, coef if split == 1 else 1.0,
                a["k"], a["s"], a["p"], a["d"],
                a["mode"], a["transposed"], read_out and split == 1,
                **cm._math_args(x.dtype, patch_covariance_kernel), BLOCK_C=bc,
                **cfg.launch_kwargs(),
            )
    if split > 1:
        cm._sum_partials(work, target, read_out, alpha, coef)


def _bias_row(out: torch.Tensor, x: torch.Tensor, kernel_size, stride, padding, output_padding, dilation,
              padding_mode: str, transposed: bool, groups: int, d: int, m: int, read_out: bool, alpha: float,
              coef: float) -> None:
    """Row and column ``D`` of ``out``: ``Σ_{n,l} p`` (the patches of the sample sum ``Σ_n x[n]``, summed over
    the positions; one sample's patch matrix of memory) and the corner ``M = N·L``, scaled and blended."""
    if d > 0:
        xsum = x.sum(0, keepdim=True, dtype=out.dtype)
        if transposed:
            cols = reference.unfold_transpose(xsum, kernel_size, stride, padding, output_padding, dilation)
        else:
            cols = reference.unfold(xsum, kernel_size, dilation, padding, stride, padding_mode)
        row = cols.sum(-1).view(groups, d)
        for dst in (out[:, d, :d], out[:, :d, d]):
            if read_out:
                dst.mul_(alpha).add_(row, alpha=coef)
            else:
                torch.mul(row, coef, out=dst)
    corner = out[:, d, d]
    if read_out:
        corner.mul_(alpha).add_(float(m) * coef)
    else:
        corner.fill_(float(m) * coef)
