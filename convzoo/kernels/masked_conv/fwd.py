"""Masked sparse convolution, forward: an implicit-GEMM Triton kernel that reads the weight through a
tile-occupancy list and never visits an all-zero weight tile, and its launcher.

Per channel group ``g`` the convolution is the GEMM ``Y_g = P_g · W_gᵀ (+ b)``, ``Y_g`` ``[M, C_out/G]``
with ``M = N·L`` output positions (every sample's ``L = ∏out`` positions, flattened), ``P_g`` ``[M, K]``
the patch matrix of the group's input channels (``K = C_in/G·∏kernel``, columns tap-major: ``k = t·C_in/G
+ c`` for kernel tap ``t`` and channel ``c``, see :mod:`convzoo.sparsity`), never written to memory but
gathered from ``x`` inside the kernel with the unfold index math (every padding mode, read in place), and
``W_g`` ``[C_out/G, K]`` the group's weight, ``weight[o].movedim(0, -1).flatten()`` per row.

``W_g`` is tiled in ``BO × BK`` tiles (``block``); the tile lists say which tiles can hold a nonzero:
``count[g, to]`` (int32 ``[G, TO]``) non-empty k-tiles in o-tile row ``to``, their indices first in
``index[g, to, :]`` (int32 ``[G, TO, TK]``, ascending; the rest is padding, never read),
``TO = cdiv(C_out/G, BO)``, ``TK = cdiv(K, BK)``. A program's K loop runs over exactly those
``count[g, to]`` k-tiles: skipping is by construction (no branch per tile), and the work falls with
the fraction of non-empty tiles. Whatever the list omits is never read, so a tile it omits counts as
zero even where the weight holds something else there (NaN included); the kernel multiplies by no mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from convzoo import _shapes, autotune
from convzoo.autotune import Config, ConfigSpace, KernelSpec, TuneProblem
from convzoo.kernels import _common as cm

__all__ = ["BLOCK_SIZES", "default_block", "dense_tile_lists", "masked_conv"]


# the tile sides a tile list may be built for: tl.dot needs ≥ 16 on NVIDIA, tl.arange a power of two,
# and a 128 × 128 fp32 weight tile per pipeline stage is already 64 KiB of shared memory
BLOCK_SIZES = (16, 32, 64, 128)


# ----------------------------------------------------------------------------------------------
@triton.jit
def masked_conv_fwd_kernel(
    # output: y [N, CO, L], contiguous
    y_ptr,
    # inputs: x [N, C, ID, IH, IW] (any strides), the weight as [CO, K] (tap-major, any strides), bias [CO],
    # the tile lists count [ROWS] and index [ROWS, TK] (contiguous int32; ROWS = G·TO rows (g, to))
    x_ptr, w_ptr, b_ptr, count_ptr, index_ptr,
    # runtime sizes: M = N·L positions, OG = CO/G and CG = C/G channels per group, K = CG·∏kernel
    M, L, CO, OG, CG, K, TO, TK, ROWS, ID, IH, IW, OH, OW,
    stride_xn, stride_xc, stride_xd, stride_xh, stride_xw,
    stride_wo, stride_wk, stride_b,
    # geometry
    KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, DIL: tl.constexpr,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    # tiles: BLOCK_O × BLOCK_K is the tile lists' block; BLOCK_M is free. SUB (see _tap_tile): the k-tile is
    # walked as BLOCK_K / SUB sub-tiles of one tap each (0: CG too small or odd, the per-element gather);
    # NARROW: the in-loop channel and weight deltas (SUB - 1)·stride fit int32 (the launcher proved it);
    # POS32: M + BLOCK_M < 2^31 and CO·L < 2^31, so position indices and y's channel offsets are int32
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr, NARROW: tl.constexpr,
    POS32: tl.constexpr,
):
    """``y[n, g·OG + o, l] = Σ_k P_g[n·L + l, k] · W_g[o, k] + b[g·OG + o]``: one (position tile,
    o-tile row ``(g, to)``) per program, the K loop over the row's ``count`` listed k-tiles only.

    Roofline (``e`` bytes per element, ``ρ`` the fraction of listed tiles): FLOPs = 2·M·CO·K·ρ
    (``M = N·L``, ``K = C/G·∏kernel``); bytes ≥ (N·C·∏in [x] + CO·K·ρ [listed weight tiles]
    + M·CO [y])·e, plus the patch re-reads (each x element is gathered by up to ∏kernel/∏stride
    positions and by every o-tile row of its group: L1/L2 hits, not DRAM, when the o-tile rows of one
    position tile run together, which the program order below makes them do). The arithmetic
    intensity per program is ~2·BLOCK_M·BLOCK_O/((BLOCK_M + BLOCK_O)·e) FLOP per gathered byte, so with
    64-128 tiles in bf16 the dense kernel is tensor-core bound on an H100 for ResNet-size layers (K in
    the hundreds to thousands), and the time falls ~linearly with ρ until the fixed costs (the
    epilogue's M·CO store, x's compulsory DRAM read, the per-program index load) dominate: at small
    ρ it becomes memory bound on x and y. Tiles are per group, so depthwise layers (OG = 1) use one
    lane in BLOCK_O: correct, not fast.

    Hot loop (``SUB > 0``, the tap walk): see the comments in the body and the README's kernel notes. The
    A tile is gathered as ``[BLOCK_M, SUB]`` (positions first), ``SUB`` contiguous channels per position for
    channels-last x (what the launcher passes: 16-byte ``cp.async``); channels-first x would be one scalar
    load with its own address per element (the launcher copies it instead). ``SUB = 0`` (``C/G`` without a
    power-of-two divisor ≥ 16) keeps the per-element gather: ``[BLOCK_K, BLOCK_M]``, each element's tap
    and channel decoded from its column. y is stored as ``[BLOCK_M, BLOCK_O]`` (y is ``[N, CO, L]``: for
    fixed ``(n, o)`` the positions are contiguous, and a position tile crosses at most a few sample
    boundaries).
    """
    # program id -> (position tile, o-tile row), rows fastest: the rows of one position tile gather
    # the same x patches (those of one group share channels), so they run together and hit in L2
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid // ROWS
    row = pid % ROWS
    g = row // TO
    to = row % TO

    # offsets and masks: positions m = n·L + l, the row's output channels o (co in all of y)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    if POS32:  # M + BLOCK_M < 2^31 (the launcher checked): int32 division, not the 64-bit subroutine
        m = m.to(tl.int32)
    n = m // L
    l = m % L
    o = to * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < OG
    co = g * OG + o
    x_cols = x_ptr + g * CG * stride_xc + n.to(tl.int64) * stride_xn  # group g's first channel, sample n
    w_cols = w_ptr + co * stride_wo
    # the row's listed k-tiles; a count past TK (a malformed list) is clamped so that index is never read
    # past its row. The masks are always true (one scalar each) and only satisfy the every-load-masked rule.
    count = tl.load(count_ptr + row, mask=row < ROWS, other=0)
    count = tl.minimum(count, TK)
    idx_row = index_ptr + row * TK

    # loop over the listed k-tiles only, fp32 (fp64) accumulation
    acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=ACC_DTYPE)
    if SUB > 0:
        # the tap walk (SUB divides CG, so a sub-tile of SUB columns k = t·CG + c0 + i is one tap t, channels
        # c0 .. c0 + SUB - 1). Per program, once: each position's window corner and, for 'zeros', its address
        # and a bit per tap saying whether the tap reads x (up to 31 taps); per sub-tile, scalars (tap, channel,
        # their offset) and one validity bit per position; per element only the invariant channel delta
        # (int32 when NARROW) — no div/mod, no bounds test per element. For channels-last x (stride_xc = 1,
        # what the launcher passes) the sub-tile is SUB contiguous channels per position: 16-byte cp.async.
        ow = l % OW
        oh = (l // OW) % OH
        od = l // OW // OH
        i_d0 = (od * ST[0] - LO[0]).to(tl.int32)
        i_h0 = (oh * ST[1] - LO[1]).to(tl.int32)
        i_w0 = (ow * ST[2] - LO[2]).to(tl.int32)
        if MODE == 0:
            x_pos = x_cols + i_d0.to(tl.int64) * stride_xd + i_h0.to(tl.int64) * stride_xh \
                + i_w0.to(tl.int64) * stride_xw
            if cm._taps(KS) <= 31:
                # bit t: tap t = (kd, kh, kw) of this position reads inside x (0 for a position past M);
                # 0 <= i < n as one unsigned compare
                bits = tl.zeros_like(i_w0)
                for tap in tl.static_range(cm._taps(KS)):
                    v = (m_ok & ((i_d0 + (tap // (KS[2] * KS[1])) * DIL[0]).to(tl.uint32, bitcast=True) < ID)
                         & ((i_h0 + (tap // KS[2] % KS[1]) * DIL[1]).to(tl.uint32, bitcast=True) < IH)
                         & ((i_w0 + (tap % KS[2]) * DIL[2]).to(tl.uint32, bitcast=True) < IW))
                    bits = bits | (v.to(tl.int32) << tap)
        ch = tl.arange(0, SUB).to(tl.int64) * stride_xc
        wk = tl.arange(0, SUB).to(tl.int64) * stride_wk
        if NARROW:
            ch = ch.to(tl.int32)
            wk = wk.to(tl.int32)
        for j in range(0, count):
            kt = tl.load(idx_row + j, mask=j < TK, other=0)
            # kt outside [0, TK) only from a malformed list: masked (and clamped, so the int32 tap math below
            # cannot wrap), so a wrong sum but never a wild read
            kt_ok = (kt >= 0) & (kt < TK)
            kt = tl.where(kt_ok, kt, 0)
            # int32 scalars: k0 < TK·BLOCK_K < K + BLOCK_K, and K is an int32 argument; one division per k-tile,
            # the next sub-tile's (tap, channel) follows by one step (SUB <= CG: at most one tap boundary)
            k0 = kt * BLOCK_K
            t = k0 // CG
            # not k0 % CG: Triton keeps the difference's divisibility (16-byte vector loads); t·CG <= k0, so the
            # int64 product narrows exactly
            c0 = k0 - (t.to(tl.int64) * CG).to(tl.int32)
            for s in tl.static_range(BLOCK_K // SUB):
                if s > 0:
                    c0 += SUB
                    wrap = c0 >= CG
                    c0 = tl.where(wrap, c0 - CG, c0)
                    t = tl.where(wrap, t + 1, t)
                # K is a multiple of SUB: a sub-tile is all in K or all past it (the last k-tile's tail)
                s_ok = kt_ok & (k0 + s * SUB < K)
                kw = t % KS[2]
                kh = (t // KS[2]) % KS[1]
                kd = t // (KS[2] * KS[1])
                if MODE == 0:
                    if cm._taps(KS) <= 31:
                        # bit 31 is never set: a sub-tile past K (or of a malformed entry) reads nothing
                        ok = ((bits >> tl.where(s_ok, t, 31)) & 1) != 0
                    else:
                        ok = (m_ok & s_ok & ((i_d0 + kd * DIL[0]).to(tl.uint32, bitcast=True) < ID)
                              & ((i_h0 + kh * DIL[1]).to(tl.uint32, bitcast=True) < IH)
                              & ((i_w0 + kw * DIL[2]).to(tl.uint32, bitcast=True) < IW))
                    src = x_pos + (c0.to(tl.int64) * stride_xc + (kd * DIL[0]).to(tl.int64) * stride_xd
                                   + (kh * DIL[1]).to(tl.int64) * stride_xh + (kw * DIL[2]).to(tl.int64) * stride_xw)
                else:
                    s_d, ok_d = cm._source_index(i_d0 + kd * DIL[0], ID, MODE)
                    s_h, ok_h = cm._source_index(i_h0 + kh * DIL[1], IH, MODE)
                    s_w, ok_w = cm._source_index(i_w0 + kw * DIL[2], IW, MODE)
                    ok = m_ok & s_ok & ok_d & ok_h & ok_w
                    src = x_cols + c0.to(tl.int64) * stride_xc + s_d.to(tl.int64) * stride_xd \
                        + s_h.to(tl.int64) * stride_xh + s_w.to(tl.int64) * stride_xw
                # [BLOCK_M, SUB], positions first: with channels-first x (no contiguous dim in the tile) each
                # thread then holds few positions and many channels, so the per-position terms stay few
                pt = tl.load(src[:, None] + ch[None, :], mask=ok[:, None], other=0)
                w = tl.load((w_cols + (k0 + s * SUB).to(tl.int64) * stride_wk)[None, :] + wk[:, None],
                            mask=o_ok[None, :] & s_ok, other=0)
                acc = cm._mma(pt, w, acc, FP64, PRECISION, UPCAST)
    else:
        # the per-element gather (CG has no power-of-two divisor ≥ 16: the stem's 3 channels, depthwise)
        for j in range(0, count):
            kt = tl.load(idx_row + j, mask=j < TK, other=0).to(tl.int64)
            k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            # k < 0 only from a malformed list: masked, so such a list can give a wrong sum but never a wild read
            k_ok = (k >= 0) & (k < K)
            # tap-major k = t·CG + c as _patch_columns' unfold-order row c·∏kernel + t
            r = (k % CG) * cm._taps(KS) + k // CG
            off, ok = cm._patch_columns(r[:, None], l.to(tl.int64)[None, :], ID, IH, IW, OH, OW,
                                        stride_xc, stride_xd, stride_xh, stride_xw,
                                        KS, ST, LO, DIL, MODE, False)
            pt = tl.load(x_cols[None, :] + off, mask=(k_ok[:, None] & m_ok[None, :]) & ok, other=0)
            w = tl.load(w_cols[None, :] + k[:, None] * stride_wk, mask=k_ok[:, None] & o_ok[None, :], other=0)
            acc = cm._mma(tl.trans(pt), w, acc, FP64, PRECISION, UPCAST)
    if HAS_BIAS:
        b = tl.load(b_ptr + co * stride_b, mask=o_ok, other=0)
        acc += cm._widen(b, ACC_DTYPE, UPCAST)[None, :]

    # masked store as [BLOCK_M, BLOCK_O], positions first (contiguous runs of y); without a provable run
    # (L not a multiple of the vector) Triton then gives each thread few positions and many channels, so the
    # per-position address terms stay few
    y_co = co * L
    if POS32:
        y_co = y_co.to(tl.int32)
    y = y_ptr + (n.to(tl.int64) * CO * L + l)[:, None] + y_co[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & o_ok[None, :])


# ----------------------------------------------------------------------------------------------
# configs. BLOCK_O and BLOCK_K are not free: they are the block the tile lists were built for, so they
# are lookup dims (BO, BK; powers of two, so bucketing keeps them exact: a table keys its entries by
# block) and not config entries. A config holds BLOCK_M, num_warps and num_stages only, so no table,
# forced config or heuristic can name a tile that disagrees with the lists.
def _default(dims, dtype, interpret: bool) -> Config:
    """BLOCK_M 128 positions (the tensor cores' M side: wgmma wants 64 per warpgroup) when there are
    that many, 8 warps once the fp32 accumulator passes 64 values per thread at 4; 3 stages for the
    16-bit dtypes, 2 for fp32's twice larger tiles, fewer (then a smaller BLOCK_M) where the staged
    operand tiles would pass :func:`_fits`' shared-memory budget (fp32 with a 128 × 128 block).
    fp64 is a broadcast-sum holding a BLOCK_M × BO × BK product: BLOCK_M shrinks to keep it at
    ≤ 8192 values. The interpreter pays per program and per k-step: the largest tiles."""
    bo, bk = dims["BO"], dims["BK"]
    if interpret:
        return Config({"BLOCK_M": cm._fit(dims["M"], 16, 256)}, num_warps=4, num_stages=1)
    if dtype == torch.float64:
        # 8 warps once the product passes 4096 values (32 fp64 per thread at 4 warps spill a few bytes)
        bm = max(1, min(16, 8192 // (bo * bk)))
        return Config({"BLOCK_M": bm}, num_warps=8 if bm * bo * bk > 4096 else 4, num_stages=1)
    if "O" in dims:  # the forward's dims: its o-tile rows (bucketed, as every dim the heuristic reads)
        dims = {**dims, "rows": max(1, autotune.bucket(dims["O"]) // bo)}
    half = dtype in (torch.float16, torch.bfloat16)
    # a narrow block (BO <= 32) gets 256 positions: the tap walk's per-position and per-tap work is then
    # spread over twice the MMA (the static report: fp16 local_2d_b256, BO = 32, 0.48 -> 0.7 of peak)
    bm = cm._fit(dims["M"], 64 if half else 16, 256 if half and bo <= 32 else 128)
    # enough programs for the H100's 132 SMs, down to 64 positions (one wgmma's M per warpgroup)
    rows = dims.get("rows", 1)
    while bm > 64 and -(-dims["M"] // bm) * rows < cm._SMS:
        bm //= 2
    # fp32's FMA product (no tensor cores under IEEE) holds its operand tiles in registers too: 8 warps
    warps = 8 if bm * bo > 64 * 128 or (not half and bm * bo > 64 * 64) else 4
    stages = 3 if half else 2
    while stages > 1 and not _fits(bm, bo, bk, warps, stages, dtype):
        stages -= 1
    while bm > 16 and not _fits(bm, bo, bk, warps, stages, dtype):
        bm //= 2
    return Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages)


def _keep(cfg: Config, dtype) -> bool:
    """What holds whatever the block: ``tl.dot`` tiles ≥ 16 (fp64: no ``tl.dot``, one stage, at most 16
    positions). The register budget depends on the block, a lookup dim: :func:`_candidates` applies it."""
    bm = cfg.meta["BLOCK_M"]
    if dtype == torch.float64:
        return bm <= 16 and cfg.num_stages == 1
    return bm >= 16 and cfg.num_warps >= 4


def _fits(bm: int, bo: int, bk: int, warps: int, stages: int, dtype) -> bool:
    """The fp32 accumulator within 64 values per thread (local_conv's rule), and the pipeline's operand
    tiles (``tl.dot`` stages them through shared memory) within 160 KiB of the H100's 227 (the rest is
    the epilogue's layout conversion). The estimate is exact for fp32 (the AOT compile for sm_90 reports
    ``stages·(BLOCK_M + BO)·BK·4`` bytes); 16-bit gathers are not staged by ``cp.async`` (it moves ≥ 4
    bytes, a gathered element is 2), so they use one stage's worth whatever ``num_stages`` says."""
    elem = 4 if dtype == torch.float32 else 2
    return bm * bo <= 64 * 32 * warps and stages * (bm + bo) * bk * elem <= 160 * 1024


def _candidates(dims, dtype):
    """The tuning grid: :func:`_keep` and :func:`_fits`, and for the tensor-core dtypes (16-bit) ≥ 64 positions
    (wgmma's M per warpgroup; smaller tiles fall back to mma.sync)."""
    bo, bk = dims["BO"], dims["BK"]
    lo = 64 if dtype in (torch.float16, torch.bfloat16) else 1
    for bm in (b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b >= lo):
        for warps in (4, 8):
            for stages in (1, 2, 3, 4):
                cfg = Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages)
                if not _keep(cfg, dtype):
                    continue
                if dtype == torch.float64 and bm * bo * bk > 8192 and bm > 1:
                    continue
                if dtype != torch.float64 and not _fits(bm, bo, bk, warps, stages, dtype):
                    continue
                yield cfg


_SPACE = ConfigSpace({"BLOCK_M": (1, 256)}, num_warps=(4, 8), num_stages=(1, 4), keep=_keep)


def default_block(out_channels: int, k: int) -> tuple[int, int]:
    """The block (BO, BK) the op builds its tile lists for, and the tuner tunes: 64 × 64 where the per-group
    ``[C_out/G, K]`` weight matrix has that much, less for small layers (tables are keyed by block; a block
    never tuned falls back to the heuristic)."""
    return cm._fit(out_channels, 16, 64), cm._fit(k, 16, 64)


def dense_tile_lists(weight: torch.Tensor, groups: int, block) -> tuple[torch.Tensor, torch.Tensor]:
    """The tile lists of a dense weight (every tile listed), for the tuner and the tests' density 1.0."""
    o, k = weight.shape[0] // groups, math.prod(weight.shape[1:])
    to, tk = triton.cdiv(o, block[0]), triton.cdiv(k, block[1])
    count = torch.full((groups, to), tk, dtype=torch.int32, device=weight.device)
    index = torch.arange(tk, dtype=torch.int32, device=weight.device).expand(groups, to, tk).contiguous()
    return count, index


def _reference(x, weight, bias, dilation, padding, stride, padding_mode, groups):
    """``F.convNd`` after ``F.pad`` in ``padding_mode`` (flat ``[lo, hi, ...]`` padding, F.pad's last-dim-first
    order), in float64 for the low-precision dtypes' comparison."""
    nd = x.dim() - 2
    pad = [v for i in reversed(range(nd)) for v in (padding[2 * i], padding[2 * i + 1])]
    xp = F.pad(x, pad, mode="constant" if padding_mode == "zeros" else padding_mode)
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(xp, weight, bias, stride, 0, dilation, groups)


def _problem(layer, dtype, device) -> TuneProblem:
    """A tuning grid layer (groups 1, with bias) at density 1 (every tile listed: the dense-equivalent
    cost, which the time at density ρ approaches ~ρ times), with the block :func:`default_block` picks."""
    kernel, dil, pad, stride, mode = layer.geometry()
    o, k = layer.out_channels, layer.c * layer.kernel_numel
    block = default_block(o, k)
    g = layer.resolved()
    dims = {"M": layer.n * g.num_blocks, "O": o, "K": k, "BO": block[0], "BK": block[1]}

    def setup():
        x = torch.randn(layer.n, layer.c, *layer.size, device=device, dtype=dtype)
        w = torch.randn(o, layer.c, *kernel, device=device, dtype=dtype) / math.sqrt(k)
        b = torch.randn(o, device=device, dtype=dtype)
        count, index = dense_tile_lists(w, 1, block)
        return (lambda cfg: masked_conv(x, w, count, index, b, kernel, dil, pad, stride, mode, 1, block, config=cfg),
                lambda: _reference(x, w, b, dil, pad, stride, mode, 1))

    return TuneProblem(dims, setup)


FWD_SPEC = autotune.register(KernelSpec(
    "masked_conv_fwd", masked_conv_fwd_kernel, ("M", "O", "K", "BO", "BK"), _default, _candidates, _problem,
    _SPACE))


# ----------------------------------------------------------------------------------------------
# launcher
def _check_block(block) -> tuple[int, int]:
    _shapes.check(isinstance(block, (tuple, list)) and len(block) == 2
                  and all(type(v) is int for v in block),
                  lambda: f"block must be a pair of ints (BO, BK), got {block!r}", TypeError)
    _shapes.check(all(v in BLOCK_SIZES for v in block),
                  lambda: f"block must be (BO, BK) with each side one of {BLOCK_SIZES}, got {tuple(block)}")
    return int(block[0]), int(block[1])


def _check_list(t, name: str, shape: tuple, x: torch.Tensor) -> None:
    _shapes.check(isinstance(t, torch.Tensor), lambda: f"{name} must be a tensor, got {type(t).__name__}", TypeError)
    _shapes.check(t.dtype == torch.int32, lambda: f"{name} must be int32, got {t.dtype}", TypeError)
    _shapes.check(tuple(t.shape) == shape,
                  lambda: f"{name} must have shape {shape} (the tile lists of this weight, groups and block), "
                  f"got {tuple(t.shape)}")
    _shapes.check(t.device == x.device, lambda: f"{name} is on {t.device} but input is on {x.device}")


def _tap_tile(cg: int, bk: int, *strides: int) -> dict:
    """The kernels' tap walk: ``SUB``, the largest power of two dividing both ``cg`` (channels per group) and
    ``bk`` (the k side of the lists' block), when it is ≥ 16 (``tl.dot``'s smallest side), else 0; a sub-tile
    of ``SUB`` tap-major columns then lies in one tap. ``NARROW``: every in-loop delta ``i·stride`` (``i <
    SUB``, each of ``strides``) fits int32, so the kernel adds int32 offsets to its int64 bases."""
    sub = math.gcd(cg, bk) if cg > 0 else 0
    sub = sub if sub >= 16 else 0
    narrow = all((max(sub, 1) - 1) * abs(st) < 2**31 for st in strides)
    return {"SUB": sub, "NARROW": narrow}


def masked_conv(x: torch.Tensor, weight: torch.Tensor, count: torch.Tensor, index: torch.Tensor,
                bias: torch.Tensor | None, kernel_size: list[int], dilation: list[int], padding: list[int],
                stride: list[int], padding_mode: str, groups: int, block, config: Config | None = None
                ) -> torch.Tensor:
    """The convolution of ``x`` ``[N, C_in, *spatial]`` (1-3 spatial dims, any strides) with ``weight``
    ``[C_out, C_in/groups, *kernel_size]`` (any strides) read only in the ``block = (BO, BK)`` tiles
    that ``count`` / ``index`` list (see the module docstring), plus ``bias`` ``[C_out]`` or None →
    ``y`` ``[N, C_out, *out]`` (contiguous), one launch.

    Equal to ``F.convNd(x, weight', bias, stride, padding, dilation, groups)`` where ``weight'`` is
    ``weight`` with the unlisted tiles zeroed (``padding``: the flat ``[lo_0, hi_0, ...]`` list, read
    in ``padding_mode``: zeros, reflect, replicate, circular). The lists are not checked against the
    weight (that would read it, or sync with the device): a list that omits a nonzero tile drops it.
    The weight is read as its tap-major ``[C_out, K]`` matrix, ``weight.movedim(1, -1)`` flattened: a view
    for a channels-last weight (what the op passes) or a 1 × 1 kernel, a copy otherwise. Where ``C_in/G``
    has a power-of-two divisor ≥ 16 (the tap walk), ``x`` is read channels-last: in place if it is, else
    from a channels-last copy (one read and one write of ``x``; see :func:`_channels_last`).
    ``config`` overrides the autotune lookup (it sets BLOCK_M, warps, stages; the block is the lists').

    Raises:
        TypeError: a non-tensor or non-floating ``input`` / ``weight`` / ``bias``, dtypes that differ,
            ``count`` / ``index`` not int32, ``block`` not a pair of ints.
        ValueError: shapes that do not match (weight rank or kernel_size, channels and ``groups``,
            bias, the tile lists' ``[G, TO]`` / ``[G, TO, TK]``), a block side not in
            :data:`BLOCK_SIZES`, bad geometry (see :func:`convzoo._shapes.geometry`), another device,
            or a device the kernels cannot run on.
    """
    # (1) check
    g = _shapes.unfold_geometry(x, kernel_size, dilation, padding, stride, padding_mode)
    _shapes.check_float_tensor(weight, "weight")
    _shapes.check(weight.dtype == x.dtype, lambda: f"weight has dtype {weight.dtype} but input has {x.dtype}",
                  TypeError)
    _shapes.check(weight.device == x.device, lambda: f"weight is on {weight.device} but input is on {x.device}")
    _shapes.check(weight.dim() == x.dim() and tuple(weight.shape[2:]) == tuple(g.kernel_size),
                  lambda: f"weight must be [C_out, C_in/groups, *kernel_size] = [C_out, C_in/groups, "
                  f"{', '.join(map(str, g.kernel_size))}], got shape {tuple(weight.shape)}")
    n, c = x.shape[0], x.shape[1]
    groups = _shapes.check_groups(groups, c)
    co, cg = weight.shape[0], c // groups
    _shapes.check(weight.shape[1] == cg,
                  lambda: f"weight.shape[1]={weight.shape[1]} must be in_channels/groups = {c}/{groups} = {cg}")
    _shapes.check(co % groups == 0, lambda: f"groups={groups} must divide the output channels C_out={co}")
    if bias is not None:
        _shapes.check_float_tensor(bias, "bias")
        _shapes.check(bias.dtype == x.dtype, lambda: f"bias has dtype {bias.dtype} but input has {x.dtype}",
                      TypeError)
        _shapes.check(bias.device == x.device, lambda: f"bias is on {bias.device} but input is on {x.device}")
        _shapes.check(tuple(bias.shape) == (co,), lambda: f"bias must be [C_out] = [{co}], got {tuple(bias.shape)}")
    bo, bk = _check_block(block)
    og, k = co // groups, cg * g.kernel_numel
    to, tk = triton.cdiv(og, bo), triton.cdiv(k, bk)
    _check_list(count, "count", (groups, to), x)
    _check_list(index, "index", (groups, to, tk), x)
    cm._check_device(x)
    # (2) allocate; nothing to launch for an empty result (N, C_out or an output dim = 0). K = 0 (C_in = 0)
    # launches: every list is empty then (TK = 0, and count is clamped to TK in-kernel), so y = bias
    y = x.new_empty((n, co, *g.out_size))
    if y.numel() == 0:
        return y
    buf = cm._launch_buffer(y, masked_conv_fwd_kernel)
    # (3) look up config and launch
    L = g.num_blocks
    M = n * L
    cfg = config or autotune.lookup("masked_conv_fwd", x.device, x.dtype, M=M, O=co, K=k, BO=bo, BK=bk)
    a = cm._as_3d(g)
    w2 = weight.movedim(1, -1).reshape(co, k)  # tap-major: a view for channels-last weights, else a copy
    tap = _tap_tile(cg, bk, 1, w2.stride(1))
    # the tap walk reads SUB contiguous channels per position from channels-last x; other layouts are copied
    # once (see _channels_last)
    xs = cm._channels_last(cm._as_5d(x, g.ndim)) if tap["SUB"] else cm._as_5d(x, g.ndim)
    count, index = count.contiguous(), index.contiguous()
    b = weight if bias is None else bias  # never read without bias
    rows = groups * to
    grid = (triton.cdiv(M, cfg.meta["BLOCK_M"]) * rows,)
    with cm._device(x):
        masked_conv_fwd_kernel[grid](
            buf, xs, w2, b, count, index,
            M, L, co, og, cg, k, to, tk, rows, *a["in"], a["out"][1], a["out"][2],
            *xs.stride(), *w2.stride(), b.stride(0) if bias is not None else 0,
            a["k"], a["s"], a["lo"], a["d"],
            _shapes.PADDING_MODE_CODES[g.padding_mode],
            bias is not None, **cm._math_args(x.dtype, masked_conv_fwd_kernel),
            BLOCK_O=bo, BLOCK_K=bk, **tap, POS32=M + cfg.meta["BLOCK_M"] < 2**31 and co * L < 2**31,
            **cfg.launch_kwargs(),
        )
    return cm._finish(y, buf)
