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

from convzoo import _shapes, autotune, reference
from convzoo.autotune import Config, ConfigSpace, KernelSpec, TuneProblem
from convzoo.kernels._common import (
    _as_3d,
    _as_5d,
    _channels_last,
    _check_device,
    _device,
    _finish,
    _launch_buffer,
    _math_args,
    _mma,
    _num_candidates,
    _padded_candidate,
    _patch_columns,
    _source_index,
    _widen,
)

__all__ = ["BLOCK_SIZES", "masked_conv", "masked_conv_grad_input", "masked_conv_grad_weight"]

# the tile sides a tile list may be built for: tl.dot needs ≥ 16 on NVIDIA, tl.arange a power of two,
# and a 128 × 128 fp32 weight tile per pipeline stage is already 64 KiB of shared memory
BLOCK_SIZES = (16, 32, 64, 128)
_SMS = 132  # the heuristics' GPU: an H100 SXM (tuned tables pick tiles and SPLIT for other GPUs)


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
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
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
        i_d0 = (od * SD - PD).to(tl.int32)
        i_h0 = (oh * SH - PH).to(tl.int32)
        i_w0 = (ow * SW - PW).to(tl.int32)
        if MODE == 0:
            x_pos = x_cols + i_d0.to(tl.int64) * stride_xd + i_h0.to(tl.int64) * stride_xh \
                + i_w0.to(tl.int64) * stride_xw
            if KD * KH * KW <= 31:
                # bit t: tap t = (kd, kh, kw) of this position reads inside x (0 for a position past M);
                # 0 <= i < n as one unsigned compare
                bits = tl.zeros_like(i_w0)
                for tap in tl.static_range(KD * KH * KW):
                    v = (m_ok & ((i_d0 + (tap // (KW * KH)) * DD).to(tl.uint32, bitcast=True) < ID)
                         & ((i_h0 + (tap // KW % KH) * DH).to(tl.uint32, bitcast=True) < IH)
                         & ((i_w0 + (tap % KW) * DW).to(tl.uint32, bitcast=True) < IW))
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
                kw = t % KW
                kh = (t // KW) % KH
                kd = t // (KW * KH)
                if MODE == 0:
                    if KD * KH * KW <= 31:
                        # bit 31 is never set: a sub-tile past K (or of a malformed entry) reads nothing
                        ok = ((bits >> tl.where(s_ok, t, 31)) & 1) != 0
                    else:
                        ok = (m_ok & s_ok & ((i_d0 + kd * DD).to(tl.uint32, bitcast=True) < ID)
                              & ((i_h0 + kh * DH).to(tl.uint32, bitcast=True) < IH)
                              & ((i_w0 + kw * DW).to(tl.uint32, bitcast=True) < IW))
                    src = x_pos + (c0.to(tl.int64) * stride_xc + (kd * DD).to(tl.int64) * stride_xd
                                   + (kh * DH).to(tl.int64) * stride_xh + (kw * DW).to(tl.int64) * stride_xw)
                else:
                    s_d, ok_d = _source_index(i_d0 + kd * DD, ID, MODE)
                    s_h, ok_h = _source_index(i_h0 + kh * DH, IH, MODE)
                    s_w, ok_w = _source_index(i_w0 + kw * DW, IW, MODE)
                    ok = m_ok & s_ok & ok_d & ok_h & ok_w
                    src = x_cols + c0.to(tl.int64) * stride_xc + s_d.to(tl.int64) * stride_xd \
                        + s_h.to(tl.int64) * stride_xh + s_w.to(tl.int64) * stride_xw
                # [BLOCK_M, SUB], positions first: with channels-first x (no contiguous dim in the tile) each
                # thread then holds few positions and many channels, so the per-position terms stay few
                pt = tl.load(src[:, None] + ch[None, :], mask=ok[:, None], other=0)
                w = tl.load((w_cols + (k0 + s * SUB).to(tl.int64) * stride_wk)[None, :] + wk[:, None],
                            mask=o_ok[None, :] & s_ok, other=0)
                acc = _mma(pt, w, acc, FP64, PRECISION, UPCAST)
    else:
        # the per-element gather (CG has no power-of-two divisor ≥ 16: the stem's 3 channels, depthwise)
        for j in range(0, count):
            kt = tl.load(idx_row + j, mask=j < TK, other=0).to(tl.int64)
            k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            # k < 0 only from a malformed list: masked, so such a list can give a wrong sum but never a wild read
            k_ok = (k >= 0) & (k < K)
            # tap-major k = t·CG + c as _patch_columns' unfold-order row c·∏kernel + t
            r = (k % CG) * (KD * KH * KW) + k // CG
            off, ok = _patch_columns(r[:, None], l.to(tl.int64)[None, :], ID, IH, IW, OH, OW,
                                     stride_xc, stride_xd, stride_xh, stride_xw,
                                     KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, MODE, False)
            pt = tl.load(x_cols[None, :] + off, mask=(k_ok[:, None] & m_ok[None, :]) & ok, other=0)
            w = tl.load(w_cols[None, :] + k[:, None] * stride_wk, mask=k_ok[:, None] & o_ok[None, :], other=0)
            acc = _mma(tl.trans(pt), w, acc, FP64, PRECISION, UPCAST)
    if HAS_BIAS:
        b = tl.load(b_ptr + co * stride_b, mask=o_ok, other=0)
        acc += _widen(b, ACC_DTYPE, UPCAST)[None, :]

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
def _fit(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, autotune.bucket(v)))


def _default(dims, dtype, interpret: bool) -> Config:
    """BLOCK_M 128 positions (the tensor cores' M side: wgmma wants 64 per warpgroup) when there are
    that many, 8 warps once the fp32 accumulator passes 64 values per thread at 4; 3 stages for the
    16-bit dtypes, 2 for fp32's twice larger tiles, fewer (then a smaller BLOCK_M) where the staged
    operand tiles would pass :func:`_fits`' shared-memory budget (fp32 with a 128 × 128 block).
    fp64 is a broadcast-sum holding a BLOCK_M × BO × BK product: BLOCK_M shrinks to keep it at
    ≤ 8192 values. The interpreter pays per program and per k-step: the largest tiles."""
    bo, bk = dims["BO"], dims["BK"]
    if interpret:
        return Config({"BLOCK_M": _fit(dims["M"], 16, 256)}, num_warps=4, num_stages=1)
    if dtype == torch.float64:
        # 8 warps once the product passes 4096 values (32 fp64 per thread at 4 warps spill a few bytes)
        bm = max(1, min(16, 8192 // (bo * bk)))
        return Config({"BLOCK_M": bm}, num_warps=8 if bm * bo * bk > 4096 else 4, num_stages=1)
    if "O" in dims:  # the forward's dims: its o-tile rows (bucketed, as every dim the heuristic reads)
        dims = {**dims, "rows": max(1, autotune.bucket(dims["O"]) // bo)}
    half = dtype in (torch.float16, torch.bfloat16)
    # a narrow block (BO <= 32) gets 256 positions: the tap walk's per-position and per-tap work is then
    # spread over twice the MMA (the static report: fp16 local_2d_b256, BO = 32, 0.48 -> 0.7 of peak)
    bm = _fit(dims["M"], 64 if half else 16, 256 if half and bo <= 32 else 128)
    # enough programs for the H100's 132 SMs, down to 64 positions (one wgmma's M per warpgroup)
    rows = dims.get("rows", 1)
    while bm > 64 and -(-dims["M"] // bm) * rows < _SMS:
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
    return _fit(out_channels, 16, 64), _fit(k, 16, 64)


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
    _check_device(x)
    # (2) allocate; nothing to launch for an empty result (N, C_out or an output dim = 0). K = 0 (C_in = 0)
    # launches: every list is empty then (TK = 0, and count is clamped to TK in-kernel), so y = bias
    y = x.new_empty((n, co, *g.out_size))
    if y.numel() == 0:
        return y
    buf = _launch_buffer(y, masked_conv_fwd_kernel)
    # (3) look up config and launch
    L = g.num_blocks
    M = n * L
    cfg = config or autotune.lookup("masked_conv_fwd", x.device, x.dtype, M=M, O=co, K=k, BO=bo, BK=bk)
    a = _as_3d(g)
    w2 = weight.movedim(1, -1).reshape(co, k)  # tap-major: a view for channels-last weights, else a copy
    tap = _tap_tile(cg, bk, 1, w2.stride(1))
    # the tap walk reads SUB contiguous channels per position from channels-last x; other layouts are copied
    # once (see _channels_last)
    xs = _channels_last(_as_5d(x, g.ndim)) if tap["SUB"] else _as_5d(x, g.ndim)
    count, index = count.contiguous(), index.contiguous()
    b = weight if bias is None else bias  # never read without bias
    rows = groups * to
    grid = (triton.cdiv(M, cfg.meta["BLOCK_M"]) * rows,)
    with _device(x):
        masked_conv_fwd_kernel[grid](
            buf, xs, w2, b, count, index,
            M, L, co, og, cg, k, to, tk, rows, *a["in"], a["out"][1], a["out"][2],
            *xs.stride(), *w2.stride(), b.stride(0) if bias is not None else 0,
            *a["k"], *a["s"], *a["lo"], *a["d"],
            _shapes.PADDING_MODE_CODES[g.padding_mode],
            bias is not None, **_math_args(x.dtype, masked_conv_fwd_kernel),
            BLOCK_O=bo, BLOCK_K=bk, **tap, POS32=M + cfg.meta["BLOCK_M"] < 2**31 and co * L < 2**31,
            **cfg.launch_kwargs(),
        )
    return _finish(y, buf)


# ==============================================================================================
# grad-weight: dW_g = dY_gᵀ · P_g over the listed tiles, a split over the positions
# ----------------------------------------------------------------------------------------------
@triton.jit
def masked_conv_grad_weight_kernel(
    # output: dW as [SPLIT, CO, CG, KT] (the weight itself when SPLIT = 1, else a workspace of partials), any
    # strides; (o, k) of group g is (g·OG + o, k % CG, k // CG): the tap-major column k = t·CG + c
    out_ptr,
    # inputs: dy [N, CO, OD, OH, OW] and x [N, C, ID, IH, IW] (any strides), the mask as [CO, CG, KT] (uint8,
    # any strides; read only when HAS_MASK), the tile lists count [ROWS] and index [ROWS, TK] (contiguous int32)
    dy_ptr, x_ptr, mask_ptr, count_ptr, index_ptr,
    # runtime sizes: M = N·L positions, OG = CO/G and CG = C/G channels per group, K = CG·∏kernel
    M, L, OG, CG, K, TO, TK, ROWS, ID, IH, IW, OH, OW,
    # BINARIZE only (coactivation counts): a value is 1 when above its threshold, else 0
    x_threshold, y_threshold,
    stride_dn, stride_dc, stride_dd, stride_dh, stride_dw,
    stride_xn, stride_xc, stride_xd, stride_xh, stride_xw,
    stride_mo, stride_mc, stride_mt,
    stride_os, stride_oo, stride_oc, stride_ot,
    # geometry
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr, BINARIZE: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    # tiles: BLOCK_O × BLOCK_K is the tile lists' block; BLOCK_M (the reduction step) and SPLIT are free. SUB (see
    # _tap_tile): the k-tile is BLOCK_K / SUB sub-tiles of one tap each (0: the per-element gather); OFF32: every
    # offset the tap walk forms into x and dY fits int32 (the launcher proved it, see _gw_off32); POS32:
    # M + BLOCK_M < 2^31, so position indices are int32; DIMS: the spatial dims (the tap walk's positions advance
    # only those); DY_FLAT: dY is [M, CO] with row stride stride_dw (channels-last, packed positions)
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    SUB: tl.constexpr = 0, OFF32: tl.constexpr = False, POS32: tl.constexpr = False, DIMS: tl.constexpr = 3,
    DY_FLAT: tl.constexpr = False,
):
    """``dW_g[o, k] = Σ_m dY[n, g·OG + o, l] · P_g[m, k]`` (``m = n·L + l``) over the ``s``-th of ``SPLIT``
    shares of the positions, for one tile slot ``(g, to, j)`` per program: the tile ``index[g, to, j]``,
    computed when ``j < count[g, to]`` (a listed tile), else written as zeros (an unlisted one: no position
    loop, no load). ``index[g, to, :]`` is a permutation of ``range(TK)``, so every entry of the output is
    written exactly once per share and nothing needs a memset. With ``HAS_MASK`` the entries the mask drops
    are stored as exact zeros (a ``where``: a NaN or Inf in x or dY never reaches them).

    Roofline (``e`` bytes per element, ``ρ`` the fraction of listed tiles): FLOPs = 2·N·L·CO·K·ρ
    (``K = C/G·∏kernel``); bytes ≥ (N·C·∏in [x] + N·CO·L [dY] + CO·K [dW])·e, plus, when ``SPLIT > 1``,
    2·SPLIT·CO·K·4 (the fp32 partials written and summed), plus the operand re-reads: each listed tile
    gathers its own patch rows and dY rows over all M positions, so x is read by each listed o-tile row of
    its group and dY by each listed k-tile of its row (L2 hits when the programs of one share run together,
    which the program order below makes them do: the splits are slowest). The arithmetic intensity per
    program is ~2·BO·BK/((BO + BK)·e) FLOP per gathered byte (the forward's, with the block's BK in its
    BLOCK_M's place: here BLOCK_M is the reduction step and sets no output tile): with 64 × 64 blocks in
    bf16 the kernel is tensor-core bound on an H100 when enough tiles × splits fill its 132 SMs (SPLIT is
    for that: a ResNet layer has tens of tiles and ~10^5 positions), and the time falls ~linearly with ρ
    until x's and dY's compulsory reads dominate: at small ρ it is memory bound on them. Depthwise layers
    (OG = 1) use one lane in BLOCK_O: correct, not fast.

    Hot loop (``SUB > 0``, the tap walk): see the comments in the body and the README's kernel notes; dY is
    gathered as ``[BLOCK_M, BLOCK_O]`` and the patches as ``[BLOCK_M, BLOCK_K]`` (as ``[BLOCK_M, BLOCK_K / SUB,
    SUB]``), both positions first, from channels-last x and dY (what the launcher passes: 16-byte ``cp.async``).
    ``SUB = 0`` (``C/G`` without a power-of-two divisor ≥ 16) keeps the per-element gather, both operand tiles
    positions-last, dY as ``[BLOCK_O, BLOCK_M]`` and the patches as ``[BLOCK_K, BLOCK_M]`` (consecutive threads
    read consecutive positions, contiguous in dY and, for stride 1, in x), the patch tile transposed for
    ``tl.dot``. The ``BO × BK`` store is strided (the
    weight is ``[CO, CG, *kernel]``: consecutive k are ``KT`` apart), once per tile: ~1/M of the traffic.
    """
    # program id -> (share s, o-tile row (g, to), slot j), slots fastest, then rows: the programs of one
    # share read the same positions of x and dY, so they run together and hit in L2
    pid = tl.program_id(0).to(tl.int64)
    j = pid % TK
    row = (pid // TK) % ROWS
    s = pid // TK // ROWS
    g = row // TO
    to = row % TO

    # offsets and masks: the tile's output channels o (co in all of dY) and its columns k
    o = to * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < OG
    co = g * OG + o
    # the row's count, clamped to TK (a malformed list must not send a program past its row). The masks
    # are always true (one scalar each) and only satisfy the every-load-masked rule.
    count = tl.load(count_ptr + row, mask=row < ROWS, other=0)
    count = tl.minimum(count, TK)
    kt = tl.load(index_ptr + row * TK + j, mask=j < TK, other=0).to(tl.int64)
    k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    # k < 0 only from a malformed list: masked, so such a list can give a wrong sum but never a wild access
    k_ok = (k >= 0) & (k < K)
    c = k % CG
    t = k // CG
    # tap-major k = t·CG + c as _patch_columns' unfold-order row c·∏kernel + t
    r = c * (KD * KH * KW) + t
    x_g = x_ptr + g * CG * stride_xc
    dy_rows = dy_ptr + co * stride_dc

    # the share's position steps, cdiv(cdiv(M, BLOCK_M), SPLIT) for M ≥ 1 without M + BLOCK_M - 1 (which wraps
    # in int32 for M within BLOCK_M of 2^31); the last share may hold fewer, an unlisted slot none
    steps = (M - 1) // BLOCK_M // SPLIT + 1
    start = s * steps * BLOCK_M
    left = tl.maximum(M - start, 0)
    steps = tl.minimum(steps, (left + BLOCK_M - 1) // BLOCK_M)
    steps = tl.where(j < count, steps, 0)

    # loop over the share's positions, fp32 (fp64) accumulation
    acc = tl.zeros([BLOCK_O, BLOCK_K], dtype=ACC_DTYPE)
    m0 = start
    if SUB > 0:
        # the tap walk. A program's tile, and so its taps, is fixed: SUB divides CG and BLOCK_K, so the tile's
        # columns s·SUB .. s·SUB + SUB - 1 are one tap t_s, channels c_s .. c_s + SUB - 1 (NS = BLOCK_K / SUB
        # sub-tiles). Once per program: each sub-tile's tap offset into x (a small table, [NS]); per step: the
        # positions advanced incrementally (no division), their window corners and addresses, one validity bit per
        # (position, sub-tile) — no div/mod, no bounds test per element. x and dY are read channels-last (the
        # launcher's _channels_last): a dY row is BLOCK_O contiguous channels and an x sub-tile row SUB contiguous
        # channels, 16-byte vector loads; the x tile is gathered as [BLOCK_M, NS, SUB] and viewed as
        # [BLOCK_M, BLOCK_K].
        NS: tl.constexpr = BLOCK_K // SUB
        ks = (kt * BLOCK_K).to(tl.int32) + tl.arange(0, NS) * SUB
        # a sub-tile past K (K is a multiple of SUB) or of a malformed entry reads nothing
        s_ok = (kt >= 0) & (ks < K)
        ks = tl.where(s_ok, ks, 0)
        ts = ks // CG
        cs = ks - (ts.to(tl.int64) * CG).to(tl.int32)  # ts·CG <= ks: the int64 product narrows exactly
        kd_s = (ts // (KW * KH)) * DD
        kh_s = (ts // KW % KH) * DH
        kw_s = (ts % KW) * DW
        # the sub-tiles' tap offsets into x, the in-tile channel offsets of x and dY: int64, narrowed to int32
        # when OFF32 (the launcher proved every offset the walk forms fits)
        tap_s = cs.to(tl.int64) * stride_xc
        if MODE == 0:
            tap_s += kd_s.to(tl.int64) * stride_xd + kh_s.to(tl.int64) * stride_xh + kw_s.to(tl.int64) * stride_xw
        ch = tl.arange(0, SUB).to(tl.int64) * stride_xc
        dyc = co * stride_dc
        if OFF32:
            tap_s = tap_s.to(tl.int32)
            ch = ch.to(tl.int32)
            dyc = dyc.to(tl.int32)
        # the positions of the first step, then advanced by BLOCK_M = s_n·L + s_d·OH·OW + s_h·OW + s_w per step
        # (a carry per dim: each of ow, oh, od stays in range)
        OD = L // OW // OH
        m = start + tl.arange(0, BLOCK_M)
        if POS32:
            m = m.to(tl.int32)
        n = m // L
        l = m - (n.to(tl.int64) * L).to(m.dtype)  # n·L <= m: the int64 product narrows exactly
        ow = (l % OW).to(tl.int32)
        oh = (l // OW % OH).to(tl.int32) if DIMS >= 2 else tl.zeros_like(ow)
        od = (l // OW // OH).to(tl.int32) if DIMS >= 3 else tl.zeros_like(ow)
        st_n = BLOCK_M // L
        r_ = BLOCK_M % L
        st_w = r_ % OW
        st_h = r_ // OW % OH
        st_d = r_ // OW // OH
        # a narrow block (BLOCK_O < 64 <= BLOCK_K) accumulates dWᵀ = Pᵀ·dY: the MMA's M side is then BLOCK_K
        # (wgmma wants 64 rows per warpgroup)
        SWAP: tl.constexpr = BLOCK_O < 64 and BLOCK_K >= 64 and not FP64
        if SWAP:
            acc_t = tl.zeros([BLOCK_K, BLOCK_O], dtype=ACC_DTYPE)
        for _ in range(0, steps):
            m_ok = m < M
            # the steps' position offsets: int64, narrowed to int32 when OFF32 (the launcher proved them)
            if DY_FLAT:
                dy_pos = m.to(tl.int64) * stride_dw
            else:
                dy_pos = n.to(tl.int64) * stride_dn + od.to(tl.int64) * stride_dd \
                    + oh.to(tl.int64) * stride_dh + ow.to(tl.int64) * stride_dw
            if OFF32:
                dy_pos = dy_pos.to(tl.int32)
            x_n = n.to(tl.int64) * stride_xn
            dy = tl.load(dy_ptr + dy_pos[:, None] + dyc[None, :], mask=m_ok[:, None] & o_ok[None, :], other=0)
            i_d0 = od * SD - PD
            i_h0 = oh * SH - PH
            i_w0 = ow * SW - PW
            if MODE == 0:
                x_pos = x_n + i_d0.to(tl.int64) * stride_xd + i_h0.to(tl.int64) * stride_xh \
                    + i_w0.to(tl.int64) * stride_xw
                if OFF32:
                    x_pos = x_pos.to(tl.int32)
                # [BLOCK_M, NS]: 0 <= i < n as one unsigned compare
                v = (m_ok[:, None] & s_ok[None, :]
                     & ((i_d0[:, None] + kd_s[None, :]).to(tl.uint32, bitcast=True) < ID)
                     & ((i_h0[:, None] + kh_s[None, :]).to(tl.uint32, bitcast=True) < IH)
                     & ((i_w0[:, None] + kw_s[None, :]).to(tl.uint32, bitcast=True) < IW))
                src = x_pos[:, None] + tap_s[None, :]
            else:
                # other padding modes: each (position, sub-tile) reads its own source index
                s_d, ok_d = _source_index(i_d0[:, None] + kd_s[None, :], ID, MODE)
                s_h, ok_h = _source_index(i_h0[:, None] + kh_s[None, :], IH, MODE)
                s_w, ok_w = _source_index(i_w0[:, None] + kw_s[None, :], IW, MODE)
                v = m_ok[:, None] & s_ok[None, :] & ok_d & ok_h & ok_w
                src = x_n[:, None] + s_d.to(tl.int64) * stride_xd + s_h.to(tl.int64) * stride_xh \
                    + s_w.to(tl.int64) * stride_xw + tap_s[None, :]
                if OFF32:
                    src = src.to(tl.int32)
            pt3 = tl.load(x_g + src[:, :, None] + ch[None, None, :], mask=v[:, :, None], other=0)
            pt = tl.reshape(pt3, [BLOCK_M, BLOCK_K])
            if BINARIZE:
                # the coactivation count: 0/1 operands (a padded tap is absent, so 0 whatever the threshold; NaN is
                # never above one), compared in the accumulator's dtype; 0/1 products and their sums are exact in
                # fp32 below 2^24, so fp16 operands on the tensor cores count exactly
                p_ok = tl.reshape(tl.broadcast_to(v[:, :, None], [BLOCK_M, NS, SUB]), [BLOCK_M, BLOCK_K])
                yb = tl.where(_widen(dy, ACC_DTYPE, UPCAST) > y_threshold, 1.0, 0.0)
                xb = tl.where(p_ok & (_widen(pt, ACC_DTYPE, UPCAST) > x_threshold), 1.0, 0.0)
                if SWAP:
                    if FP64:
                        acc_t = _mma(tl.trans(xb.to(tl.float64)), yb.to(tl.float64), acc_t, True, PRECISION, False)
                    else:
                        acc_t = _mma(tl.trans(xb.to(tl.float16)), yb.to(tl.float16), acc_t, False, "ieee", False)
                elif FP64:
                    acc = _mma(tl.trans(yb.to(tl.float64)), xb.to(tl.float64), acc, True, PRECISION, False)
                else:
                    acc = _mma(tl.trans(yb.to(tl.float16)), xb.to(tl.float16), acc, False, "ieee", False)
            elif SWAP:
                acc_t = _mma(tl.trans(pt), dy, acc_t, FP64, PRECISION, UPCAST)
            else:
                acc = _mma(tl.trans(dy), pt, acc, FP64, PRECISION, UPCAST)
            # the next step's positions
            m += BLOCK_M
            ow += st_w
            cy = ow >= OW
            ow = tl.where(cy, ow - OW, ow)
            if DIMS >= 2:
                oh += st_h + cy.to(tl.int32)
                cy = oh >= OH
                oh = tl.where(cy, oh - OH, oh)
            if DIMS >= 3:
                od += st_d + cy.to(tl.int32)
                cy = od >= OD
                od = tl.where(cy, od - OD, od)
            n += st_n + cy.to(n.dtype)
        if SWAP:
            acc = tl.trans(acc_t)
    else:
        for _ in range(0, steps):
            m = m0 + tl.arange(0, BLOCK_M)
            m_ok = m < M
            n = m // L
            l = m % L
            ow = l % OW
            oh = (l // OW) % OH
            od = l // OW // OH  # not l // (OW * OH): an int32 product of two sizes
            dy_cols = n * stride_dn + od * stride_dd + oh * stride_dh + ow * stride_dw
            dy = tl.load(dy_rows[:, None] + dy_cols[None, :], mask=o_ok[:, None] & m_ok[None, :], other=0)
            off, ok = _patch_columns(r[:, None], l[None, :], ID, IH, IW, OH, OW,
                                     stride_xc, stride_xd, stride_xh, stride_xw,
                                     KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, MODE, False)
            p_ok = (k_ok[:, None] & m_ok[None, :]) & ok
            pt = tl.load(x_g + n[None, :] * stride_xn + off, mask=p_ok, other=0)
            if BINARIZE:
                # the coactivation count: 0/1 operands (a padded tap is absent, so 0 whatever the threshold; NaN is
                # never above one), compared in the accumulator's dtype; 0/1 products and their sums are exact in fp32
                # below 2^24, so fp16 operands on the tensor cores count exactly
                yb = tl.where(_widen(dy, ACC_DTYPE, UPCAST) > y_threshold, 1.0, 0.0)
                xb = tl.where(p_ok & (_widen(pt, ACC_DTYPE, UPCAST) > x_threshold), 1.0, 0.0)
                if FP64:
                    acc = _mma(yb.to(tl.float64), tl.trans(xb.to(tl.float64)), acc, True, PRECISION, False)
                else:
                    acc = _mma(yb.to(tl.float16), tl.trans(xb.to(tl.float16)), acc, False, "ieee", False)
            else:
                acc = _mma(dy, tl.trans(pt), acc, FP64, PRECISION, UPCAST)
            m0 += BLOCK_M

    # epilogue: the mask's zeros as exact zeros (where, not a product: 0·NaN is NaN), masked store
    ok = o_ok[:, None] & k_ok[None, :]
    if HAS_MASK:
        keep = tl.load(mask_ptr + co[:, None] * stride_mo + c[None, :] * stride_mc + t[None, :] * stride_mt,
                       mask=ok, other=0)
        acc = tl.where(keep != 0, acc, 0.0)
    out = out_ptr + s * stride_os + co[:, None] * stride_oo + c[None, :] * stride_oc + t[None, :] * stride_ot
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# grad-weight configs. As in the forward, BLOCK_O × BLOCK_K is the tile lists' block (lookup dims BO, BK); a
# config holds the reduction step BLOCK_M, the split SPLIT, num_warps and num_stages.


def _gw_split(dims, bm: int) -> int:
    """Programs per tile slot: enough for two programs per SM when every tile is listed (the tuner's density
    1; at density ρ the unlisted slots finish at once), while each share still runs ≥ 8 position steps (a
    share costs a BO × BK partial written and summed). From the bucketed dims, so that a table key's dims
    give the key's default. ``O`` is all of C_out, so ``O/BO`` undercounts the o-tiles of a grouped layer
    whose C_out/G is not a multiple of BO: such layers get more shares than they need, never fewer."""
    b = autotune.bucket
    tiles = max(1, b(dims["O"]) // dims["BO"]) * max(1, b(dims["K"]) // dims["BK"])
    want = b(-(-2 * _SMS // tiles))
    most = max(1, b(dims["M"]) // (8 * bm))
    return max(1, min(want, 1 << (most.bit_length() - 1), 64))


def _gw_default(dims, dtype, interpret: bool) -> Config:
    """BLOCK_M 128 positions per step for the 16-bit dtypes with 2 stages (the static sm_90 report, fp16 conv3_x:
    the tap walk's per-position work over twice the MMA, 0.59 -> 0.65 of the tensor cores' peak, and 3 blocks
    of 4 warps per SM), 32 for fp32's twice larger operand tiles (the block sets the accumulator: BLOCK_M only
    sets the operand tiles and the steps), 8 warps once the fp32 accumulator passes 64 values per thread at 4,
    and for fp32's FMA product (its operand tiles in registers too: 4 warps spill); stages as :func:`_gw_fits`
    allows, then SPLIT (:func:`_gw_split`). fp64 is a broadcast-sum holding a BO × BLOCK_M × BK product: BLOCK_M
    shrinks to keep it at ≤ 8192 values. The interpreter pays per program and per step: the largest BLOCK_M,
    one share."""
    bo, bk = dims["BO"], dims["BK"]
    if interpret:
        return Config({"BLOCK_M": _fit(dims["M"], 16, 256), "SPLIT": 1}, num_warps=4, num_stages=1)
    half = dtype in (torch.float16, torch.bfloat16)
    warps = 8 if bo * bk > 64 * 128 or dtype == torch.float32 else 4
    if dtype == torch.float64:
        bm, stages = max(1, min(16, 8192 // (bo * bk))), 1
    else:
        bm = 128 if half else 32
        stages = 2
        while stages > 1 and not _gw_fits(bm, bo, bk, warps, stages, dtype):
            stages -= 1
        while bm > 16 and not _gw_fits(bm, bo, bk, warps, stages, dtype):
            bm //= 2
    return Config({"BLOCK_M": bm, "SPLIT": _gw_split(dims, bm)}, num_warps=warps, num_stages=stages)


def _gw_keep(cfg: Config, dtype) -> bool:
    """What holds whatever the block: ``tl.dot``'s reduction side ≥ 16 (fp64: no ``tl.dot``, one stage, at
    most 16 positions). The register and shared-memory budgets depend on the block, a lookup dim:
    :func:`_gw_candidates` applies them."""
    bm = cfg.meta["BLOCK_M"]
    if dtype == torch.float64:
        return bm <= 16 and cfg.num_stages == 1
    return bm >= 16 and cfg.num_warps >= 4


def _gw_fits(bm: int, bo: int, bk: int, warps: int, stages: int, dtype) -> bool:
    """The fp32 accumulator within 64 values per thread, the two gathered operand tiles within 256 bytes per
    thread (64 fp32 values, 128 16-bit ones: the tap walk's 16-bit tiles go to shared memory by cp.async), and
    the pipeline's staged operand tiles within 160 KiB of the H100's 227 (the forward's rule, see :func:`_fits`)."""
    elem = 4 if dtype == torch.float32 else 2
    threads = 32 * warps
    return (bo * bk <= 64 * threads and (bo + bk) * bm * elem <= 256 * threads
            and stages * (bo + bk) * bm * elem <= 160 * 1024)


def _gw_candidates(dims, dtype):
    bo, bk = dims["BO"], dims["BK"]
    for bm in (1, 2, 4, 8, 16, 32, 64, 128):
        for warps in (4, 8):
            for stages in (1, 2, 3):
                for split in (1, 2, 4, 8, 16, 32, 64):
                    cfg = Config({"BLOCK_M": bm, "SPLIT": split}, num_warps=warps, num_stages=stages)
                    if not _gw_keep(cfg, dtype) or split > max(1, dims["M"] // (8 * bm)):
                        continue
                    if dtype == torch.float64 and bm * bo * bk > 8192 and bm > 1:
                        continue
                    if dtype != torch.float64 and not _gw_fits(bm, bo, bk, warps, stages, dtype):
                        continue
                    yield cfg


_GW_SPACE = ConfigSpace({"BLOCK_M": (1, 256), "SPLIT": (1, 64)}, num_warps=(4, 8), num_stages=(1, 3),
                        keep=_gw_keep)


def _gw_problem(layer, dtype, device) -> TuneProblem:
    """A tuning grid layer (groups 1) at density 1 (every tile listed, an all-True mask: the dense-equivalent
    cost, which the time at density ρ approaches ~ρ times), with the block :func:`default_block` picks."""
    kernel, dil, pad, stride, mode = layer.geometry()
    o, k = layer.out_channels, layer.c * layer.kernel_numel
    block = default_block(o, k)
    g = layer.resolved()
    dims = {"M": layer.n * g.num_blocks, "O": o, "K": k, "BO": block[0], "BK": block[1]}
    weight_size = [o, layer.c, *kernel]

    def setup():
        x = torch.randn(layer.n, layer.c, *layer.size, device=device, dtype=dtype)
        dy = torch.randn(layer.n, o, *g.out_size, device=device, dtype=dtype) / math.sqrt(dims["M"])
        mask = torch.ones(weight_size, dtype=torch.bool, device=device)
        count, index = dense_tile_lists(mask, 1, block)
        return (lambda cfg: masked_conv_grad_weight(dy, x, mask, count, index, weight_size, kernel, dil, pad,
                                                    stride, mode, 1, block, config=cfg),
                lambda: _gw_reference(dy, x, weight_size, dil, pad, stride, mode, 1))

    return TuneProblem(dims, setup)


def _gw_reference(dy, x, weight_size, dilation, padding, stride, padding_mode, groups):
    """``torch.nn.grad.convNd_weight`` on ``x`` after ``F.pad`` in ``padding_mode`` (no mask: density 1)."""
    nd = x.dim() - 2
    pad = [v for i in reversed(range(nd)) for v in (padding[2 * i], padding[2 * i + 1])]
    xp = F.pad(x, pad, mode="constant" if padding_mode == "zeros" else padding_mode)
    grad_fn = (torch.nn.grad.conv1d_weight, torch.nn.grad.conv2d_weight, torch.nn.grad.conv3d_weight)[nd - 1]
    return grad_fn(xp, list(weight_size), dy, stride, 0, dilation, groups)


GRAD_WEIGHT_SPEC = autotune.register(KernelSpec(
    "masked_conv_grad_weight", masked_conv_grad_weight_kernel, ("M", "O", "K", "BO", "BK"), _gw_default,
    _gw_candidates, _gw_problem, _GW_SPACE))


# ----------------------------------------------------------------------------------------------
# grad-weight launcher
def _gw_off32(xs: torch.Tensor, dys: torch.Tensor, g: _shapes.Geometry, co: int, bo: int) -> bool:
    """The grad-weight tap walk's ``OFF32``: every offset it forms into x and dY fits int32 — for a valid lane
    each partial sum of ``n·stride_xn + i_d·stride_xd + ... + c·stride_xc`` lies within ``Σ (size + lo + hi + (k
    - 1)·d)·|stride|`` over x's dims (the window corners reach past the padding), and dY's within ``Σ size·|stride|
    + (C_out + BLOCK_O)·|stride_dc|`` (the block's masked channel lanes). Lanes past M form wrapped offsets and
    are never read."""
    a = _as_3d(g)
    pad = [lo + hi + (k - 1) * d for lo, hi, k, d in zip(a["lo"], a["hi"], a["k"], a["d"])]
    x = xs.shape[0] * abs(xs.stride(0)) + xs.shape[1] * abs(xs.stride(1)) \
        + sum((n + p) * abs(st) for n, p, st in zip(xs.shape[2:], pad, xs.stride()[2:]))
    dy = sum(n * abs(st) for n, st in zip(dys.shape, dys.stride())) + (co + bo) * abs(dys.stride(1))
    return max(x, dy) < 2**31


def masked_conv_grad_weight(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, count: torch.Tensor,
                            index: torch.Tensor, weight_size: list[int], kernel_size: list[int],
                            dilation: list[int], padding: list[int], stride: list[int], padding_mode: str,
                            groups: int, block, config: Config | None = None,
                            thresholds: tuple[float, float] | None = None) -> torch.Tensor:
    """The weight gradient of :func:`masked_conv`: ``dW`` of shape ``weight_size`` ``[C_out, C_in/groups,
    *kernel_size]`` (contiguous, ``x``'s dtype) from ``grad`` = dY ``[N, C_out, *out]`` and ``x`` ``[N, C_in,
    *spatial]`` (both any strides), computed only in the ``block = (BO, BK)`` tiles that ``count`` / ``index``
    list (the forward's lists, see the module docstring), one launch (plus a sum of the partials when the
    config splits the positions).

    Equal to the dense convolution's weight gradient (``torch.nn.grad.convNd_weight`` of the padded input,
    ``padding`` the flat ``[lo_0, hi_0, ...]`` list read in ``padding_mode``) with every tile the lists omit
    exactly zero and then every entry where the bool ``mask`` (weight-shaped, or None: dense) is False exactly
    zero, whatever x and dY hold (NaN and Inf included). Each ``index[g, to, :]`` must be a permutation of
    ``range(TK)``, as :func:`convzoo.sparsity.tile_lists` builds it: the kernel writes the unlisted tiles'
    zeros through it (no memset), so an entry no slot names would be left unwritten; it is not checked (that
    would sync with the device). Where ``C_in/G`` has a power-of-two divisor ≥ 16 (the tap walk), ``x`` and
    ``grad`` are read channels-last: in place if they are, else from channels-last copies (see
    :func:`_channels_last`). ``config`` overrides the autotune lookup (BLOCK_M, SPLIT, warps, stages; the
    block is the lists'). Deterministic: the split's partials are summed in a fixed order, no atomics.

    ``thresholds = (θ_x, θ_y)``: the coactivation count instead (:func:`convzoo.functional.coactivation`), the
    gradient of the binarized tensors ``x > θ_x`` and ``dY > θ_y`` (compared in fp32, fp64 for fp64; a padded
    tap is absent, inactive whatever ``θ_x``), fused into the loads, as float32 (exact below 2^24).

    Raises:
        TypeError: a non-tensor or non-floating ``input`` / ``grad``, dtypes that differ, ``mask`` not a bool
            tensor, ``count`` / ``index`` not int32, ``weight_size`` not a list of ints, ``block`` not a
            pair of ints.
        ValueError: shapes that do not match (``weight_size``'s rank, kernel_size, channels and ``groups``;
            ``grad`` not ``[N, C_out, *out]``; ``mask`` not weight-shaped; the tile lists' ``[G, TO]`` /
            ``[G, TO, TK]``), a block side not in :data:`BLOCK_SIZES`, bad geometry (see
            :func:`convzoo._shapes.geometry`), another device, or a device the kernels cannot run on.
    """
    # (1) check
    g = _shapes.unfold_geometry(x, kernel_size, dilation, padding, stride, padding_mode)
    n, c = x.shape[0], x.shape[1]
    groups = _shapes.check_groups(groups, c)
    cg = c // groups
    _shapes.check(isinstance(weight_size, (list, tuple)) and all(_shapes._is_int(v) for v in weight_size),
                  lambda: f"weight_size must be a list of ints, got {weight_size!r}", TypeError)
    size = tuple(int(v) for v in weight_size)
    _shapes.check(len(size) == x.dim() and size[2:] == tuple(g.kernel_size) and size[1] == cg and size[0] >= 0,
                  lambda: f"weight_size must be [C_out, C_in/groups, *kernel_size] = [C_out, {c}/{groups}, "
                  f"{', '.join(map(str, g.kernel_size))}], got {list(size)}")
    co = size[0]
    _shapes.check(co % groups == 0, lambda: f"groups={groups} must divide the output channels C_out={co}")
    _shapes.check_float_tensor(grad, "grad")
    _shapes.check(grad.dtype == x.dtype, lambda: f"grad has dtype {grad.dtype} but input has {x.dtype}", TypeError)
    _shapes.check(grad.device == x.device, lambda: f"grad is on {grad.device} but input is on {x.device}")
    _shapes.check(tuple(grad.shape) == (n, co, *g.out_size),
                  lambda: f"grad must be [N, C_out, *out] = {[n, co, *g.out_size]} (the convolution's output), got "
                  f"shape {tuple(grad.shape)}")
    if mask is not None:
        _shapes.check(isinstance(mask, torch.Tensor), lambda: f"mask must be a tensor or None, got "
                      f"{type(mask).__name__}", TypeError)
        _shapes.check(mask.dtype == torch.bool, lambda: f"mask must be a bool tensor, got {mask.dtype}", TypeError)
        _shapes.check(tuple(mask.shape) == size,
                      lambda: f"mask must have the weight's shape {list(size)}, got {tuple(mask.shape)}")
        _shapes.check(mask.device == x.device, lambda: f"mask is on {mask.device} but input is on {x.device}")
    bo, bk = _check_block(block)
    kt = g.kernel_numel
    og, k = co // groups, cg * kt
    to, tk = triton.cdiv(og, bo), triton.cdiv(k, bk)
    _check_list(count, "count", (groups, to), x)
    _check_list(index, "index", (groups, to, tk), x)
    _check_device(x)
    # (2) allocate; nothing to launch for an empty result (C_out = 0 or C_in = 0), nor for an empty reduction
    # (N = 0 or an empty output: no position, dW = 0)
    dw = x.new_empty(size, dtype=torch.float32 if thresholds is not None else x.dtype)
    if dw.numel() == 0:
        return dw
    L = g.num_blocks
    M = n * L
    if M == 0:
        return dw.zero_()
    xt, yt = (0.0, 0.0) if thresholds is None else (float(thresholds[0]), float(thresholds[1]))
    # (3) look up config and launch
    cfg = config or autotune.lookup("masked_conv_grad_weight", x.device, x.dtype, M=M, O=co, K=k, BO=bo, BK=bk)
    split = cfg.meta["SPLIT"]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if split == 1:
        target = _launch_buffer(dw, masked_conv_grad_weight_kernel)
    else:  # the fp32 (fp64) partials, one per share
        target = torch.empty((split, *size), dtype=acc_dtype, device=x.device)
    out = target.view(-1, co, cg, kt)
    a = _as_3d(g)
    sub = _tap_tile(cg, bk)["SUB"]
    xs, dys = _as_5d(x, g.ndim), _as_5d(grad, g.ndim)
    if sub:
        # the tap walk reads SUB contiguous channels per position from channels-last x and BLOCK_O from
        # channels-last dY; other layouts are copied once (see _channels_last)
        xs, dys = _channels_last(xs), _channels_last(dys)
    pos32 = M + cfg.meta["BLOCK_M"] < 2**31
    off32 = bool(sub) and pos32 and _gw_off32(xs, dys, g, co, bo)
    # dY as [M, C_out] rows stride_dw apart (position m's offset m·stride_dw): the positions need no decomposition
    dy_flat, step = True, dys.stride(4)
    for dim in (4, 3, 2, 0):
        dy_flat = dy_flat and (dys.shape[dim] == 1 or dys.stride(dim) == step)
        step *= dys.shape[dim]
    # the mask as [CO, CG, KT] bytes: a view for a contiguous mask (a 1-byte copy of the weight otherwise)
    m3 = mask.reshape(co, cg, kt).view(torch.uint8) if mask is not None else None
    count, index = count.contiguous(), index.contiguous()
    rows = groups * to
    grid = (split * rows * tk,)
    with _device(x):
        masked_conv_grad_weight_kernel[grid](
            out, dys, xs, x if m3 is None else m3, count, index,  # x as the mask pointer: never read
            M, L, og, cg, k, to, tk, rows, *a["in"], a["out"][1], a["out"][2], xt, yt,
            *dys.stride(), *xs.stride(), *(m3.stride() if m3 is not None else (0, 0, 0)), *out.stride(),
            *a["k"], *a["s"], *a["lo"], *a["d"],
            _shapes.PADDING_MODE_CODES[g.padding_mode],
            m3 is not None, thresholds is not None, **_math_args(x.dtype, masked_conv_grad_weight_kernel),
            BLOCK_O=bo, BLOCK_K=bk, SUB=sub, OFF32=off32, POS32=pos32, DIMS=g.ndim, DY_FLAT=dy_flat,
            **cfg.launch_kwargs(),
        )
    if split == 1:
        return _finish(dw, target)
    # the partials, summed in a fixed order (deterministic); a masked entry is 0 in each, so 0 in the sum
    if dw.dtype == acc_dtype:
        return torch.sum(target, dim=0, out=dw)
    return dw.copy_(target.sum(0))


# ==============================================================================================
# grad-input: dX = dY ⋆ (W ⊙ mask)ᵀ, a gather over the grad-input tile lists (t_count / t_index)
@triton.jit
def _grad_input_taps(acc, g_n, w_ptr, idx_row, count, g, c0, c_ok, pd, ph, pw, cand,
                     E, TO, OG, CG, OD, OH, OW, stride_go, stride_gd, stride_gh, stride_gw, stride_wo, stride_wk,
                     KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                     SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                     PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                     DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                     FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, NARROW: tl.constexpr):
    """``acc`` plus, over the row's ``count`` listed entries ``e = t·TO + to``, ``A·W``: ``W [BLOCK_O, BLOCK_K]``
    the weight block ``W[g·OG + to·BO + o, c0 + c, t]``, ``A [BLOCK_M, BLOCK_O]`` the output gradient at the
    output positions whose tap ``t`` reads the padded positions ``(pd, ph, pw)`` (0 where there is none: the
    stride does not divide, or off the output grid; or where ``cand`` is false).

    The tap walk: each entry is one tap and BLOCK_O consecutive output channels (contiguous in channels-last
    dY: vector loads). Per call, once: the positions' ``p + P`` (``num``: an output index times S plus the
    tap's k·D) and, up to 31 taps, a bit per tap saying whether it reads dY; for stride 1 also each position's
    dY address (the tap then only subtracts a scalar). Per entry: int32 scalar tap math, one validity bit
    per position, the invariant channel deltas (int32 when NARROW)."""
    nd = pd + PD
    nh = ph + PH
    nw = pw + PW
    if KD * KH * KW <= 31:
        bits = tl.zeros_like(nw)
        for tap in tl.static_range(KD * KH * KW):
            ad = nd - (tap // (KW * KH)) * DD
            ah = nh - (tap // KW % KH) * DH
            aw = nw - (tap % KW) * DW
            v = (cand & (ad >= 0) & (ad % SD == 0) & (ad // SD < OD) & (ah >= 0) & (ah % SH == 0) & (ah // SH < OH)
                 & (aw >= 0) & (aw % SW == 0) & (aw // SW < OW))
            bits = bits | (v.to(tl.int32) << tap)
    if SD * SH * SW == 1:
        g_pos = g_n + nd.to(tl.int64) * stride_gd + nh.to(tl.int64) * stride_gh + nw.to(tl.int64) * stride_gw
    go = tl.arange(0, BLOCK_O).to(tl.int64) * stride_go
    wo = tl.arange(0, BLOCK_O).to(tl.int64) * stride_wo
    wc = tl.arange(0, BLOCK_K).to(tl.int64) * stride_wk
    if NARROW:
        go = go.to(tl.int32)
        wo = wo.to(tl.int32)
        wc = wc.to(tl.int32)
    for j in range(0, count):
        e = tl.load(idx_row + j, mask=j < E, other=0)
        # an entry outside [0, E) only comes from a malformed list: masked (and clamped, so the int32 tap math
        # cannot wrap), so such a list can give a wrong sum but never a wild read
        e_ok = (e >= 0) & (e < E)
        e = tl.where(e_ok, e, 0)
        t = e // TO
        o0 = (e - (t.to(tl.int64) * TO).to(tl.int32)) * BLOCK_O  # t·TO <= e: the int64 product narrows exactly
        kw = t % KW
        kh = (t // KW) % KH
        kd = t // (KW * KH)
        # (!= 0: the newest Triton's interpreter makes a block bool & a scalar bool int64, which a load mask
        # refuses; a no-op when compiled)
        o_ok = (((o0 + tl.arange(0, BLOCK_O)) < OG) & e_ok) != 0
        co0 = g * OG + o0
        if KD * KH * KW <= 31:
            ok = ((bits >> tl.where(e_ok, t, 31)) & 1) != 0
        else:
            ad = nd - kd * DD
            ah = nh - kh * DH
            aw = nw - kw * DW
            ok = (cand & (ad >= 0) & (ad % SD == 0) & (ad // SD < OD) & (ah >= 0) & (ah % SH == 0)
                  & (ah // SH < OH) & (aw >= 0) & (aw % SW == 0) & (aw // SW < OW))
        if SD * SH * SW == 1:
            g_off = co0 * stride_go - (kd * DD).to(tl.int64) * stride_gd - (kh * DH).to(tl.int64) * stride_gh \
                - (kw * DW).to(tl.int64) * stride_gw
            if NARROW:  # the launcher bounded it: int32 scalar math
                g_off = g_off.to(tl.int32)
            src = g_pos + g_off
        else:
            src = g_n + co0 * stride_go + ((nd - kd * DD) // SD).to(tl.int64) * stride_gd \
                + ((nh - kh * DH) // SH).to(tl.int64) * stride_gh + ((nw - kw * DW) // SW).to(tl.int64) * stride_gw
        a = tl.load(src[:, None] + go[None, :], mask=ok[:, None] & o_ok[None, :], other=0)
        # the weight block: W[co, c, t] at tap-major column t·CG + c
        w_off = co0 * stride_wo + (t.to(tl.int64) * CG + c0) * stride_wk
        if NARROW:
            w_off = w_off.to(tl.int32)
        w = tl.load(w_ptr + w_off + wo[:, None] + wc[None, :], mask=o_ok[:, None] & c_ok[None, :], other=0)
        acc = _mma(a, w, acc, FP64, PRECISION, UPCAST)
    return acc


@triton.jit
def masked_conv_grad_input_kernel(
    # output: dx [N, C, ID, IH, IW], contiguous
    dx_ptr,
    # inputs: the output gradient dY [N, CO, OD, OH, OW] (any strides), the weight as [CO, K] (tap-major,
    # K = CG·∏kernel, any strides), the grad-input tile lists count [ROWS] and index [ROWS, E] (contiguous
    # int32; ROWS = G·TC rows (g, tc), E = ∏kernel·TO entries e = t·TO + to)
    g_ptr, w_ptr, count_ptr, index_ptr,
    # runtime sizes: M = N·P input positions (P = ∏in), C = G·CG input channels, OG = CO/G outputs per group
    M, P, C, OG, CG, TC, TO, E, ROWS, ID, IH, IW, OD, OH, OW,
    stride_gn, stride_go, stride_gd, stride_gh, stride_gw,
    stride_wo, stride_wk,
    # geometry; PD/PH/PW are the low paddings, QD/QH/QW the high ones
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    QD: tl.constexpr, QH: tl.constexpr, QW: tl.constexpr,
    DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    MODE: tl.constexpr,
    # padded positions that can read one input index, per dim (1 for 'zeros')
    NCD: tl.constexpr, NCH: tl.constexpr, NCW: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    # tiles: BLOCK_O × BLOCK_K is the tile lists' block; BLOCK_M is free. NARROW: the in-loop channel deltas
    # (BLOCK - 1)·stride fit int32; POS32: M + BLOCK_M < 2^31 and C·P < 2^31 (int32 position math)
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, NARROW: tl.constexpr, POS32: tl.constexpr,
):
    """``dx[n, g·CG + c, i] = Σ_t Σ_o dY[n, g·OG + o, q(i, t)] · W[g·OG + o, c, t]``, summed over every
    padded position ``p`` that reads input index ``i`` (only ``i`` itself for 'zeros'; the padding's
    adjoint otherwise) and the output position ``q`` whose tap ``t`` reads ``p`` (if the stride lets one):
    one (input-position tile, channel-tile row ``(g, tc)``) per program, the K loop over the row's
    ``count`` listed ``(tap, o-tile)`` blocks only. A gather: every dx element is written once, no atomics,
    deterministic.

    Roofline (``e`` bytes per element, ``ρ`` the fraction of listed blocks): FLOPs issued =
    2·N·∏in·C·(CO/G)·∏kernel·ρ (``M = N·∏in`` positions), ∏stride times the useful 2·N·∏out·CO·(C/G)·∏kernel·ρ
    (the forward's): of the taps a position tile visits, only those the stride divides read anything, the
    rest are masked loads and MMA on zeros (for stride 1 the two agree); non-'zeros' padding adds one pass
    over the listed blocks per extra padded candidate, only in tiles that hold a border position (a position
    tile at least a row long holds a left and a right border position, so in 2-d/3-d that is ~3× the MMA for
    reflect or circular padding of the last dim: correct, not fast). Bytes ≥ (N·CO·∏out [dY]
    + CO·(C/G)·∏kernel·ρ [listed weight blocks] + N·C·∏in [dx])·e, plus the dY re-reads: each dY element is
    gathered by up to ∏kernel/∏stride positions and by every channel-tile row of its group, L1/L2 hits when
    the rows of one position tile run together, which the program order makes them do. Per k-step the
    intensity is ~2·BLOCK_M·BLOCK_K/((BLOCK_M + BLOCK_K)·e) FLOP per loaded byte, as the forward's: with
    64-128 tiles in bf16 tensor-core bound on an H100 for ResNet-size layers, the time ~linear in ρ until
    dY's and dx's compulsory traffic dominates. Depthwise layers (CG = 1) use one lane of BLOCK_K: correct,
    not fast.

    Layout: the A tile is gathered as ``[BLOCK_M, BLOCK_O]`` (positions first; for channels-last dY, what the
    launcher passes, ``BLOCK_O`` contiguous output channels per position: 16-byte ``cp.async``; see
    :func:`_grad_input_taps`); the weight block ``[BLOCK_O, BLOCK_K]`` is contiguous along the channels for a
    channels-last weight; dx is stored as ``[BLOCK_M, BLOCK_K]``.
    """
    # program id -> (position tile, channel-tile row), rows fastest: the rows of one position tile gather
    # the same dY (those of one group the same entries too), so they run together and hit in L2
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid // ROWS
    row = pid % ROWS
    g = row // TC
    tc = row % TC

    # offsets and masks: positions m = n·P + i, the row's input channels c (g·CG + c in all of dx)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    if POS32:  # int32 division, not the 64-bit subroutine
        m = m.to(tl.int32)
    n = m // P
    pix = m % P
    iw = pix % IW
    ih = (pix // IW) % IH
    i_d = pix // IW // IH  # not pix // (IW * IH): an int32 product of two sizes
    c0 = tc * BLOCK_K
    c = c0 + tl.arange(0, BLOCK_K)
    c_ok = c < CG
    g_n = g_ptr + n.to(tl.int64) * stride_gn  # sample n's dY
    # the row's listed (tap, o-tile) entries; a count past E (a malformed list) is clamped so that index is
    # never read past its row. The masks are always true (one scalar each) and only satisfy the
    # every-load-masked rule.
    count = tl.load(count_ptr + row, mask=row < ROWS, other=0)
    count = tl.minimum(count, E)
    idx_row = index_ptr + row * E

    # per padded position that reads i (the one, i itself, for 'zeros'), the loop over the listed blocks only,
    # fp32 (fp64) accumulation. A candidate holding no position of this tile is skipped whole: interior tiles
    # run one block loop, as for 'zeros'; the candidates are the outer loop so that this test runs once per
    # program and the block loop (its loads and dots) stays at the top of its own loop, where it is pipelined
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC_DTYPE)
    for jd in range(NCD):
        pd, cand_d = _padded_candidate(i_d, jd, ID, PD, QD, MODE)
        for jh in range(NCH):
            ph, cand_h = _padded_candidate(ih, jh, IH, PH, QH, MODE)
            for jw in range(NCW):
                pw, cand_w = _padded_candidate(iw, jw, IW, PW, QW, MODE)
                cand = m_ok & cand_d & cand_h & cand_w
                # MODE is a constexpr and the test a runtime branch: two ifs, so 'zeros' pays no reduction
                if MODE == 0:  # noqa: SIM114  (one candidate, p = i: nothing to skip)
                    acc = _grad_input_taps(acc, g_n, w_ptr, idx_row, count, g, c0, c_ok, pd, ph, pw, cand,
                                           E, TO, OG, CG, OD, OH, OW, stride_go, stride_gd, stride_gh, stride_gw,
                                           stride_wo, stride_wk, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
                                           FP64, PRECISION, UPCAST, BLOCK_O, BLOCK_K, NARROW)
                elif tl.max(cand.to(tl.int32), axis=0) > 0:
                    acc = _grad_input_taps(acc, g_n, w_ptr, idx_row, count, g, c0, c_ok, pd, ph, pw, cand,
                                           E, TO, OG, CG, OD, OH, OW, stride_go, stride_gd, stride_gh, stride_gw,
                                           stride_wo, stride_wk, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
                                           FP64, PRECISION, UPCAST, BLOCK_O, BLOCK_K, NARROW)

    # masked store as [BLOCK_M, BLOCK_K], positions first (see the forward's store)
    dx_c = (g * CG + c) * P
    if POS32:
        dx_c = dx_c.to(tl.int32)
    dx = dx_ptr + (n.to(tl.int64) * C * P + pix)[:, None] + dx_c[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------
# grad-input configs. As the forward's: BLOCK_O × BLOCK_K is the lists' block (lookup dims BO, BK), a config
# holds BLOCK_M, num_warps and num_stages only. The tile product is Aᵀ [BLOCK_M, BO] · W [BO, BK] into a
# BLOCK_M × BK accumulator: the forward's with the roles of BO and BK swapped.
def _swapped(dims) -> dict:
    """The grad-input's dims as the forward's rules read them: its accumulator is BLOCK_M × BK (the
    forward's BLOCK_M × BO) and a stage holds (BLOCK_M + BK)·BO operand elements (the forward's
    (BLOCK_M + BO)·BK), so :func:`_default`, :func:`_fits` and :func:`_candidates` apply with BO and BK
    swapped (fp64's BLOCK_M·BO·BK product is symmetric)."""
    out = {"M": dims["M"], "BO": dims["BK"], "BK": dims["BO"]}
    if "C" in dims:  # its channel-tile rows, for the enough-programs rule
        out["rows"] = max(1, autotune.bucket(dims["C"]) // dims["BK"])
    return out


def _gi_default(dims, dtype, interpret: bool) -> Config:
    """The forward's heuristic (:func:`_default`) with BO and BK swapped (see :func:`_swapped`): BLOCK_M 128
    positions where there are that many, 8 warps for a large accumulator, 3 stages for 16-bit dtypes and
    2 for fp32 as the shared-memory budget allows; fp64's broadcast-sum at ≤ 8192 product values; the
    largest tiles under the interpreter."""
    return _default(_swapped(dims), dtype, interpret)


def _gi_candidates(dims, dtype):
    return _candidates(_swapped(dims), dtype)


def dense_grad_input_lists(weight: torch.Tensor, groups: int, block) -> tuple[torch.Tensor, torch.Tensor]:
    """The grad-input tile lists ``(t_count, t_index)`` of a dense weight (every block listed), for the
    tuner and the tests' density 1.0: ``[G, TC]`` and ``[G, TC, ∏kernel·TO]``."""
    o, cg, kt = weight.shape[0] // groups, weight.shape[1], math.prod(weight.shape[2:])
    tc, e = triton.cdiv(cg, block[1]), kt * triton.cdiv(o, block[0])
    count = torch.full((groups, tc), e, dtype=torch.int32, device=weight.device)
    index = torch.arange(e, dtype=torch.int32, device=weight.device).expand(groups, tc, e).contiguous()
    return count, index


def _gi_problem(layer, dtype, device) -> TuneProblem:
    """A tuning grid layer (groups 1) at density 1, the block the forward's problem uses (one set of lists
    serves both passes)."""
    kernel, dil, pad, stride, mode = layer.geometry()
    o, c = layer.out_channels, layer.c
    block = default_block(o, c * layer.kernel_numel)
    g = layer.resolved()
    dims = {"M": layer.n * math.prod(layer.size), "C": c, "K": o * layer.kernel_numel, "BO": block[0],
            "BK": block[1]}

    def setup():
        grad = torch.randn(layer.n, o, *g.out_size, device=device, dtype=dtype)
        w = torch.randn(o, c, *kernel, device=device, dtype=dtype) / math.sqrt(o * layer.kernel_numel)
        count, index = dense_grad_input_lists(w, 1, block)
        size = list(layer.size)
        return (lambda cfg: masked_conv_grad_input(grad, w, count, index, size, kernel, dil, pad, stride, mode, 1,
                                                   block, config=cfg),
                lambda: reference.masked_conv_grad_input(grad, w, None, size, stride, pad, dil, 1, mode))

    return TuneProblem(dims, setup)


GRAD_INPUT_SPEC = autotune.register(KernelSpec(
    "masked_conv_grad_input", masked_conv_grad_input_kernel, ("M", "C", "K", "BO", "BK"), _gi_default,
    _gi_candidates, _gi_problem, _SPACE))


# ----------------------------------------------------------------------------------------------
# grad-input launcher
def _narrow(gs: torch.Tensor, w2: torch.Tensor, g: _shapes.Geometry, bo: int, bk: int) -> bool:
    """The grad-input kernel's ``NARROW``: every in-loop offset fits int32 — dY's channel and tap offsets from a
    position's address (``|co·stride_go| + Σ (k - 1)·d·|stride|``), the weight's from its start (every entry of
    the ``[C_out, K]`` matrix), the invariant channel deltas among them, a block's masked lanes past the sizes
    included (``bo``, ``bk``)."""
    k, d = _as_3d(g)["k"], _as_3d(g)["d"]
    co, kk_ = max(gs.shape[1], 1) + bo, w2.shape[1] + bk
    dy = co * abs(gs.stride(1)) + sum((kk - 1) * dd * abs(st) for kk, dd, st in zip(k, d, gs.stride()[2:]))
    w = co * abs(w2.stride(0)) + kk_ * abs(w2.stride(1))
    return max(dy, w) < 2**31


def _check_grad_input_list(t, name: str, shape: tuple, grad: torch.Tensor) -> None:
    _shapes.check(isinstance(t, torch.Tensor), lambda: f"{name} must be a tensor, got {type(t).__name__}", TypeError)
    _shapes.check(t.dtype == torch.int32, lambda: f"{name} must be int32, got {t.dtype}", TypeError)
    _shapes.check(tuple(t.shape) == shape,
                  lambda: f"{name} must have shape {shape} (the grad-input tile lists of this weight, groups and "
                  f"block), got {tuple(t.shape)}")
    _shapes.check(t.device == grad.device, lambda: f"{name} is on {t.device} but grad is on {grad.device}")


def masked_conv_grad_input(grad: torch.Tensor, weight: torch.Tensor, t_count: torch.Tensor, t_index: torch.Tensor,
                           input_size: list[int], kernel_size: list[int], dilation: list[int], padding: list[int],
                           stride: list[int], padding_mode: str, groups: int, block, config: Config | None = None
                           ) -> torch.Tensor:
    """The input gradient of :func:`masked_conv`: ``grad`` ``[N, C_out, *out]`` (any strides) through the
    convolution with ``weight`` ``[C_out, C_in/groups, *kernel_size]`` (any strides) read only in the
    ``block = (BO, BK)`` blocks that ``t_count`` / ``t_index`` list → ``dx`` ``[N, C_in, *input_size]``
    (contiguous), one launch, no atomics.

    The lists are :func:`convzoo.sparsity.tile_lists`' ``t_count`` int32 ``[G, TC]`` and ``t_index`` int32
    ``[G, TC, ∏kernel·TO]`` (``TC = cdiv(C_in/G, BK)``, ``TO = cdiv(C_out/G, BO)``): per channel tile
    ``tc`` of group ``g``, ``t_count[g, tc]`` listed entries ``e = t·TO + to`` first in ``t_index[g, tc]``, a
    block being output channels ``to·BO ..`` × input channels ``tc·BK ..`` at kernel tap ``t`` (row-major).
    Equal to the adjoint (w.r.t. the input) of ``F.convNd(x, weight', None, stride, padding, dilation,
    groups)`` in ``padding_mode`` (``padding``: the flat ``[lo_0, hi_0, ...]`` list), ``weight'`` being
    ``weight`` with the unlisted blocks zeroed: i.e. ``reference.masked_conv_grad_input`` with the mask the
    lists came from. Unlisted blocks are never read (NaN there is dropped); the lists are not checked
    against the weight. The weight is read as its tap-major ``[C_out, K]`` matrix (a view for a
    channels-last weight or a 1 × 1 kernel, a copy otherwise); ``grad`` channels-last (in place if it is,
    else a copy: see :func:`_channels_last`). ``config`` overrides the autotune lookup
    (BLOCK_M, warps, stages; the block is the lists').

    Raises:
        TypeError: a non-tensor or non-floating ``grad`` / ``weight``, dtypes that differ, ``t_count`` /
            ``t_index`` not int32, ``input_size`` not a sequence of ints, ``block`` not a pair of ints,
            ``groups`` not an int.
        ValueError: shapes that do not match (grad or weight rank, the weight's kernel and ``kernel_size``,
            ``grad.shape[1]`` and C_out, ``groups`` and C_out, grad's spatial size and the output grid, the
            lists' ``[G, TC]`` / ``[G, TC, ∏kernel·TO]``), a negative ``input_size`` entry, a block side not
            in :data:`BLOCK_SIZES`, bad geometry (see :func:`convzoo._shapes.geometry`), another device, or a
            device the kernels cannot run on.
    """
    # (1) check
    _shapes.check_float_tensor(grad, "grad")
    _shapes.check_float_tensor(weight, "weight")
    _shapes.check(weight.dtype == grad.dtype, lambda: f"weight has dtype {weight.dtype} but grad has {grad.dtype}",
                  TypeError)
    _shapes.check(weight.device == grad.device, lambda: f"weight is on {weight.device} but grad is on {grad.device}")
    _shapes.check(isinstance(input_size, (tuple, list)) and all(_shapes._is_int(v) for v in input_size),
                  lambda: f"input_size must be a sequence of ints, got {input_size!r}", TypeError)
    _shapes.check(all(v >= 0 for v in input_size), lambda: f"input_size must be non-negative, got {list(input_size)}")
    g = _shapes.geometry(tuple(int(v) for v in input_size), kernel_size, dilation, padding, stride, padding_mode)
    _shapes.check(grad.dim() == g.ndim + 2,
                  lambda: f"grad must be [N, C_out, *out] with {g.ndim} spatial dims (input_size's), got shape "
                  f"{tuple(grad.shape)}")
    _shapes.check(weight.dim() == grad.dim() and tuple(weight.shape[2:]) == tuple(g.kernel_size),
                  lambda: f"weight must be [C_out, C_in/groups, *kernel_size] = [C_out, C_in/groups, "
                  f"{', '.join(map(str, g.kernel_size))}], got shape {tuple(weight.shape)}")
    co, cg = weight.shape[0], weight.shape[1]
    _shapes.check(_shapes._is_int(groups), lambda: f"groups must be an int, got {groups!r}", TypeError)
    groups = int(groups)
    _shapes.check(groups > 0, lambda: f"groups must be positive, got {groups}")
    _shapes.check(co % groups == 0, lambda: f"groups={groups} must divide the output channels C_out={co}")
    _shapes.check(grad.shape[1] == co, lambda: f"grad.shape[1]={grad.shape[1]} must be C_out = weight.shape[0] = {co}")
    _shapes.check(tuple(grad.shape[2:]) == tuple(g.out_size),
                  lambda: f"grad spatial size {list(grad.shape[2:])} must be the output grid {list(g.out_size)} of "
                  f"input_size {list(g.in_size)} with this kernel_size/dilation/padding/stride")
    bo, bk = _check_block(block)
    og, kt = co // groups, g.kernel_numel
    to, tc = triton.cdiv(og, bo), triton.cdiv(cg, bk)
    _check_grad_input_list(t_count, "t_count", (groups, tc), grad)
    _check_grad_input_list(t_index, "t_index", (groups, tc, kt * to), grad)
    _check_device(grad)
    # (2) allocate; nothing to launch for an empty dx (N, C_in or an input dim = 0), and dx = 0 without
    # output channels (C_out = 0: nothing reaches the input; the output grid is never empty, see geometry)
    n, c = grad.shape[0], cg * groups
    dx = grad.new_empty((n, c, *g.in_size))
    if dx.numel() == 0:
        return dx
    if co == 0:
        return dx.zero_()
    buf = _launch_buffer(dx, masked_conv_grad_input_kernel)
    # (3) look up config and launch
    P = math.prod(g.in_size)
    M = n * P
    cfg = config or autotune.lookup("masked_conv_grad_input", grad.device, grad.dtype, M=M, C=c, K=og * kt,
                                    BO=bo, BK=bk)
    a = _as_3d(g)
    # the tap walk reads BLOCK_O contiguous output channels per position from channels-last dY; other layouts
    # are copied once (see _channels_last)
    gs = _channels_last(_as_5d(grad, g.ndim))
    w2 = weight.movedim(1, -1).reshape(co, cg * kt)  # tap-major: a view for channels-last weights, else a copy
    t_count, t_index = t_count.contiguous(), t_index.contiguous()
    rows = groups * tc
    grid = (triton.cdiv(M, cfg.meta["BLOCK_M"]) * rows,)
    with _device(grad):
        masked_conv_grad_input_kernel[grid](
            buf, gs, w2, t_count, t_index,
            M, P, c, og, cg, tc, to, kt * to, rows, *a["in"], *a["out"],
            *gs.stride(), *w2.stride(),
            *a["k"], *a["s"], *a["lo"], *a["hi"], *a["d"],
            _shapes.PADDING_MODE_CODES[g.padding_mode],
            *_num_candidates(g, 3 - g.ndim),
            **_math_args(grad.dtype, masked_conv_grad_input_kernel),
            BLOCK_O=bo, BLOCK_K=bk,
            NARROW=_narrow(gs, w2, g, bo, bk),
            POS32=M + cfg.meta["BLOCK_M"] < 2**31 and c * P < 2**31, **cfg.launch_kwargs(),
        )
    return _finish(dx, buf)
