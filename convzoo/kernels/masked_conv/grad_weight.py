"""Masked sparse convolution, grad-weight: ``dW_g = dY_gᵀ · P_g`` over the listed weight tiles (the
forward's tile lists, :mod:`convzoo.kernels.masked_conv.fwd`), a split over the positions, and its launcher."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from convzoo import _shapes, autotune
from convzoo.autotune import Config, ConfigSpace, KernelSpec, TuneProblem
from convzoo.kernels import _common as cm
from convzoo.kernels.masked_conv.fwd import (
    _check_block,
    _check_list,
    _tap_tile,
    default_block,
    dense_tile_lists,
)

__all__ = ["masked_conv_grad_weight"]

# ==============================================================================================
# grad-weight: dW_g = dY_gᵀ · P_g over the listed tiles, a split over the positions
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gw_taps(n, od, oh, ow, p_ok, s_ok, kd_s, kh_s, kw_s, tap_s, ch, ID, IH, IW, stride_xn, stride_xd, stride_xh,
             stride_xw, ST: tl.constexpr, LO: tl.constexpr, MODE: tl.constexpr, OFF32: tl.constexpr,
             VEC: tl.constexpr):
    """The tap walk's patch addressing for positions ``(n, od, oh, ow)`` ``[BLOCK_M]`` (valid where ``p_ok``) and the
    tile's sub-tiles (valid where ``s_ok``; tap offsets ``kd_s, kh_s, kw_s``, x offsets ``tap_s`` ``[NS]``; the
    in-sub-tile channel offsets ``ch`` ``[SUB]``): the validity per (position, sub-tile) ``[BLOCK_M, NS]`` and the
    x offsets ``[BLOCK_M, NS, SUB]`` (int32 when ``OFF32``: the launcher proved every one fits)."""
    i_d0 = od * ST[0] - LO[0]
    i_h0 = oh * ST[1] - LO[1]
    i_w0 = ow * ST[2] - LO[2]
    x_n = n.to(tl.int64) * stride_xn
    if MODE == 0:
        x_pos = x_n + i_d0.to(tl.int64) * stride_xd + i_h0.to(tl.int64) * stride_xh + i_w0.to(tl.int64) * stride_xw
        if OFF32:
            x_pos = x_pos.to(tl.int32)
        # [BLOCK_M, NS]: 0 <= i < n as one unsigned compare
        v = (p_ok[:, None] & s_ok[None, :]
             & ((i_d0[:, None] + kd_s[None, :]).to(tl.uint32, bitcast=True) < ID)
             & ((i_h0[:, None] + kh_s[None, :]).to(tl.uint32, bitcast=True) < IH)
             & ((i_w0[:, None] + kw_s[None, :]).to(tl.uint32, bitcast=True) < IW))
        src = x_pos[:, None] + tap_s[None, :]
    else:
        # other padding modes: each (position, sub-tile) reads its own source index
        s_d, ok_d = cm._source_index(i_d0[:, None] + kd_s[None, :], ID, MODE)
        s_h, ok_h = cm._source_index(i_h0[:, None] + kh_s[None, :], IH, MODE)
        s_w, ok_w = cm._source_index(i_w0[:, None] + kw_s[None, :], IW, MODE)
        v = p_ok[:, None] & s_ok[None, :] & ok_d & ok_h & ok_w
        src = x_n[:, None] + s_d.to(tl.int64) * stride_xd + s_h.to(tl.int64) * stride_xh \
            + s_w.to(tl.int64) * stride_xw + tap_s[None, :]
        if OFF32:
            src = src.to(tl.int32)
    off3 = src[:, :, None] + ch[None, None, :]
    if VEC > 1:
        # what the compiler cannot always derive (triton 3.8 does not for two-tap tiles, NS = 2, and then gathers x
        # one element per load, unpipelined: 0.12 of the tensor cores' peak and spills, against 0.60 with it; the
        # static report, fp16 cifar_conv2)
        off3 = tl.multiple_of(off3, [1, 1, VEC])
    return v, off3


@triton.jit
def _gw_product(acc, dy, pt3, v, x_threshold, y_threshold, SWAP: tl.constexpr, BINARIZE: tl.constexpr,
                FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One step of the tap walk's product: ``acc += dYᵀ · P`` (``[BLOCK_O, BLOCK_K]``), or with ``SWAP`` ``acc +=
    Pᵀ · dY`` (``[BLOCK_K, BLOCK_O]``), from dY ``[BLOCK_M, BLOCK_O]`` and the patches gathered as ``[BLOCK_M, NS,
    SUB]`` (``pt3``) with their validity per (position, sub-tile) ``v``. ``BINARIZE``: the coactivation count's
    0/1 operands."""
    BLOCK_M: tl.constexpr = pt3.shape[0]
    NS: tl.constexpr = pt3.shape[1]
    SUB: tl.constexpr = pt3.shape[2]
    pt = tl.reshape(pt3, [BLOCK_M, NS * SUB])
    if BINARIZE:
        # the coactivation count: 0/1 operands (a padded tap is absent, so 0 whatever the threshold; NaN is never
        # above one), compared in the accumulator's dtype; 0/1 products and their sums are exact in fp32 below
        # 2^24, so fp16 operands on the tensor cores count exactly
        p_ok = tl.reshape(tl.broadcast_to(v[:, :, None], [BLOCK_M, NS, SUB]), [BLOCK_M, NS * SUB])
        yb = tl.where(cm._widen(dy, ACC_DTYPE, UPCAST) > y_threshold, 1.0, 0.0)
        xb = tl.where(p_ok & (cm._widen(pt, ACC_DTYPE, UPCAST) > x_threshold), 1.0, 0.0)
        if SWAP:
            if FP64:
                acc = cm._mma(tl.trans(xb.to(tl.float64)), yb.to(tl.float64), acc, True, PRECISION, False)
            else:
                acc = cm._mma(tl.trans(xb.to(tl.float16)), yb.to(tl.float16), acc, False, "ieee", False)
        elif FP64:
            acc = cm._mma(tl.trans(yb.to(tl.float64)), xb.to(tl.float64), acc, True, PRECISION, False)
        else:
            acc = cm._mma(tl.trans(yb.to(tl.float16)), xb.to(tl.float16), acc, False, "ieee", False)
    elif SWAP:
        acc = cm._mma(tl.trans(pt), dy, acc, FP64, PRECISION, UPCAST)
    else:
        acc = cm._mma(tl.trans(dy), pt, acc, FP64, PRECISION, UPCAST)
    return acc


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
    KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, DIL: tl.constexpr,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr, BINARIZE: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    # tiles: BLOCK_O × BLOCK_K is the tile lists' block; BLOCK_M (the reduction step) and SPLIT are free. SUB (see
    # _tap_tile): the k-tile is BLOCK_K / SUB sub-tiles of one tap each (0: the per-element gather); OFF32: every
    # offset the tap walk forms into x and dY fits int32 (the launcher proved it, see _gw_off32); POS32:
    # M + BLOCK_M < 2^31, so position indices are int32; DIMS: the spatial dims (the tap walk's positions advance
    # only those); DY_FLAT: dY is [M, CO] with row stride stride_dw (channels-last, packed positions); VEC: every
    # x sub-tile row the tap walk reads starts at a multiple of VEC elements (16 bytes; the launcher proved it, see
    # _x_vector), 1: not proved. PLANE (the tap walk only, see _gw_plane): a step's positions are BLOCK_M / BL
    # samples × BL positions of one sample plane (BL a power of two), l-blocks outer, sample blocks inner
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    SUB: tl.constexpr = 0, OFF32: tl.constexpr = False, POS32: tl.constexpr = False, DIMS: tl.constexpr = 3,
    DY_FLAT: tl.constexpr = False, VEC: tl.constexpr = 1, PLANE: tl.constexpr = False, BL: tl.constexpr = 1,
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
    The plane walk (``PLANE``, where a plane fills ≥ 3/4 of its ``BL``-position tiles: :func:`_gw_plane`) holds
    a step's positions' addressing and validity over the sample blocks, so its step is loads and MMAs; its
    lanes past a plane (``cdiv(L, BL)·BL - L`` per sample) are masked MMA rows: the FLOPs above times
    ``cdiv(L, BL)·BL / L`` on the tensor cores. The flat walk (positions in order) advances them by carries.
    ``SUB = 0`` (``C/G`` without a power-of-two divisor ≥ 16) keeps the per-element gather, both operand tiles
    positions-last, dY as ``[BLOCK_O, BLOCK_M]`` and the patches as ``[BLOCK_K, BLOCK_M]`` (consecutive threads
    read consecutive positions, contiguous in dY and, for stride 1, in x), the patch tile transposed for
    ``tl.dot``. The ``BO × BK`` store is strided (the
    weight is ``[CO, CG, *kernel]``: consecutive k are ``KT`` apart), once per tile: ~1/M of the traffic.
    """
    # program id -> (share s, o-tile row (g, to), slot j), slots fastest, then rows: the programs of one
    # share read the same positions of x and dY, so they run together and hit in L2; the tile's output
    # channels (co in all of dY) and their mask
    s, row, j, g, o_ok, co = cm._split_tile(TK, ROWS, TO, OG, BLOCK_O)

    # offsets and masks: the tile's columns k
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
    r = c * cm._taps(KS) + t
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
        kd_s = (ts // (KS[2] * KS[1])) * DIL[0]
        kh_s = (ts // KS[2] % KS[1]) * DIL[1]
        kw_s = (ts % KS[2]) * DIL[2]
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
        # a narrow block (BLOCK_O < 64 <= BLOCK_K) accumulates dWᵀ = Pᵀ·dY: the MMA's M side is then BLOCK_K
        # (wgmma wants 64 rows per warpgroup)
        SWAP: tl.constexpr = BLOCK_O < 64 and BLOCK_K >= 64 and not FP64
        if SWAP:
            acc_t = tl.zeros([BLOCK_K, BLOCK_O], dtype=ACC_DTYPE)
        if PLANE:
            # the plane walk (_gw_plane): a step's positions are BN = BLOCK_M / BL samples × BL positions of their
            # planes, and the share's (l-block, sample block) pairs are walked l-blocks outer: the positions'
            # window corners, validity bits and in-sample offsets are computed once per l-block (the divisions by
            # the output sizes there), and a step only moves two scalar bases by BN samples
            BN: tl.constexpr = BLOCK_M // BL
            ni = tl.arange(0, BLOCK_M) // BL
            li = tl.arange(0, BLOCK_M) % BL
            N = M // L
            NB = (N - 1) // BN + 1
            pairs = ((L - 1) // BL + 1) * NB
            per = (pairs - 1) // SPLIT + 1
            p0 = s * per
            p1 = tl.where(j < count, tl.minimum(p0 + per, pairs), p0)
            for lb in range(p0 // NB, tl.where(p1 > p0, (p1 - 1) // NB + 1, 0)):
                l = lb * BL + li
                l_ok = l < L
                l = tl.where(l_ok, l, 0)
                if POS32:
                    l = l.to(tl.int32)
                ow = (l % OW).to(tl.int32)
                oh = (l // OW % OH).to(tl.int32) if DIMS >= 2 else tl.zeros_like(ow)
                od = (l // OW // OH).to(tl.int32) if DIMS >= 3 else tl.zeros_like(ow)
                v0, off3 = _gw_taps(ni, od, oh, ow, l_ok, s_ok, kd_s, kh_s, kw_s, tap_s, ch, ID, IH, IW, stride_xn,
                                    stride_xd, stride_xh, stride_xw, ST, LO, MODE, OFF32, VEC)
                dy_pos = ni.to(tl.int64) * stride_dn + od.to(tl.int64) * stride_dd + oh.to(tl.int64) * stride_dh \
                    + ow.to(tl.int64) * stride_dw
                if OFF32:
                    dy_pos = dy_pos.to(tl.int32)
                dy_off = dy_pos[:, None] + dyc[None, :]
                dy_ok = l_ok[:, None] & o_ok[None, :]
                for nb in range(tl.maximum(p0 - lb * NB, 0), tl.minimum(p1 - lb * NB, NB)):
                    n0 = tl.cast(nb, tl.int64) * BN  # (the interpreter passes a Python int)
                    v = v0
                    y_ok = dy_ok
                    if BN > 1:
                        # the last sample block's lanes past N
                        n_ok = ni < N - n0
                        v = v0 & n_ok[:, None]
                        y_ok = dy_ok & n_ok[:, None]
                    dy = tl.load(dy_ptr + n0 * stride_dn + dy_off, mask=y_ok, other=0)
                    pt3 = tl.load(x_g + n0 * stride_xn + off3, mask=v[:, :, None], other=0)
                    if SWAP:
                        acc_t = _gw_product(acc_t, dy, pt3, v, x_threshold, y_threshold, True, BINARIZE, FP64,
                                            PRECISION, UPCAST, ACC_DTYPE)
                    else:
                        acc = _gw_product(acc, dy, pt3, v, x_threshold, y_threshold, False, BINARIZE, FP64,
                                          PRECISION, UPCAST, ACC_DTYPE)
        else:
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
                dy = tl.load(dy_ptr + dy_pos[:, None] + dyc[None, :], mask=m_ok[:, None] & o_ok[None, :], other=0)
                v, off3 = _gw_taps(n, od, oh, ow, m_ok, s_ok, kd_s, kh_s, kw_s, tap_s, ch, ID, IH, IW, stride_xn,
                                   stride_xd, stride_xh, stride_xw, ST, LO, MODE, OFF32, VEC)
                pt3 = tl.load(x_g + off3, mask=v[:, :, None], other=0)
                if SWAP:
                    acc_t = _gw_product(acc_t, dy, pt3, v, x_threshold, y_threshold, True, BINARIZE, FP64, PRECISION,
                                        UPCAST, ACC_DTYPE)
                else:
                    acc = _gw_product(acc, dy, pt3, v, x_threshold, y_threshold, False, BINARIZE, FP64, PRECISION,
                                      UPCAST, ACC_DTYPE)
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
            off, ok = cm._patch_columns(r[:, None], l[None, :], ID, IH, IW, OH, OW,
                                        stride_xc, stride_xd, stride_xh, stride_xw,
                                        KS, ST, LO, DIL, MODE, False)
            p_ok = (k_ok[:, None] & m_ok[None, :]) & ok
            pt = tl.load(x_g + n[None, :] * stride_xn + off, mask=p_ok, other=0)
            if BINARIZE:
                # the coactivation count: 0/1 operands (a padded tap is absent, so 0 whatever the threshold; NaN is
                # never above one), compared in the accumulator's dtype; 0/1 products and their sums are exact in fp32
                # below 2^24, so fp16 operands on the tensor cores count exactly
                yb = tl.where(cm._widen(dy, ACC_DTYPE, UPCAST) > y_threshold, 1.0, 0.0)
                xb = tl.where(p_ok & (cm._widen(pt, ACC_DTYPE, UPCAST) > x_threshold), 1.0, 0.0)
                if FP64:
                    acc = cm._mma(yb.to(tl.float64), tl.trans(xb.to(tl.float64)), acc, True, PRECISION, False)
                else:
                    acc = cm._mma(yb.to(tl.float16), tl.trans(xb.to(tl.float16)), acc, False, "ieee", False)
            else:
                acc = cm._mma(dy, tl.trans(pt), acc, FP64, PRECISION, UPCAST)
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
    return cm._split_count(tiles, b(dims["M"]) // (8 * bm))


def _gw_default(dims, dtype, interpret: bool) -> Config:
    """BLOCK_M 128 positions per step for the 16-bit dtypes with 2 stages (the static sm_90 report, fp16 conv3_x:
    the tap walk's per-position work over twice the MMA, 0.59 -> 0.65 of the tensor cores' peak, and 3 blocks
    of 4 warps per SM), 32 for fp32's twice larger operand tiles (the block sets the accumulator: BLOCK_M only
    sets the operand tiles and the steps; 16 for a block of ≤ 32 × 64, where triton 3.8 spilled 12 bytes at 32
    with the plane walk, the static report's local_2d_b256), 8 warps once the fp32 accumulator passes 64 values
    per thread at 4, and for fp32's FMA product (its operand tiles in registers too: 4 warps spill); stages as
    :func:`_gw_fits` allows, then SPLIT (:func:`_gw_split`). fp64 is a broadcast-sum holding a BO × BLOCK_M × BK
    product: BLOCK_M shrinks to keep it at ≤ 8192 values. The interpreter pays per program and per step: the
    largest BLOCK_M, one share."""
    bo, bk = dims["BO"], dims["BK"]
    if interpret:
        return Config({"BLOCK_M": cm._fit(dims["M"], 16, 256), "SPLIT": 1}, num_warps=4, num_stages=1)
    half = dtype in (torch.float16, torch.bfloat16)
    warps = 8 if bo * bk > 64 * 128 or dtype == torch.float32 else 4
    if dtype == torch.float64:
        bm, stages = max(1, min(16, 8192 // (bo * bk))), 1
    else:
        bm = 128 if half else 16 if bo * bk <= 32 * 64 else 32
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
def _x_vector(xs: torch.Tensor, cg: int, sub: int) -> int:
    """The kernel's ``VEC``: the elements of a 16-byte vector when every x sub-tile row the tap walk reads starts
    at a multiple of them, else 1. A row's offset is ``g·CG + c_s + Σ_dim i·stride`` (channels-last ``xs``:
    channel stride 1; ``c_s`` a multiple of SUB), so that holds when CG, SUB and every other stride of ``xs`` are
    multiples (a channel slice of a wider channels-last tensor, say, need not be); the pointer's own alignment
    is Triton's to check."""
    vec = 16 // xs.element_size()
    strides = (xs.stride(0), *xs.stride()[2:])
    return vec if xs.stride(1) == 1 and all(v % vec == 0 for v in (cg, sub, *strides)) else 1


def _gw_plane(L: int, bm: int) -> int:
    """The kernel's ``BL`` for the plane walk (``PLANE``), 0 for the flat one: ``BL = min(BLOCK_M, 2^⌈log2 L⌉)``
    positions of a plane per sample, where those tiles hold at least 3/4 useful positions (``L / (cdiv(L, BL) ·
    BL)``: the lanes past a plane are masked MMA rows)."""
    bl = min(bm, triton.next_power_of_2(L))
    return bl if 3 * triton.cdiv(L, bl) * bl <= 4 * L else 0


def _gw_off32(xs: torch.Tensor, dys: torch.Tensor, g: _shapes.Geometry, co: int, bo: int) -> bool:
    """The grad-weight tap walk's ``OFF32``: every offset it forms into x and dY fits int32 — for a valid lane
    each partial sum of ``n·stride_xn + i_d·stride_xd + ... + c·stride_xc`` lies within ``Σ (size + lo + hi + (k
    - 1)·d)·|stride|`` over x's dims (the window corners reach past the padding), and dY's within ``Σ size·|stride|
    + (C_out + BLOCK_O)·|stride_dc|`` (the block's masked channel lanes). Lanes past M form wrapped offsets and
    are never read."""
    a = cm._as_3d(g)
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
    cm._check_device(x)
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
        target = cm._launch_buffer(dw, masked_conv_grad_weight_kernel)
    else:  # the fp32 (fp64) partials, one per share
        target = torch.empty((split, *size), dtype=acc_dtype, device=x.device)
    out = target.view(-1, co, cg, kt)
    a = cm._as_3d(g)
    sub = _tap_tile(cg, bk)["SUB"]
    xs, dys = cm._as_5d(x, g.ndim), cm._as_5d(grad, g.ndim)
    if sub:
        # the tap walk reads SUB contiguous channels per position from channels-last x and BLOCK_O from
        # channels-last dY; other layouts are copied once (see _channels_last)
        xs, dys = cm._channels_last(xs), cm._channels_last(dys)
    pos32 = M + cfg.meta["BLOCK_M"] < 2**31
    bl = _gw_plane(L, cfg.meta["BLOCK_M"]) if sub else 0
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
    with cm._device(x):
        masked_conv_grad_weight_kernel[grid](
            out, dys, xs, x if m3 is None else m3, count, index,  # x as the mask pointer: never read
            M, L, og, cg, k, to, tk, rows, *a["in"], a["out"][1], a["out"][2], xt, yt,
            *dys.stride(), *xs.stride(), *(m3.stride() if m3 is not None else (0, 0, 0)), *out.stride(),
            a["k"], a["s"], a["lo"], a["d"],
            _shapes.PADDING_MODE_CODES[g.padding_mode],
            m3 is not None, thresholds is not None, **cm._math_args(x.dtype, masked_conv_grad_weight_kernel),
            BLOCK_O=bo, BLOCK_K=bk, SUB=sub, OFF32=off32, POS32=pos32, DIMS=g.ndim, DY_FLAT=dy_flat,
            VEC=_x_vector(xs, cg, sub) if sub else 1, PLANE=bool(sub and bl), BL=max(bl, 1),
            **cfg.launch_kwargs(),
        )
    if split == 1:
        return cm._finish(dw, target)
    # the partials, summed in a fixed order (deterministic); a masked entry is 0 in each, so 0 in the sum
    if dw.dtype == acc_dtype:
        return torch.sum(target, dim=0, out=dw)
    return dw.copy_(target.sum(0))
