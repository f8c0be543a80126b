"""Locally connected convolution: forward, grad-input and grad-weight Triton kernels and launchers.

Output position ``l`` has its own filter ``W_l = weight[:, :, l]`` (``[C_out, R]``, ``R = C_in·∏K``),
so each kernel is one small GEMM per position, with the patch matrix ``P_l`` (``[N, R]``) gathered
from ``x`` inside the kernel and never written to memory:

- forward:      ``Y_l  = P_l · W_lᵀ``        (``[N, C_out]``, + bias)
- grad-weight:  ``dW_l = dY_lᵀ · P_l``       (``[C_out, R]``, the batch reduced in-kernel; + bias grad)
- grad-input:   ``dX[:, :, i] = Σ_{(l, k) reading i} dY_l · W_l[:, (·, k)]`` — a gather over the
  (position, tap) pairs that read input pixel ``i``, as fold does: deterministic, no atomics.

All use ``tl.dot`` on tiles ≥ 16 with fp32 accumulation (fp64 for fp64, as a broadcast-sum).
Every rank is treated as 3-d with leading unit dims (see :mod:`convzoo.kernels.unfold`), and the
padding modes are index math, as in unfold. Offsets are int64; the forward's position, row and in-sample math and
the backward kernels' in-loop deltas are int32 where the launcher proves they fit (``NARROW``), their bases int64.
The forward and grad-weight take x batch-last (one copy, unless it is or the batch is below 16 bytes): a patch row
of one position is then contiguous samples, so the patch tile is 16-byte ``cp.async`` like the weight's.

The weight may have any strides. The fastest layout is the one :class:`convzoo.LocalConv2d` keeps:
physically ``[L, C_out, R]`` (``R`` contiguous), so each program streams one contiguous slab of W.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from convzoo import _shapes, autotune, reference
from convzoo.autotune import Config, KernelSpec, TuneProblem
from convzoo.kernels import _common as cm
from convzoo.kernels._local_conv_configs import (
    _c_major,
    _fwd_default,
    _gemm_candidates,
    _gemm_space,
    _grad_input_default,
    _grad_weight_default,
    _n_major,
    _r_major,
)

__all__ = ["local_conv", "local_conv_grad_input", "local_conv_grad_weight"]


# ----------------------------------------------------------------------------------------------
@triton.jit
def _window_rows(r, i_d0, i_h0, i_w0, bits, ID, IH, IW, stride_xc, stride_xd, stride_xh, stride_xw,
                 KS: tl.constexpr, DIL: tl.constexpr, MODE: tl.constexpr, NARROW: tl.constexpr):
    """For patch rows ``r = (c, kd, kh, kw)`` of the position whose window :func:`_window` gave: the offset into
    ``x[n]`` each reads and whether it reads anything (``'zeros'`` padding reads nothing). The rows' dtype (int32
    where the launcher proved it fits, ``NARROW``) is the math's, the offset formed in int64 and narrowed then;
    the divisions are by compile-time tap counts."""
    k = r % cm._taps(KS)
    c = r // cm._taps(KS)
    kd, kh, kw = cm._tap_coords(k, KS[1], KS[2])
    p_d = i_d0 + kd * DIL[0]
    p_h = i_h0 + kh * DIL[1]
    p_w = i_w0 + kw * DIL[2]
    if MODE == 0:
        if cm._taps(KS) <= 31:
            ok = ((bits >> k.to(tl.int32)) & 1) != 0
        else:
            ok = (p_d >= 0) & (p_d < ID) & (p_h >= 0) & (p_h < IH) & (p_w >= 0) & (p_w < IW)
    else:
        p_d, ok = cm._source_index(p_d, ID, MODE)
        p_h, _ = cm._source_index(p_h, IH, MODE)
        p_w, _ = cm._source_index(p_w, IW, MODE)
    off = c.to(tl.int64) * stride_xc + p_d.to(tl.int64) * stride_xd + p_h.to(tl.int64) * stride_xh \
        + p_w.to(tl.int64) * stride_xw
    if NARROW:
        off = off.to(tl.int32)
    return off, ok


@triton.jit
def _fwd_step(acc, w_rows, x_cols, n_ok, r0, r, R, stride_wr, i_d0, i_h0, i_w0, bits, tab_ptr, corner, ID, IH, IW,
              stride_xc, stride_xd, stride_xh, stride_xw,
              KS: tl.constexpr, DIL: tl.constexpr, MODE: tl.constexpr, LAST: tl.constexpr, GATHER_T: tl.constexpr,
              ROW_TABLE: tl.constexpr, ALIGN: tl.constexpr, N_MAJOR: tl.constexpr, NARROW: tl.constexpr,
              FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One R block of the forward: ``acc += W_l[:, r] · P_l[:, r]ᵀ``, the patch rows' offsets and validity from the
    row table (``ROW_TABLE``, see :func:`_row_table`) or computed (:func:`_window_rows`). The weight's C_out rows
    are clamped in range (never stored), so only the ``LAST``, partial block masks its tile by ``r < R``, a full
    block by its one scalar condition ``r0 + BLOCK_R <= R`` (true; a uniform mask keeps the 16-byte loads; fp64,
    whose loads are 8-byte, by ``r < R`` too: with the scalar one ptxas spilled 4 bytes, the static report); the
    patch tile is masked by the rows' validity (and ``r < R`` in the last block) and the batch lanes: zeros in both
    operands, NaN-safe. The table holds ``cdiv(R, 128)·128`` rows, so a block that starts below ``R`` reads
    inside it."""
    if ROW_TABLE:
        # one load per row: the row's tap (high word; 31 past R: no bit) and its offset from the window corner
        e = tl.load(tab_ptr + r, mask=r0 < R, other=0)
        off = tl.multiple_of(corner + e.to(tl.int32), ALIGN)  # a sum of strides, each a multiple of ALIGN
        ok = ((bits >> (e >> 32).to(tl.int32)) & 1) != 0
    else:
        off, ok = _window_rows(r, i_d0, i_h0, i_w0, bits, ID, IH, IW, stride_xc, stride_xd, stride_xh, stride_xw,
                               KS, DIL, MODE, NARROW)
    w_off = r.to(tl.int64) * stride_wr
    if NARROW:
        w_off = w_off.to(tl.int32)
    if LAST or FP64:
        r_ok = r < R
        ok = ok & r_ok
        w = tl.load(w_rows[:, None] + w_off[None, :], mask=r_ok[None, :], other=0)
    else:
        w = tl.load(w_rows[:, None] + w_off[None, :], mask=r0 + r.shape[0] <= R, other=0)
    if N_MAJOR:  # y_l = P_l · W_lᵀ: the batch tile is the MMA's M
        p = tl.load(x_cols[:, None] + off[None, :], mask=n_ok[:, None] & ok[None, :], other=0)
        acc = cm._mma(p, tl.trans(w), acc, FP64, PRECISION, UPCAST)
    elif GATHER_T:  # the same tile, gathered batch-major and transposed (see _GATHER_T)
        p = tl.trans(tl.load(x_cols[:, None] + off[None, :], mask=n_ok[:, None] & ok[None, :], other=0))
        acc = cm._mma(w, p, acc, FP64, PRECISION, UPCAST)
    else:
        p = tl.load(x_cols[None, :] + off[:, None], mask=ok[:, None] & n_ok[None, :], other=0)
        acc = cm._mma(w, p, acc, FP64, PRECISION, UPCAST)
    return acc


@triton.jit
def local_conv_fwd_kernel(
    # output: [N, O, L], contiguous
    y_ptr,
    # inputs: x [N, C, ID, IH, IW], weight [O, R, L], bias [O, L] (per-channel bias: stride_bl = 0)
    x_ptr, w_ptr, b_ptr,
    # the row table (ROW_TABLE: int64 [cdiv(R, 128)·128], see _row_table; else never read)
    tab_ptr,
    # runtime sizes
    N, O, R, ID, IH, IW, OH, OW, L,
    stride_xn, stride_xc, stride_xd, stride_xh, stride_xw,
    stride_wo, stride_wr, stride_wl,
    stride_bo, stride_bl,
    # geometry
    KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, DIL: tl.constexpr,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr, GATHER_T: tl.constexpr,
    # NARROW: R + BLOCK_R, L, (R + BLOCK_R)·stride_wr, every index value and a sample's farthest element below 2^31
    # (the launcher proved it): the position, row and in-sample index math in int32, the sample and weight bases int64
    NARROW: tl.constexpr,
    # ROW_TABLE ('zeros', ≤ 31 taps, NARROW): each patch row's offset and tap from the launcher's table; ALIGN: a
    # power of two (≤ 16) that divides x's channel and spatial strides, so every row's offset (loaded: Triton
    # cannot see it) keeps the alignment a vector load needs
    ROW_TABLE: tl.constexpr, ALIGN: tl.constexpr,
    # tiles; N_MAJOR: the batch tile is the MMA's M (y_l = P_l · W_lᵀ), else the C_out tile (yᵀ = W_l · P_lᵀ)
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, N_MAJOR: tl.constexpr,
):
    """``y[n, o, l] = Σ_r P_l[n, r] · W[o, r, l] + b[o, l]``: one (position, C_out tile, batch tile)
    per program, looping over R with ``tl.dot`` as ``yᵀ = W_l · P_lᵀ``: the C_out tile is the MMA's M (64 rows
    per warpgroup make it ``wgmma`` whatever the batch), the batch tile its N.

    Hot loop: per program, once, the position's window corner and (``'zeros'``, ≤ 31 taps) a validity bit per
    tap; per R block, each patch row's offset from the corner and its tap loaded from the row table
    (``ROW_TABLE``), else its tap and channel by divisions by compile-time tap counts (int32 when ``NARROW``), its
    offset and validity; per element nothing. The weight tile streams along its contiguous R (16-byte
    ``cp.async``), masked per element only in the last, partial R block (see :func:`_fwd_step`). The launcher
    hands x batch-last
    (:func:`_common._batch_last`: one copy, unless it already is or the batch is below 16 bytes), so a patch row
    of the tile is ``BLOCK_N`` contiguous samples: 16-byte ``cp.async`` too. A batch-first x (a batch below 16
    bytes) is one scalar load per element, its own 64-bit address each.

    Roofline: FLOPs = 2·N·O·R·L; bytes ≥ (O·R·L [weight] + N·C·∏in [x, re-reads served by L2]
    + N·O·L [y])·e, plus 2·N·C·∏in·e for the batch-last copy of x. Arithmetic intensity ≈ 2N/e FLOP per weight
    byte, so the op is bound by weight bandwidth below N ≈ (matmul peak / copy bandwidth)·e/2 — about 300 in
    bf16 on an H100 — and by tensor-core throughput above. Programs of one position are consecutive with the
    batch tile innermost, so a weight tile is fetched from DRAM once and re-read from L2.
    """
    # program id -> (position, C_out tile, batch tile), batch tile fastest
    pid = tl.program_id(0).to(tl.int64)
    num_n = tl.cdiv(N, BLOCK_N)
    num_o = tl.cdiv(O, BLOCK_O)
    l = pid // (num_n * num_o)
    pid_o = (pid // num_n) % num_o
    pid_n = pid % num_n

    # offsets and masks; the weight's C_out rows clamped in range (never stored)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    n_ok = n < N
    o_ok = o < O
    x_cols = x_ptr + n * stride_xn
    w_rows = w_ptr + l * stride_wl + tl.minimum(o, O - 1) * stride_wo
    if NARROW:
        lw = l.to(tl.int32)
        r_ar = tl.arange(0, BLOCK_R)
    else:
        lw = l
        r_ar = tl.arange(0, BLOCK_R).to(tl.int64)
    i_d0, i_h0, i_w0, bits = cm._window(lw, OH, OW, ID, IH, IW, KS, ST, LO, DIL, MODE)
    # tap 0's offset (negative past an edge)
    corner = i_d0.to(tl.int64) * stride_xd + i_h0.to(tl.int64) * stride_xh + i_w0.to(tl.int64) * stride_xw
    if NARROW:
        corner = corner.to(tl.int32)

    # loop over the full R blocks, then the partial one; fp32 (fp64) accumulation of yᵀ = W_l · P_lᵀ: C_out is
    # the MMA's M (≥ 64 rows per warpgroup: wgmma even for a small batch), the batch its N
    if N_MAJOR:
        acc = tl.zeros([BLOCK_N, BLOCK_O], dtype=ACC_DTYPE)
    else:
        acc = tl.zeros([BLOCK_O, BLOCK_N], dtype=ACC_DTYPE)
    r_full = R - R % BLOCK_R
    for r0 in range(0, r_full, BLOCK_R):
        acc = _fwd_step(acc, w_rows, x_cols, n_ok, r0, r0 + r_ar, R, stride_wr, i_d0, i_h0, i_w0, bits, tab_ptr,
                        corner, ID, IH, IW, stride_xc, stride_xd, stride_xh, stride_xw, KS, DIL, MODE, False, GATHER_T,
                        ROW_TABLE, ALIGN, N_MAJOR, NARROW, FP64, PRECISION, UPCAST)
    if r_full < R:
        acc = _fwd_step(acc, w_rows, x_cols, n_ok, r_full, r_full + r_ar, R, stride_wr, i_d0, i_h0, i_w0, bits,
                        tab_ptr, corner, ID, IH, IW, stride_xc, stride_xd, stride_xh, stride_xw, KS, DIL, MODE, True,
                        GATHER_T, ROW_TABLE, ALIGN, N_MAJOR, NARROW, FP64, PRECISION, UPCAST)
    # bias and masked store; y is [N, O, L] so a tile is strided by L — partial sectors merge in L2
    if N_MAJOR:
        if HAS_BIAS:
            b = tl.load(b_ptr + o * stride_bo + l * stride_bl, mask=o_ok, other=0)
            acc += cm._widen(b, ACC_DTYPE, UPCAST)[None, :]
        y = y_ptr + n[:, None] * O * L + o[None, :] * L + l
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & o_ok[None, :])
    else:
        if HAS_BIAS:
            b = tl.load(b_ptr + o * stride_bo + l * stride_bl, mask=o_ok, other=0)
            acc += cm._widen(b, ACC_DTYPE, UPCAST)[:, None]
        y = y_ptr + n[None, :] * O * L + o[:, None] * L + l
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=o_ok[:, None] & n_ok[None, :])


@triton.jit
def _grad_weight_step(acc, acc_b, g_ptrs, x_ptrs, n_ok, col_ok, R_MAJOR: tl.constexpr, FP64: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One batch block of the grad-weight loop: ``acc += dY_lᵀ · P_l`` and the bias gradient's elementwise
    ``acc_b += dY_lᵀ``. The C_out rows are clamped in range (never stored), so the loads are masked by the
    block's batch lanes ``n_ok`` (all true, folded, but on the last, partial block) and the patch columns'
    validity ``col_ok``: zeros in both operands, NaN-safe. ``R_MAJOR``: ``accᵀ += P_lᵀ · dY_l`` (the R tile the
    MMA's M)."""
    gt = tl.load(g_ptrs, mask=n_ok[None, :], other=0)
    p = tl.load(x_ptrs, mask=n_ok[:, None] & col_ok[None, :], other=0)
    if R_MAJOR:
        acc = cm._mma(tl.trans(p), tl.trans(gt), acc, FP64, PRECISION, UPCAST)
    else:
        acc = cm._mma(gt, p, acc, FP64, PRECISION, UPCAST)
    acc_b += cm._widen(gt, ACC_DTYPE, UPCAST)
    return acc, acc_b


@triton.jit
def local_conv_grad_weight_kernel(
    # outputs: grad weight [O, R, L] (any strides; the launcher allocates [L, O, R]), grad bias [O, L]
    dw_ptr, db_ptr,
    # inputs: grad [N, O, L], x [N, C, ID, IH, IW], any strides
    g_ptr, x_ptr,
    # runtime sizes
    N, O, R, ID, IH, IW, OH, OW, L,
    stride_gn, stride_go, stride_gl,
    stride_xn, stride_xc, stride_xd, stride_xh, stride_xw,
    stride_dwo, stride_dwr, stride_dwl,
    # geometry
    KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, DIL: tl.constexpr,
    MODE: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    # tiles; NARROW: the in-tile deltas (BLOCK_N - 1)·stride_xn + patch offsets and (BLOCK_N - 1)·stride_gn +
    # (BLOCK_O - 1)·stride_go fit int32 (the launcher proved it)
    BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, NARROW: tl.constexpr,
    # R_MAJOR: the R tile is the MMA's M (dW_lᵀ = P_lᵀ · dY_l), else the C_out tile; ALIGN: a power of two (≤ 16)
    # that divides x's channel and spatial strides
    R_MAJOR: tl.constexpr, ALIGN: tl.constexpr,
):
    """``dW[o, r, l] = Σ_n dY[n, o, l] · P_l[n, r]`` and ``db[o, l] = Σ_n dY[n, o, l]``: one
    (position, C_out tile, R tile) per program, the batch reduced in the loop.

    The patch columns' offsets and validity are computed once per program; the batch loop advances two
    scalar int64 bases by ``BLOCK_N`` sample strides over loop-invariant in-tile offsets (int32 when
    ``NARROW``); the C_out rows are clamped in range (never stored), so the full batch blocks are masked only
    by the patch validity, the last partial one by the batch too. The launcher hands x batch-last
    (:func:`_common._batch_last`) and dY batch-contiguous, so both tiles are ``BLOCK_N`` contiguous samples per
    row: 16-byte ``cp.async``. The C_out tile is the MMA's M, or (``R_MAJOR``, a C_out tile below 64) the R tile:
    ``wgmma`` either way.

    Roofline: FLOPs = 2·N·O·R·L; bytes ≥ (O·R·L [dW written] + N·O·L [dY] + N·C·∏in [x])·e, plus 2·N·C·∏in·e
    for the batch-last copy of x — the same weight-bandwidth bound as the forward. Stores are contiguous along R
    in the ``[L, O, R]`` layout the launcher allocates.
    """
    # program id -> (position, C_out tile, R tile), R tile fastest (they share the dY tile); the
    # launcher never launches R = 0 (num_r would be 0, a division by zero below)
    pid = tl.program_id(0).to(tl.int64)
    num_o = tl.cdiv(O, BLOCK_O)
    num_r = tl.cdiv(R, BLOCK_R)
    l = pid // (num_o * num_r)
    pid_o = (pid // num_r) % num_o
    pid_r = pid % num_r

    # offsets and masks; the patch columns of this R tile are the same for every batch tile
    o0 = pid_o * BLOCK_O
    o = o0 + tl.arange(0, BLOCK_O)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_ok = o < O
    r_ok = r < R
    off, ok = cm._patch_columns(r, l, ID, IH, IW, OH, OW, stride_xc, stride_xd, stride_xh, stride_xw,
                                KS, ST, LO, DIL, MODE, False)
    col_ok = r_ok & ok
    # a sum of x's channel and spatial strides, each a multiple of ALIGN (stated: triton 3.8 did not prove it, and
    # gathered the patch tile one scalar load per element, static sm_90 report)
    off = tl.multiple_of(tl.where(col_ok, off, 0), ALIGN)
    o_d = tl.minimum(tl.arange(0, BLOCK_O), O - 1 - o0)
    n_in = tl.arange(0, BLOCK_N)
    # the loop-invariant in-tile offsets per row and column: int64, narrowed to int32 when NARROW (the launcher
    # proved they fit)
    g_o = o_d * stride_go
    g_n = n_in.to(tl.int64) * stride_gn
    x_n = n_in.to(tl.int64) * stride_xn
    if NARROW:
        g_o = g_o.to(tl.int32)
        g_n = g_n.to(tl.int32)
        x_n = x_n.to(tl.int32)
        off = off.to(tl.int32)
    g_off = g_o[:, None] + g_n[None, :]
    x_off = x_n[:, None] + off[None, :]
    gb = g_ptr + l * stride_gl + o0 * stride_go
    xb = x_ptr
    step_g = tl.full([], BLOCK_N, tl.int64) * stride_gn
    step_x = tl.full([], BLOCK_N, tl.int64) * stride_xn
    n_full = N - N % BLOCK_N

    # loop over the batch, fp32 (fp64) accumulation
    if R_MAJOR:
        acc = tl.zeros([BLOCK_R, BLOCK_O], dtype=ACC_DTYPE)
    else:
        acc = tl.zeros([BLOCK_O, BLOCK_R], dtype=ACC_DTYPE)
    # the bias gradient elementwise per (C_out, sample) slot, reduced once after the loop (one cross-thread
    # reduction, not one per batch step)
    acc_b = tl.zeros([BLOCK_O, BLOCK_N], dtype=ACC_DTYPE)
    for _ in range(0, n_full, BLOCK_N):
        acc, acc_b = _grad_weight_step(acc, acc_b, gb + g_off, xb + x_off, n_in < BLOCK_N, col_ok, R_MAJOR,
                                       FP64, PRECISION, UPCAST, ACC_DTYPE)
        gb += step_g
        xb += step_x
    if n_full < N:
        acc, acc_b = _grad_weight_step(acc, acc_b, gb + g_off, xb + x_off, n_in < N - n_full, col_ok, R_MAJOR,
                                       FP64, PRECISION, UPCAST, ACC_DTYPE)
    db = tl.sum(acc_b, axis=1)

    # masked stores; the bias gradient once per (position, C_out tile). A branch, not a scalar in the
    # mask: newer interpreters (triton >= 3.9) reject a mask that broadcasts a scalar bool
    if R_MAJOR:
        dw = dw_ptr + l * stride_dwl + o[None, :] * stride_dwo + r[:, None] * stride_dwr
        tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=r_ok[:, None] & o_ok[None, :])
    else:
        dw = dw_ptr + l * stride_dwl + o[:, None] * stride_dwo + r[None, :] * stride_dwr
        tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=o_ok[:, None] & r_ok[None, :])
    if pid_r == 0:
        tl.store(db_ptr + o * L + l, db.to(db_ptr.dtype.element_ty), mask=o_ok)


@triton.jit
def _tap_position(i, j, k, n, O, lo, hi, S: tl.constexpr, D: tl.constexpr, MODE: tl.constexpr):
    """Along one dim: the output position whose tap ``k`` reads input index ``i`` through its
    ``j``-th padded candidate (see ``_padded_candidate``), and whether that pair exists."""
    p, cand = cm._padded_candidate(i, j, n, lo, hi, MODE)
    l, ok = cm._block_index(p, lo, k, O, S, D)
    return l, cand & ok


@triton.jit
def _grad_input_step(acc, gb, wb, g_off, w_off, o_ar, o_left, stride_go, stride_wo,
                     C_MAJOR: tl.constexpr, NARROW: tl.constexpr,
                     FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One C_out block of one (position, tap): ``acc += W_lᵀ[c, o] · dY_lᵀ[o, n]`` (``C_MAJOR``) or
    ``dY_l[n, o] · W_l[o, c]``, from the scalar bases ``gb`` / ``wb`` and the loop-invariant batch / channel
    offsets. The batch and channel indices are clamped in range (their rows are never stored), so only the
    last, partial C_out block (``MASK_O``) is masked: zeros in both operands, NaN-safe."""
    go = o_ar.to(tl.int64) * stride_go
    wo = o_ar.to(tl.int64) * stride_wo
    if NARROW:
        go = go.to(tl.int32)
        wo = wo.to(tl.int32)
    o_ok = o_ar < o_left
    if C_MAJOR:
        w = tl.load(wb + w_off[:, None] + wo[None, :], mask=o_ok[None, :], other=0)
        g = tl.load(gb + go[:, None] + g_off[None, :], mask=o_ok[:, None], other=0)
        acc = cm._mma(w, g, acc, FP64, PRECISION, UPCAST)
    else:
        g = tl.load(gb + g_off[:, None] + go[None, :], mask=o_ok[None, :], other=0)
        w = tl.load(wb + wo[:, None] + w_off[None, :], mask=o_ok[:, None], other=0)
        acc = cm._mma(g, w, acc, FP64, PRECISION, UPCAST)
    return acc


@triton.jit
def local_conv_grad_input_kernel(
    # output: grad input [N, C, ID, IH, IW], contiguous
    dx_ptr,
    # inputs: grad [N, O, L], weight [O, C·∏KS, L], any strides
    g_ptr, w_ptr,
    # runtime sizes: P = ID*IH*IW input pixels
    N, C, O, ID, IH, IW, OD, OH, OW, P,
    stride_gn, stride_go, stride_gl,
    stride_wo, stride_wr, stride_wl,
    # geometry (per-dim (d, h, w) tuples, see _common): LO the low paddings, HI the high ones
    KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, DIL: tl.constexpr,
    MODE: tl.constexpr,
    # padded positions that can read one input index, per dim (1 for 'zeros')
    NC: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    # tiles; C_MAJOR: the C_in tile is the MMA's M (dxᵀ = W_lᵀ · dY_lᵀ), else the batch tile; NARROW: the
    # in-tile deltas (BLOCK - 1)·stride fit int32 (the launcher proved it)
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
    C_MAJOR: tl.constexpr, NARROW: tl.constexpr,
):
    """``dx[n, c, i] = Σ_{(l, k): tap k of position l reads i} Σ_o dY[n, o, l] · W[o, (c, k), l]``:
    one (input pixel, C_in tile, batch tile) per program. A gather, like fold: each output element
    is written once, deterministically.

    The (padded candidate, tap) pairs that read the pixel are found with scalar math per pair, one dim at a
    time; per pair the C_out loop is a plain GEMM step from two scalar base pointers (int64) that advance by
    ``BLOCK_O`` strides and loop-invariant batch / channel offsets (int32 when ``NARROW``): no index math, no
    bounds test per element but on the last partial C_out block. The larger of the C_in and batch tiles is
    the MMA's M (``C_MAJOR``: ``dxᵀ = W_lᵀ · dY_lᵀ``), so 64 rows per warpgroup make it ``wgmma`` for a
    batch of 32. The launcher hands dY with C_out contiguous (one copy of dY, small beside W, unless it
    already is): its tile is 16-byte loads / ``cp.async``. The weight tile of one tap is strided by ∏K along
    C_in and by R along C_out: one scalar load per element (a layout with C_in or C_out contiguous per
    (position, tap) would take a copy of the whole weight, the op's largest tensor) — with the batch of 32 as
    the MMA's N that gather caps the loop at about half the tensor-core peak.

    Roofline: FLOPs = 2·N·O·C·K·L (K = ∏kernel_size), as the forward; bytes ≥ (O·R·L [weight]
    + N·O·L [dY] + N·C·∏in [dx])·e. A position's weight slab is read by the ≤ K pixels its taps
    cover, which run close together, so L2 serves the re-reads.
    """
    # program id -> (input pixel, C_in tile, batch tile), batch tile fastest
    pid = tl.program_id(0).to(tl.int64)
    num_n = tl.cdiv(N, BLOCK_N)
    num_c = tl.cdiv(C, BLOCK_C)
    pix = pid // (num_n * num_c)
    pid_c = (pid // num_n) % num_c
    pid_n = pid % num_n

    # offsets and masks: the tile's first batch row / channel in the scalar bases (int64), the in-tile
    # deltas of the rows clamped in range (int32 when NARROW)
    n0 = pid_n * BLOCK_N
    c0 = pid_c * BLOCK_C
    n_in = tl.arange(0, BLOCK_N)
    c_in = tl.arange(0, BLOCK_C)
    n_d = tl.minimum(n_in, N - 1 - n0)
    c_d = tl.minimum(c_in, C - 1 - c0)
    o_ar = tl.arange(0, BLOCK_O)
    # the loop-invariant in-tile offsets: int64, narrowed to int32 when NARROW (the launcher proved they fit)
    g_off = n_d * stride_gn
    w_off = c_d * cm._taps(KS) * stride_wr
    if NARROW:
        g_off = g_off.to(tl.int32)
        w_off = w_off.to(tl.int32)
    g_tile = g_ptr + n0 * stride_gn
    w_tile = w_ptr + c0 * cm._taps(KS) * stride_wr
    step_g = tl.full([], BLOCK_O, tl.int64) * stride_go
    step_w = tl.full([], BLOCK_O, tl.int64) * stride_wo
    o_full = O - O % BLOCK_O
    iw = pix % IW
    ih = (pix // IW) % IH
    i_d = pix // IW // IH  # not pix // (IW * IH): an int32 product of two sizes

    # loop over every (padded position, tap) pair that reads this pixel, then over C_out
    if C_MAJOR:
        acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC_DTYPE)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC_DTYPE)
    # (candidate, tap) pairs are checked one dim at a time, so only the pairs that exist go deeper
    for jd in range(NC[0]):
        for kd in range(KS[0]):
            ld, ok_d = _tap_position(i_d, jd, kd, ID, OD, LO[0], HI[0], ST[0], DIL[0], MODE)
            if ok_d:
                for jh in range(NC[1]):
                    for kh in range(KS[1]):
                        lh, ok_h = _tap_position(ih, jh, kh, IH, OH, LO[1], HI[1], ST[1], DIL[1], MODE)
                        if ok_h:
                            for jw in range(NC[2]):
                                for kw in range(KS[2]):
                                    lw, ok_w = _tap_position(iw, jw, kw, IW, OW, LO[2], HI[2], ST[2], DIL[2], MODE)
                                    if ok_w:
                                        l = (ld * OH + lh) * OW + lw
                                        # loop indices are int32: int64 before any stride multiply
                                        tap = tl.cast((kd * KS[1] + kh) * KS[2] + kw, tl.int64)
                                        gb = g_tile + l * stride_gl
                                        wb = w_tile + l * stride_wl + tap * stride_wr
                                        for _ in range(0, o_full, BLOCK_O):
                                            acc = _grad_input_step(acc, gb, wb, g_off, w_off, o_ar, BLOCK_O,
                                                                   stride_go, stride_wo, C_MAJOR, NARROW,
                                                                   FP64, PRECISION, UPCAST)
                                            gb += step_g
                                            wb += step_w
                                        if o_full < O:
                                            acc = _grad_input_step(acc, gb, wb, g_off, w_off, o_ar, O - o_full,
                                                                   stride_go, stride_wo, C_MAJOR, NARROW,
                                                                   FP64, PRECISION, UPCAST)

    # masked store
    n = n0 + n_in
    c = c0 + c_in
    if C_MAJOR:
        dx = dx_ptr + n[None, :] * C * P + c[:, None] * P + pix
        tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=(c < C)[:, None] & (n < N)[None, :])
    else:
        dx = dx_ptr + n[:, None] * C * P + c[None, :] * P + pix
        tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=(n < N)[:, None] & (c < C)[None, :])


# ----------------------------------------------------------------------------------------------
# tuning problems (the configs: _local_conv_configs)
def _tensors(layer, dtype, device):
    """x, the weight in the module's layout, a per-pixel bias and dY for one grid layer."""
    g, o = layer.resolved(), layer.out_channels
    r, l = layer.c * g.kernel_numel, g.num_blocks
    x = torch.randn(layer.n, layer.c, *layer.size, device=device, dtype=dtype)
    w = (torch.randn(l, o, r, device=device, dtype=dtype) / math.sqrt(r)).permute(1, 2, 0)
    b = torch.randn(o, l, device=device, dtype=dtype)
    gy = torch.randn(layer.n, o, *g.out_size, device=device, dtype=dtype)
    return x, w, b, gy


def _fwd_problem(layer, dtype, device) -> TuneProblem:
    geom = layer.geometry()

    def setup():
        x, w, b, _ = _tensors(layer, dtype, device)
        return (lambda cfg: local_conv(x, w, b, *geom, config=cfg)), (lambda: reference.local_conv(x, w, b, *geom))

    dims = {"N": layer.n, "O": layer.out_channels, "R": layer.c * layer.kernel_numel}
    return TuneProblem(dims, setup)


def _grad_weight_problem(layer, dtype, device) -> TuneProblem:
    geom = layer.geometry()

    def setup():
        x, _, _, gy = _tensors(layer, dtype, device)
        return (lambda cfg: local_conv_grad_weight(gy, x, *geom, config=cfg),
                lambda: reference.local_conv_grad_weight(gy, x, *geom))

    dims = {"O": layer.out_channels, "R": layer.c * layer.kernel_numel, "N": layer.n}
    return TuneProblem(dims, setup)


def _grad_input_problem(layer, dtype, device) -> TuneProblem:
    geom = layer.geometry()

    def setup():
        _, w, _, gy = _tensors(layer, dtype, device)
        size = list(layer.size)
        return (lambda cfg: local_conv_grad_input(gy, w, size, *geom, config=cfg),
                lambda: reference.local_conv_grad_input(gy, w, size, *geom))

    return TuneProblem({"N": layer.n, "C": layer.c, "O": layer.out_channels}, setup)


FWD_SPEC = autotune.register(KernelSpec(
    "local_conv_fwd", local_conv_fwd_kernel, ("N", "O", "R"), _fwd_default,
    _gemm_candidates("BLOCK_N", "BLOCK_O", "BLOCK_R"), _fwd_problem,
    _gemm_space("BLOCK_N", "BLOCK_O", "BLOCK_R")))
GRAD_WEIGHT_SPEC = autotune.register(KernelSpec(
    "local_conv_grad_weight", local_conv_grad_weight_kernel, ("O", "R", "N"), _grad_weight_default,
    _gemm_candidates("BLOCK_O", "BLOCK_R", "BLOCK_N"), _grad_weight_problem,
    _gemm_space("BLOCK_O", "BLOCK_R", "BLOCK_N")))
GRAD_INPUT_SPEC = autotune.register(KernelSpec(
    "local_conv_grad_input", local_conv_grad_input_kernel, ("N", "C", "O"), _grad_input_default,
    _gemm_candidates("BLOCK_N", "BLOCK_C", "BLOCK_O"), _grad_input_problem,
    _gemm_space("BLOCK_N", "BLOCK_C", "BLOCK_O")))


# ----------------------------------------------------------------------------------------------
# launchers
# The forward's patch tile: which gather layout keeps its per-row index math in few registers differs by Triton
# version (static sm_90 report, fp16 local_2d: triton 3.6 gathers [BLOCK_R, BLOCK_N] in 247 loop instructions and
# [BLOCK_N, BLOCK_R] + transpose in 1,258; triton 3.8 the other way round, 1,207 and 241): the coalescing pass's tie
_GATHER_T = cm._TIES_TO_LAST_DIM


# the row table's padding: its length is a multiple of the largest BLOCK_R, so no R block reads past it
_TABLE_BLOCK = 128


def _table_reach(R: int, ks: tuple, dil: tuple, strides: tuple) -> int:
    """The largest offset from the window corner that a row of :func:`_build_row_table` holds (its channels' and
    taps' strides; the table is used only where this is below 2^31, so its low word never spills into the tap's)."""
    return (-(-R // math.prod(ks)) - 1) * strides[0] + sum((k - 1) * d * s for k, d, s in zip(ks, dil, strides[1:]))


def _build_row_table(R: int, ks: tuple, dil: tuple, strides: tuple, device: torch.device) -> torch.Tensor:
    """The forward's row table for patch rows ``r = (c, kd, kh, kw)`` (unfold's order) of a kernel ``ks`` with
    dilation ``dil`` over x's channel and spatial ``strides``: int64 ``[cdiv(R, 128)·128]`` on ``device`` (built
    there: no host-to-device copy, which a CUDA graph capture would reject), row ``r`` holding its tap ``k`` in the
    high word and its offset from the window corner ``c·s_c + kd·D·s_d + kh·D·s_h + kw·D·s_w`` in the low one (below
    2^31: :func:`_table_reach`, checked by the launcher). Rows past ``R`` hold tap 31, whose validity bit is never
    set: they read nothing."""
    taps = math.prod(ks)
    rows = torch.arange(-(-R // _TABLE_BLOCK) * _TABLE_BLOCK, dtype=torch.int64, device=device)
    k, c = rows % taps, rows // taps
    kd, kh, kw = k // (ks[1] * ks[2]), k // ks[2] % ks[1], k % ks[2]
    off = c * strides[0] + kd * (dil[0] * strides[1]) + kh * (dil[1] * strides[2]) + kw * (dil[2] * strides[3])
    past = rows >= R
    return (torch.where(past, 31, k) << 32) | torch.where(past, 0, off)


_cached_row_table = functools.lru_cache(maxsize=64)(_build_row_table)


def _row_table(R: int, ks: tuple, dil: tuple, strides: tuple, device: torch.device) -> torch.Tensor:
    """:func:`_build_row_table`, cached per geometry and device; built afresh while a CUDA graph is captured (a
    cached table made there would hold what the capture never ran, and the graph would read a cached table after
    its eviction). On CUDA the table is marked in use by the current stream, so an eviction while a kernel on another
    stream still reads it cannot hand its memory to new work first."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _build_row_table(R, ks, dil, strides, device)
    tab = _cached_row_table(R, tuple(ks), tuple(dil), tuple(strides), device)
    if device.type == "cuda":
        tab.record_stream(torch.cuda.current_stream(device))
    return tab


def local_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel_size: list[int],
               dilation: list[int], padding: list[int], stride: list[int], padding_mode: str = "zeros",
               config: Config | None = None) -> torch.Tensor:
    """Locally connected conv of ``x`` ``[N, C_in, *spatial]`` with ``weight`` ``[C_out, C_in·∏K, L]``
    and ``bias`` ``[C_out, L]`` / ``[C_out]`` / None → ``[N, C_out, *out]`` (contiguous), one launch.

    ``config`` overrides the autotune lookup (tests use it to run partial tiles).

    Raises:
        ValueError / TypeError: bad arguments (see :func:`convzoo._shapes.local_conv_geometry`), a device
            the kernels cannot run on, or ``'replicate'`` padding of an empty dim.
    """
    # (1) check
    g = _shapes.local_conv_geometry(x, weight, bias, kernel_size, dilation, padding, stride, padding_mode)
    cm._check_device(x)
    # (2) allocate; empty dims need no launch: an empty result (N, C_out = 0), or C_in = 0, where every
    # dot product is an empty sum and y is the bias (zeros without one). L >= 1 always.
    y = x.new_empty(_shapes.local_conv_out_shape(x, weight, g))
    if y.numel() == 0:
        return y
    n = x.shape[0]
    o, r, l = weight.shape
    if r == 0:
        y.zero_()
        if bias is not None:
            y.view(n, o, l).add_(bias if bias.dim() == 2 else bias[:, None])
        return y
    buf = cm._launch_buffer(y, local_conv_fwd_kernel)
    # (3) look up config and launch
    a = cm._as_3d(g)
    cfg = config or autotune.lookup("local_conv_fwd", x.device, x.dtype, N=n, O=o, R=r)
    # batch-last x (one copy unless it is, or the batch is below 16 bytes): a patch row is contiguous samples
    xs = cm._batch_last(cm._as_5d(x, g.ndim))
    if bias is None:
        b, b_strides = weight, (0, 0)  # never read
    else:
        b = bias if bias.dim() == 2 else bias[:, None].expand(o, l)
        b_strides = b.stride()
    m = cfg.meta
    grid = (l * triton.cdiv(n, m["BLOCK_N"]) * triton.cdiv(o, m["BLOCK_O"]),)
    # int32 rows and in-sample math: R, L, x's index values and a sample's farthest element, and the weight tile's
    # row offsets r·stride_wr (the C_out and position offsets stay int64)
    narrow = (max(r + m["BLOCK_R"], l, (r + m["BLOCK_R"]) * weight.stride(1)) < 2**31
              and cm._index_fits(xs, a, 1))
    # the row table for 'zeros' with ≤ 31 taps (their validity bits), but fp64 (a broadcast-sum, no tensor cores):
    # with the table triton 3.8 spilled its forward (4 bytes, static sm_90 report)
    table = (narrow and g.padding_mode == "zeros" and g.kernel_numel <= 31 and m["BLOCK_R"] <= _TABLE_BLOCK
             and x.dtype != torch.float64 and _table_reach(r, a["k"], a["d"], xs.stride()[1:]) < 2**31)
    tab = _row_table(r, a["k"], a["d"], xs.stride()[1:], x.device) if table else weight
    with cm._device(x):
        local_conv_fwd_kernel[grid](
            buf, xs, weight, b, tab,
            n, o, r, *a["in"], a["out"][1], a["out"][2], l,
            *xs.stride(), *weight.stride(), *b_strides,
            a["k"], a["s"], a["lo"], a["d"],
            _shapes.PADDING_MODE_CODES[g.padding_mode],
            bias is not None, **cm._math_args(x.dtype, local_conv_fwd_kernel),
            GATHER_T=_GATHER_T and xs.stride(0) != 1, NARROW=narrow, ROW_TABLE=table,
            ALIGN=math.gcd(16, *xs.stride()[1:]), N_MAJOR=_n_major(m),
            **cfg.launch_kwargs(),
        )
    return cm._finish(y, buf)


def local_conv_grad_weight(grad: torch.Tensor, x: torch.Tensor, kernel_size: list[int], dilation: list[int],
                           padding: list[int], stride: list[int], padding_mode: str = "zeros",
                           config: Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and per-pixel bias gradients of :func:`local_conv` for ``grad`` ``[N, C_out, *out]``.

    Returns ``(dW, db)``: ``dW`` ``[C_out, C_in·∏K, L]`` as the ``permute(1, 2, 0)`` view of a
    contiguous ``[L, C_out, C_in·∏K]`` tensor (the fast layout), ``db`` ``[C_out, L]``.

    Raises:
        ValueError / TypeError: bad arguments (see :func:`convzoo._shapes.local_conv_grad_weight_geometry`),
            a device the kernels cannot run on, or ``'replicate'`` padding of an empty dim.
    """
    # (1) check
    g = _shapes.local_conv_grad_weight_geometry(grad, x, kernel_size, dilation, padding, stride, padding_mode)
    cm._check_device(x)
    # (2) allocate
    w_shape, b_shape = _shapes.local_conv_grad_weight_shapes(grad, x, g)
    dw = x.new_empty(w_shape).permute(1, 2, 0)
    db = x.new_empty(b_shape)
    if dw.numel() == 0 and db.numel() == 0:  # C_out = 0
        return dw, db
    n = x.shape[0]
    o, r, l = dw.shape
    if n == 0 or r == 0:
        # sums over an empty batch are zero; with C_in = 0, dW is empty and db = Σ_n dY still (the
        # kernel's grid has no R tile then). Summed in the kernels' accumulator dtype, rounded once.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        dw.zero_()
        db.copy_(grad.reshape(n, o, l).sum(0, dtype=acc))
        return dw, db
    dw_buf = cm._launch_buffer(dw, local_conv_grad_weight_kernel)
    db_buf = cm._launch_buffer(db, local_conv_grad_weight_kernel)
    # (3) look up config and launch
    a = cm._as_3d(g)
    cfg = config or autotune.lookup("local_conv_grad_weight", x.device, x.dtype, O=o, R=r, N=n)
    # batch-last x (one copy unless it is, or the batch is below 16 bytes): the patch tile's samples are contiguous
    xs = cm._batch_last(cm._as_5d(x, g.ndim))
    g3 = grad.reshape(n, o, l)
    if g3.stride(0) != 1 and n > 1:
        # one copy of dY with the batch contiguous, position-major ([L, C_out, N]): 16-byte loads of its tile
        g3 = g3.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    m = cfg.meta
    grid = (l * triton.cdiv(o, m["BLOCK_O"]) * triton.cdiv(r, m["BLOCK_R"]),)
    sgn, sgo, _ = g3.stride()
    # the largest in-tile patch offset: every dim's (size - 1)·stride
    span = sum((sz - 1) * st for sz, st in zip(xs.shape[1:], xs.stride()[1:]))
    narrow = max((m["BLOCK_N"] - 1) * sgn + (m["BLOCK_O"] - 1) * sgo,
                 (m["BLOCK_N"] - 1) * xs.stride(0) + span) < 2**31
    with cm._device(x):
        local_conv_grad_weight_kernel[grid](
            dw_buf, db_buf, g3, xs,
            n, o, r, *a["in"], a["out"][1], a["out"][2], l,
            *g3.stride(), *xs.stride(), *dw_buf.stride(),
            a["k"], a["s"], a["lo"], a["d"],
            _shapes.PADDING_MODE_CODES[g.padding_mode],
            **cm._math_args(x.dtype, local_conv_grad_weight_kernel), NARROW=narrow, R_MAJOR=_r_major(m),
            ALIGN=math.gcd(16, *xs.stride()[1:]),
            **cfg.launch_kwargs(),
        )
    return cm._finish(dw, dw_buf), cm._finish(db, db_buf)


def local_conv_grad_input(grad: torch.Tensor, weight: torch.Tensor, input_size: list[int], kernel_size: list[int],
                          dilation: list[int], padding: list[int], stride: list[int], padding_mode: str = "zeros",
                          config: Config | None = None) -> torch.Tensor:
    """Input gradient of :func:`local_conv` for ``grad`` ``[N, C_out, *out]`` → ``[N, C_in, *input_size]``
    (contiguous), one launch, no atomics.

    Raises:
        ValueError / TypeError: bad arguments (see :func:`convzoo._shapes.local_conv_grad_input_geometry`)
            or a device the kernels cannot run on.
    """
    # (1) check
    g = _shapes.local_conv_grad_input_geometry(grad, weight, input_size, kernel_size, dilation, padding, stride,
                                               padding_mode)
    cm._check_device(grad)
    # (2) allocate; nothing to launch for an empty result (N, C_in or an input dim = 0), and with
    # C_out = 0 every input pixel's gradient is an empty sum
    n, o, c = grad.shape[0], weight.shape[0], weight.shape[1] // g.kernel_numel
    dx = grad.new_empty((n, c, *input_size))
    if dx.numel() == 0:
        return dx
    if o == 0:
        return dx.zero_()
    buf = cm._launch_buffer(dx, local_conv_grad_input_kernel)
    # (3) look up config and launch
    a = cm._as_3d(g)
    cfg = config or autotune.lookup("local_conv_grad_input", grad.device, grad.dtype, N=n, C=c, O=o)
    g3 = grad.reshape(n, o, g.num_blocks)
    if g3.stride(1) != 1 and o > 1:
        # one copy of dY with C_out contiguous, position-major ([L, N, C_out]): its tile of one (position, tap)
        # is then BLOCK_O contiguous elements per sample (16-byte loads, cp.async); dY is small beside W
        g3 = g3.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    m = cfg.meta
    P = math.prod(g.in_size)
    grid = (P * triton.cdiv(n, m["BLOCK_N"]) * triton.cdiv(c, m["BLOCK_C"]),)
    sgn, sgo, _ = g3.stride()
    swo, swr, _ = weight.stride()
    # the in-tile deltas the kernel adds to its int64 bases: int32 when they provably fit
    narrow = max((m["BLOCK_N"] - 1) * sgn + (m["BLOCK_O"] - 1) * sgo,
                 (m["BLOCK_C"] - 1) * g.kernel_numel * swr + (m["BLOCK_O"] - 1) * swo) < 2**31
    with cm._device(grad):
        local_conv_grad_input_kernel[grid](
            buf, g3, weight,
            n, c, o, *a["in"], *a["out"], P,
            *g3.stride(), *weight.stride(),
            a["k"], a["s"], a["lo"], a["hi"], a["d"],
            _shapes.PADDING_MODE_CODES[g.padding_mode],
            cm._num_candidates(g, 3 - g.ndim),
            **cm._math_args(grad.dtype, local_conv_grad_input_kernel),
            C_MAJOR=_c_major(m), NARROW=narrow,
            **cfg.launch_kwargs(),
        )
    return cm._finish(dx, buf)
