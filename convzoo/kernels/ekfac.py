"""ekfac_eigenvalues (EKFAC's eigenvalue correction, George et al. 2018) for 1-, 2- and 3-d convolutions and
transposed convolutions (a Linear layer is a 1-d convolution with kernel 1 over its positions): Triton kernel
and launcher.

For each channel group ``g`` the statistic is ``s[g, i, j] = coef·Σ_n (Q_Gᵀ dW_n Q_A)²_{ij}`` with
``dW_n = Σ_l g_{n,l} p_{n,l}ᵀ`` (``p``: the patch column, plus a constant-1 bias row). Its rotated per-sample
gradient is ``Ĝ_n Â_nᵀ`` with ``Ĝ_n = Q_Gᵀ G_n`` (``[C_out/G, L]``) and ``Â_n = Q_Aᵀ P_n`` (``[DP, L]``), so
no per-sample gradient is formed in either basis: the launcher projects the output gradients once (one
batched matmul, the size of ``grad_output``), and the kernel, per ``BLOCK_J × BLOCK_O`` tile of ``sᵀ``, loops
over its samples; per sample over the positions in ``BLOCK_L`` steps; per step it projects the gathered
patch tile into the eigenbasis (``Â`` tile ``= Σ_d Q_A[d, j]·P[d, l]``, a ``tl.dot`` over ``DP`` in
``BLOCK_K`` steps; the patches are gathered from ``x`` with the unfold index math, never written) and
contracts it with the projected gradients (a second ``tl.dot``), then squares the sample's tile and adds it
to the accumulator. A split over the samples (``SPLIT`` programs per tile, each writing a partial into a
workspace the launcher sums) fills the GPU when ``s`` has few tiles; no atomics: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from convzoo import autotune, reference
from convzoo.autotune import Config, ConfigSpace, KernelSpec, TuneProblem
from convzoo.kernels import _common as cm

__all__ = ["ekfac_eigenvalues"]


@triton.jit
def _contract(ahat, h, acc, FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + ahat @ h``: ``ahat`` the fp32 (fp64) projected patch tile, ``h`` the projected gradients in the
    operand dtype. 16-bit operands: ``ahat`` is rounded to ``h``'s dtype for the tensor cores (as flash
    attention feeds P); under the interpreter (``UPCAST``, bf16) ``h`` is widened instead (see ``_mma``)."""
    if FP64:
        acc += tl.sum(ahat[:, :, None] * h[None, :, :], axis=1)
    elif UPCAST:
        acc = tl.dot(ahat, cm._widen(h, tl.float32, UPCAST), acc, input_precision="ieee")
    else:
        acc = tl.dot(ahat.to(h.dtype), h, acc, input_precision=PRECISION)
    return acc


@triton.jit
def ekfac_kernel(
    # output: [SPLIT or 1, G, CO, DP] (a workspace when SPLIT > 1), any strides
    out_ptr,
    # inputs: x [N, C, ID, IH, IW]; Q_A [G, DP, DP]; the projected output gradients Ĝ [N, G·CO, L]; any strides
    x_ptr, qa_ptr, gh_ptr,
    # runtime sizes: CG input channels and CO output channels per group, L positions, N samples, D patch rows
    # (DP = D + bias), TJ tiles along DP; the patch rows walked as TQ = K·TC (tap, channel block) pairs (TC
    # blocks of BLOCK_C channels per tap) in TD steps of BLOCK_K rows; LH ≥ L the projected gradients' positions
    # (the launcher's padding, see _padded_positions)
    CG, CO, ID, IH, IW, OH, OW, L, N, D, DP, TJ, TC, TQ, TD, LH,
    stride_xn, stride_xc, stride_xd, stride_xh, stride_xw,
    stride_qg, stride_qd, stride_qj,
    stride_hn, stride_hc, stride_hl,
    stride_os, stride_og, stride_oi, stride_oj,
    # out = coef·s
    coef,
    # geometry
    KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, DIL: tl.constexpr,
    MODE: tl.constexpr, TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    # tiles: BLOCK_K patch rows per projection step, BLOCK_K / BLOCK_C taps of BLOCK_C channels each (BLOCK_C:
    # the launcher's, from the group's channels)
    BLOCK_J: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_C: tl.constexpr,
    # WINDOW: 'zeros', ≤ 31 taps, not transposed (the launcher's): the window walk; FULL_C: BLOCK_C divides CG
    WINDOW: tl.constexpr = False, FULL_C: tl.constexpr = False,
):
    """One tile ``(tj, ti)`` of group ``g``'s ``sᵀ`` (``BLOCK_J`` eigen-columns of A × ``BLOCK_O`` of G) over the
    ``SPLIT``-th share of the samples: ``Σ_n (Σ_l Â_n[j, l]·Ĝ_n[i, l])²``, stored at ``out[s, g, i, j]``.

    Roofline: per sample and tile, 2·BLOCK_J·DP·L FLOPs to project the patches and 2·BLOCK_J·BLOCK_O·L to
    contract; over the whole statistic 2·G·N·L·DP·(DP·⌈CO/BLOCK_O⌉ + CO): the projection is recomputed for
    each of the ⌈CO/BLOCK_O⌉ row tiles (one for CO ≤ BLOCK_O). Both products are tensor-core ``tl.dot``s with
    M = BLOCK_J; x is gathered once per (tile, sample) from L2 and the result written once.

    The patch rows are walked as patch_covariance walks them: (tap, channel block) pairs, ``BLOCK_K / BLOCK_C``
    per projection step, each ``BLOCK_C`` channels of one tap (contiguous in channels-last x, what the launcher
    passes: vector loads), its offsets and padding test one vector per (tap, position), not a div/mod and
    bounds test per element; Q_A comes with its rows in the walk's order (see :func:`_walk_rows`). With 'zeros'
    and ≤ 31 taps (``WINDOW``) the positions' window corners and tap bits are computed once per position step
    and a projection step adds its tap's offset: no position decode in the innermost loop. The bias row (the
    constant 1) is a rank-1 update of the projected tile after the walk.
    """
    # program id -> (tile, group, split)
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)
    tj = pid % TJ
    ti = pid // TJ
    rj = (tj * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)
    ro = (ti * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    x_g = x_ptr + g * CG * stride_xc
    q_g = qa_ptr + g * stride_qg
    h_g = gh_ptr + g * CO * stride_hc
    # the share's samples (N ≥ 1: the launcher returns before an empty reduction)
    per = (N - 1) // SPLIT + 1
    n0 = s * per
    n1 = tl.minimum(n0 + per, N)
    l_steps = (L - 1) // BLOCK_L + 1
    j_ok = (rj < DP)[:, None]
    o_ok = (ro < CO)[None, :]

    total = tl.zeros([BLOCK_J, BLOCK_O], dtype=ACC_DTYPE)
    for step in range(0, n1 - n0):
        n = n0 + step  # int64, as n0
        # sample n's rotated gradient tile, transposed: Σ_l Â[j, l]·Ĝ[i, l]
        acc = tl.zeros([BLOCK_J, BLOCK_O], dtype=ACC_DTYPE)
        for ls in range(0, l_steps):
            # the step's positions (int32: the launcher checks L < 2^31)
            l32 = ls * BLOCK_L + tl.arange(0, BLOCK_L)
            l = l32.to(tl.int64)
            l_ok = (l32 < L)[None, :]
            # Â tile [BLOCK_J, BLOCK_L] = Q_A[:, j]ᵀ P[:, l], fp32 (fp64) accumulation, over the (tap, channel
            # block) pairs
            ahat = tl.zeros([BLOCK_J, BLOCK_L], dtype=ACC_DTYPE)
            x_n = x_g + n * stride_xn
            if WINDOW:
                # 'zeros' with ≤ 31 taps: the positions' window corners and a validity bit per tap, once per
                # position step; a projection step then adds its tap's offset and tests its bit
                i_d0, i_h0, i_w0, bits = cm._window(l32, OH, OW, ID, IH, IW, KS, ST, LO, DIL, MODE)
                corner = (i_d0.to(tl.int64) * stride_xd + i_h0.to(tl.int64) * stride_xh
                          + i_w0.to(tl.int64) * stride_xw)
            # the one-tap walk's (tap, channel block), advanced per step (no division by TC in the loop)
            k_w = 0
            cb_w = 0
            for ds in range(0, TD):
                if WINDOW and BLOCK_K == BLOCK_C:
                    # one tap per step: a scalar tap offset, the channels contiguous (channels-last x); with every
                    # channel block full (FULL_C) the mask is constant along them, so the tile is 16-byte loads
                    k = k_w
                    c = tl.cast(cb_w * BLOCK_K + tl.arange(0, BLOCK_K), tl.int64)
                    cb_w += 1
                    k_w = tl.where(cb_w == TC, k_w + 1, k_w)
                    cb_w = tl.where(cb_w == TC, 0, cb_w)
                    c_ok = c < CG
                    kd, kh, kw = cm._tap_coords(k, KS[1], KS[2])
                    tap = (tl.cast(kd * DIL[0], tl.int64) * stride_xd + tl.cast(kh * DIL[1], tl.int64) * stride_xh
                           + tl.cast(kw * DIL[2], tl.int64) * stride_xw)
                    p_ok = (((bits >> k) & 1) != 0)[None, :] & l_ok
                    if not FULL_C:
                        p_ok = p_ok & c_ok[:, None]
                    p = tl.load(x_n + tap + c[:, None] * stride_xc + corner[None, :], mask=p_ok, other=0)
                    k = tl.cast(k, tl.int64)
                elif WINDOW:
                    # a tap per BLOCK_C rows: per row its tap's offset and bit
                    r = tl.arange(0, BLOCK_K)
                    q_ = ds * (BLOCK_K // BLOCK_C) + r // BLOCK_C
                    c_ok = (q_ < TQ) & ((q_ % TC) * BLOCK_C + r % BLOCK_C < CG)
                    k = tl.where(q_ < TQ, q_ // TC, 0)
                    c = ((q_ % TC) * BLOCK_C + r % BLOCK_C).to(tl.int64)
                    kd, kh, kw = cm._tap_coords(k, KS[1], KS[2])
                    row = (c * stride_xc + (kd * DIL[0]).to(tl.int64) * stride_xd
                           + (kh * DIL[1]).to(tl.int64) * stride_xh + (kw * DIL[2]).to(tl.int64) * stride_xw)
                    p_ok = c_ok[:, None] & (((bits[None, :] >> k[:, None]) & 1) != 0) & l_ok
                    p = tl.load(x_n + row[:, None] + corner[None, :], mask=p_ok, other=0)
                    k = k.to(tl.int64)
                else:
                    # cm._tap_pairs' decode, written out: through the helper ptxas gives the fp32 default 96
                    # registers and 60 B of spills on cifar_conv2 (116 and none this way; static sm_90 report, 3.6)
                    if BLOCK_K == BLOCK_C:  # one tap per step: its offsets and test one vector of positions
                        k = (ds // TC).to(tl.int64)  # int64: _patch_columns' channel part (0 here) times a stride
                        c = ((ds % TC) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
                        c_ok = c < CG
                        k_p = k
                    else:  # a tap per BLOCK_C rows: small channel groups still fill BLOCK_K rows
                        r = tl.arange(0, BLOCK_K)
                        q_ = ds * (BLOCK_K // BLOCK_C) + r // BLOCK_C
                        k = (q_ // TC).to(tl.int64)
                        c = ((q_ % TC) * BLOCK_C + r % BLOCK_C).to(tl.int64)
                        c_ok = (c < CG) & (q_ < TQ)
                        k_p = k[:, None]
                    off, ok = cm._patch_columns(k_p, l[None, :], ID, IH, IW, OH, OW, 0, stride_xd, stride_xh, stride_xw,
                                                KS, ST, LO, DIL, MODE, TRANSPOSED)
                    p = tl.load(x_n + c[:, None] * stride_xc + off, mask=c_ok[:, None] & ok & l_ok, other=0)
                # Q_A's rows in the walk's order (the launcher's _walk_rows: row k·CG + c) and its columns padded to
                # whole BLOCK_J tiles: contiguous along j and masked only by the rows, so 16-byte loads
                q = tl.load(q_g + (k * CG + c)[None, :] * stride_qd + rj[:, None] * stride_qj, mask=c_ok[None, :],
                            other=0)
                ahat = cm._mma(q, p, ahat, FP64, PRECISION, UPCAST)
            if HAS_BIAS:  # the constant-1 row D: Q_A[D, j] at every position
                # tl.cast, not D.to: an int argument equal to 1 reaches the kernel as the constant 1
                qb = tl.load(q_g + tl.cast(D, tl.int64) * stride_qd + rj * stride_qj, mask=rj < DP, other=0)
                ahat += cm._widen(qb, ACC_DTYPE, UPCAST)[:, None] * tl.where(l_ok, 1.0, 0.0).to(ACC_DTYPE)
            # Ĝ's positions padded with zeros to LH, a multiple of 16 where that is cheap (the launcher's): the mask
            # along its contiguous positions is then constant in 16s, so 16-byte loads
            h = tl.load(h_g + n * stride_hn + ro[None, :] * stride_hc + l[:, None] * stride_hl,
                        mask=o_ok & (l < LH)[:, None], other=0)
            acc = _contract(ahat, h, acc, FP64, PRECISION, UPCAST)
        total += acc * acc

    # epilogue: scale, store transposed
    total = total * coef
    ptrs = out_ptr + s * stride_os + g * stride_og + ro[None, :] * stride_oi + rj[:, None] * stride_oj
    tl.store(ptrs, total.to(out_ptr.dtype.element_ty), mask=j_ok & o_ok)


# ----------------------------------------------------------------------------------------------
# configs
def _split(dims, block_j: int, block_o: int, interpret: bool) -> int:
    """Programs per tile: enough for two tiles' work per SM, while each share keeps ≥ 4 samples."""
    if interpret:
        return 1
    return cm._split_count(dims["G"] * -(-dims["D"] // block_j) * -(-dims["O"] // block_o), dims["N"] // 4)


def _default(dims, dtype, interpret: bool) -> Config:
    """16-bit: BLOCK_J 64 (the M of both ``tl.dot``s: a warpgroup's wgmma), BLOCK_O up to 64 (one row tile for
    most layers: the patch projection is recomputed per row tile), BLOCK_L up to 128 positions and BLOCK_K 64
    patch rows per projection step, 128 where the positions fit 64 (the step's fixed work over 4× the MMA of 64 ×
    32: the static sm_90 report's issue bound 0.27 -> 0.8 on conv3_x, 0.24 -> 0.64 on conv5_x), 64 × 64 steps
    below 256 patch rows (the ResNet stem's 3 × 7 × 7 spilled 332-772 B with 128 positions), 8 warps (0 spills,
    172-228 registers; 4 warps: 252). fp32: 32-wide tiles, 4
    warps (no spills under triton 3.6 and 3.8; 8 warps, or BLOCK_K 16, spill 8-36 bytes on some layers). fp64 is
    a broadcast-sum: small tiles. The interpreter pays per program and per step: the largest tiles."""
    if interpret:
        bj, bo, bl, bk = cm._fit(dims["D"], 16, 64), cm._fit(dims["O"], 16, 64), cm._fit(dims["L"], 16, 64), \
            cm._fit(dims["D"], 16, 64)
        warps, stages = 4, 1
    elif dtype == torch.float64:
        bj, bo, bl, bk, warps, stages = 16, 16, 16, 16, 4, 1
    elif dtype == torch.float32:  # CUDA cores unless TF32 is allowed: 64-wide tiles spill there, and so do 8 warps
        bj, bo, bl, bk, warps, stages = 32, cm._fit(dims["O"], 16, 32), 32, 32, 4, 1
    else:  # 8 warps: the three fp32 tiles (two accumulators and the projected patches) fit without spilling
        wide = dims["D"] >= 256  # enough patch rows for the large steps (a 3-channel 7×7 stem spilled with them)
        bj, bo, bl = 64, cm._fit(dims["O"], 16, 64), cm._fit(dims["L"], 16, 128 if wide else 64)
        bk = 128 if wide and bl <= 64 else 64
        warps, stages = 8, 2
    return Config({"BLOCK_J": bj, "BLOCK_O": bo, "BLOCK_L": bl, "BLOCK_K": bk,
                   "SPLIT": _split(dims, bj, bo, interpret)}, num_warps=warps, num_stages=stages)


def _keep(cfg: Config, dtype) -> bool:
    """Validity: tiles ≥ 16 for ``tl.dot``; the two accumulators and the projected tile fit in registers
    (≤ 64 fp32 values per thread: 64 × 64 tiles with 128 positions at 8 warps hold 172-181 registers, 252 at 4),
    the operand tiles too (≤ 64 per thread; 16-bit: ≤ 96, their tiles staged in shared memory by ``cp.async``);
    fp64 (broadcast-sum) keeps each product's cube small."""
    j, o, lt, k = (cfg.meta[n] for n in ("BLOCK_J", "BLOCK_O", "BLOCK_L", "BLOCK_K"))
    threads = 32 * cfg.num_warps
    if dtype == torch.float64:
        return j * k * lt <= 8192 and j * lt * o <= 8192 and cfg.num_stages == 1
    operands = 96 if dtype in (torch.float16, torch.bfloat16) else 64
    return (min(j, o, lt, k) >= 16 and 2 * j * o + j * lt <= 64 * threads
            and k * (j + lt) + lt * o <= operands * threads)


def _candidates(dims, dtype):
    for j in (32, 64, 128):
        for o in (16, 32, 64, 128):
            for lt in (32, 64, 128):
                for k in (16, 32, 64, 128):
                    for warps in (4, 8):
                        for stages in (1, 2, 3):
                            for split in (1, 4, 16):
                                cfg = Config({"BLOCK_J": j, "BLOCK_O": o, "BLOCK_L": lt, "BLOCK_K": k,
                                              "SPLIT": split}, num_warps=warps, num_stages=stages)
                                if _keep(cfg, dtype) and split <= max(1, dims["N"] // 4):
                                    yield cfg


_SPACE = ConfigSpace({"BLOCK_J": (16, 128), "BLOCK_O": (16, 128), "BLOCK_L": (16, 128), "BLOCK_K": (16, 128),
                      "SPLIT": (1, 64)}, num_warps=(4, 8), num_stages=(1, 3), keep=_keep)


def _problem(layer, dtype, device) -> TuneProblem:
    """A tuning grid layer's statistic (groups 1, with the bias column), against the plain-torch path."""
    geom = cm._layer_conv_args(layer)
    g = layer.resolved()
    co, dp = layer.out_channels, layer.c * g.kernel_numel + 1
    dims = {"O": co, "D": dp, "L": g.num_blocks, "N": layer.n, "G": 1}

    def setup():
        x = torch.randn(layer.n, layer.c, *layer.size, device=device, dtype=dtype)
        grad = torch.randn(layer.n, co, *g.out_size, device=device, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        q_a = torch.linalg.qr(torch.randn(1, dp, dp, dtype=acc)).Q.to(device)
        q_g = torch.linalg.qr(torch.randn(1, co, co, dtype=acc)).Q.to(device)
        args = (x, grad, q_a, q_g)
        flags = {"groups": 1, "transposed": False, "bias": True}
        return (lambda cfg: ekfac_eigenvalues(*args, **geom, **flags, config=cfg),
                lambda: reference.ekfac_eigenvalues(*args, **geom, **flags))

    return TuneProblem(dims, setup)


EKFAC_SPEC = autotune.register(KernelSpec(
    "ekfac", ekfac_kernel, ("O", "D", "L", "N", "G"), _default, _candidates, _problem, _SPACE))


# ----------------------------------------------------------------------------------------------
# launcher
def _padded_positions(num: int) -> int:
    """The projected gradients' positions ``LH``: ``L`` rounded up to a multiple of 16 where that adds at most
    1/8 (a mask constant in 16s along the contiguous positions: 16-byte loads of the Ĝ tile; with a ragged one,
    conv4_x's 196 positions, triton 3.8 gathered it per element and spilled 120 B), else ``L`` (a Linear layer's
    one position would take 16× the memory)."""
    lh = -(-num // 16) * 16
    return lh if 8 * (lh - num) <= num else num


def _window_walk(mode: int, transposed: bool, taps: int) -> bool:
    """The kernel's ``WINDOW``: 'zeros' padding (mode 0), not transposed, at most 31 taps (a validity bit each in
    :func:`_common._window`'s int32); else each step computes its rows' sources (``_patch_columns``: the ResNet
    stem's 7 × 7 with 64-bit tap bits gained 0.18 -> 0.21 of the tensor cores' peak and spilled 8 B in fp32)."""
    return mode == 0 and not transposed and taps <= 31


def _walk_rows(q_a: torch.Tensor, cg: int, taps: int, block_j: int, dtype: torch.dtype) -> torch.Tensor:
    """``Q_A`` ``[G, DP, DP]`` as the kernel reads it, in ``dtype``: its patch rows in the walk's order (row ``k·CG
    + c`` holds unfold row ``c·K + k``; the bias row, if any, stays last) and its columns padded with zeros to whole
    ``block_j`` tiles (``[G, DP, cdiv(DP, block_j)·block_j]``), so that a Q tile is contiguous along its columns and
    needs no mask along them. One copy of ``Q_A``: ``DP²`` elements per group, against the kernel's
    ``N·L·DP²/BLOCK_J``-sized projection work."""
    g, dp = q_a.shape[0], q_a.shape[1]
    d = cg * taps
    out = q_a.new_zeros((g, dp, triton.cdiv(dp, block_j) * block_j), dtype=dtype)
    out[:, :d, :dp] = q_a[:, :d].reshape(g, cg, taps, dp).transpose(1, 2).reshape(g, d, dp)
    out[:, d:, :dp] = q_a[:, d:]
    return out


def ekfac_eigenvalues(x: torch.Tensor, grad: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor,
                      kernel_size: list[int], stride: list[int], padding: list[int], output_padding: list[int],
                      dilation: list[int], padding_mode: str, groups: int, transposed: bool, bias: bool,
                      coef: float = 1.0, config: Config | None = None) -> torch.Tensor:
    """``coef·s``, ``s[g] = Σ_n (Q_G[g]ᵀ dW_n[g] Q_A[g])²`` (elementwise square) for ``x`` ``[N, C, *spatial]``
    and the output gradients ``grad`` ``[N, C_out, *out]``, ``Q_A`` ``q_a`` ``[G, DP, DP]`` and ``Q_G`` ``q_g``
    ``[G, C_out/G, C_out/G]``; a new ``[G, C_out/G, DP]`` tensor (fp32, fp64 for fp64 ``x``).

    The geometry arguments (``padding``'s two forms among them) are ``_common._conv_geometry_3d``'s, and so
    are the errors on bad ones (``ValueError`` / ``TypeError``). The output gradients are projected here,
    ``Q_Gᵀ G_n`` by one batched matmul in the accumulator dtype (then the operand dtype: ``x``'s); ``Q_A`` is
    read in ``x``'s dtype. ``config`` overrides the autotune lookup.
    """
    # (1) check
    a = cm._conv_geometry_3d(x, kernel_size, stride, padding, output_padding, dilation, padding_mode, transposed,
                             groups, bias)
    n, cg, dp, num, acc_dtype = x.shape[0], a["CG"], a["DP"], a["L"], a["acc"]
    co = grad.shape[1] // groups
    # (2) allocate; an empty reduction (N = 0 or no positions) gives s = 0
    out = x.new_empty((groups, co, dp), dtype=acc_dtype)
    if out.numel() == 0:
        return out
    if n * num == 0:
        return out.zero_()
    if num > 2**31 - 128:  # its last position step (BLOCK_L ≤ 128, the config space's bound) must not wrap
        raise ValueError(f"the kernel indexes a sample's output positions in int32: {num} positions are too many")
    # (3) look up config and launch
    cfg = config or autotune.lookup("ekfac", x.device, x.dtype, O=co, D=dp, L=num, N=n, G=groups)
    # the output gradients in G's eigenbasis, [N, G·CO, LH]: the size of grad (the patches, ∏K times more, are
    # projected in the kernel), its positions padded with zeros (see _padded_positions)
    gh = torch.matmul(q_g.to(acc_dtype).transpose(1, 2), grad.reshape(n, groups, co, num).to(acc_dtype))
    lh = _padded_positions(num)
    if lh == num:
        gh = gh.to(x.dtype).view(n, groups * co, num)
    else:
        ghp = x.new_empty((n, groups * co, lh))
        ghp[:, :, :num] = gh.view(n, groups * co, num)
        ghp[:, :, num:] = 0
        gh = ghp
    bj, bo, split = cfg.meta["BLOCK_J"], cfg.meta["BLOCK_O"], cfg.meta["SPLIT"]
    tj, to = triton.cdiv(dp, bj), triton.cdiv(co, bo)
    bc, tc, tq, td = cm._pair_walk(cg, a["K"], cfg.meta["BLOCK_K"])
    qa = _walk_rows(q_a, cg, a["K"], bj, x.dtype)
    target = cm._split_workspace(out, split)
    xs = cm._as_5d(x, a["ndim"])
    if cg > 1:  # a (tap, channel block) pair's channels contiguous: vector loads
        xs = cm._channels_last(xs)
    with cm._device(x):
        # grid dims 1 (groups) and 2 (SPLIT) are limited to 65535 on CUDA: a depthwise layer may have more
        for g0, ng in cm._group_slices(groups):
            ekfac_kernel[(tj * to, ng, split)](
                target[:, g0:g0 + ng], xs[:, g0 * cg:(g0 + ng) * cg], qa[g0:g0 + ng], gh[:, g0 * co:(g0 + ng) * co],
                cg, co, *a["in"], a["out"][1], a["out"][2], num, n, a["D"], dp, tj, tc, tq, td, lh,
                *xs.stride(), *qa.stride(), *gh.stride(), *target.stride(),
                coef if split == 1 else 1.0,
                a["k"], a["s"], a["p"], a["d"],
                a["mode"], transposed, bias,
                **cm._math_args(x.dtype, ekfac_kernel), BLOCK_C=bc,
                WINDOW=_window_walk(a["mode"], transposed, a["K"]), FULL_C=cg % bc == 0,
                **cfg.launch_kwargs(),
            )
    if split > 1:
        cm._sum_partials(target, out, coef=coef)
    return out
