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
    # blocks of BLOCK_C channels per tap) in TD steps of BLOCK_K rows
    CG, CO, ID, IH, IW, OH, OW, L, N, D, DP, TJ, TC, TQ, TD,
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
    bounds test per element; Q_A's rows are read at the walk's unfold rows ``c·K + k``. The bias row (the
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
            for ds in range(0, TD):
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
                q = tl.load(q_g + (c * cm._taps(KS) + k)[None, :] * stride_qd + rj[:, None] * stride_qj,
                            mask=j_ok & c_ok[None, :], other=0)
                ahat = cm._mma(q, p, ahat, FP64, PRECISION, UPCAST)
            if HAS_BIAS:  # the constant-1 row D: Q_A[D, j] at every position
                # tl.cast, not D.to: an int argument equal to 1 reaches the kernel as the constant 1
                qb = tl.load(q_g + tl.cast(D, tl.int64) * stride_qd + rj * stride_qj, mask=rj < DP, other=0)
                ahat += cm._widen(qb, ACC_DTYPE, UPCAST)[:, None] * tl.where(l_ok, 1.0, 0.0).to(ACC_DTYPE)
            h = tl.load(h_g + n * stride_hn + ro[None, :] * stride_hc + l[:, None] * stride_hl,
                        mask=o_ok & (l < L)[:, None], other=0)
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
    most layers: the patch projection is recomputed per row tile), BLOCK_L 64 positions, BLOCK_K 32 patch rows
    per projection step, 8 warps (0 spills in the static sm_90 report; 4 warps spill). fp32: 32-wide tiles, 4
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
        bj, bo, bl, bk = 64, cm._fit(dims["O"], 16, 64), 64, 32
        warps, stages = 8, 2
    return Config({"BLOCK_J": bj, "BLOCK_O": bo, "BLOCK_L": bl, "BLOCK_K": bk,
                   "SPLIT": _split(dims, bj, bo, interpret)}, num_warps=warps, num_stages=stages)


def _keep(cfg: Config, dtype) -> bool:
    """Validity: tiles ≥ 16 for ``tl.dot``; the two accumulators and the projected tile fit in registers
    (≤ 48 fp32 values per thread: 96 spill at 4 warps), the operand tiles too (≤ 64); fp64 (broadcast-sum)
    keeps each product's cube small."""
    j, o, lt, k = (cfg.meta[n] for n in ("BLOCK_J", "BLOCK_O", "BLOCK_L", "BLOCK_K"))
    threads = 32 * cfg.num_warps
    if dtype == torch.float64:
        return j * k * lt <= 8192 and j * lt * o <= 8192 and cfg.num_stages == 1
    return min(j, o, lt, k) >= 16 and 2 * j * o + j * lt <= 48 * threads and k * (j + lt) + lt * o <= 64 * threads


def _candidates(dims, dtype):
    for j in (32, 64, 128):
        for o in (16, 32, 64, 128):
            for lt in (32, 64):
                for k in (16, 32, 64):
                    for warps in (4, 8):
                        for stages in (1, 2, 3):
                            for split in (1, 4, 16):
                                cfg = Config({"BLOCK_J": j, "BLOCK_O": o, "BLOCK_L": lt, "BLOCK_K": k,
                                              "SPLIT": split}, num_warps=warps, num_stages=stages)
                                if _keep(cfg, dtype) and split <= max(1, dims["N"] // 4):
                                    yield cfg


_SPACE = ConfigSpace({"BLOCK_J": (16, 128), "BLOCK_O": (16, 128), "BLOCK_L": (16, 128), "BLOCK_K": (16, 64),
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
    # the output gradients in G's eigenbasis, [N, G·CO, L]: the size of grad (the patches, ∏K times more, are
    # projected in the kernel)
    gh = torch.matmul(q_g.to(acc_dtype).transpose(1, 2), grad.reshape(n, groups, co, num).to(acc_dtype))
    gh = gh.to(x.dtype).view(n, groups * co, num)
    qa = q_a.to(x.dtype)
    # (3) look up config and launch
    cfg = config or autotune.lookup("ekfac", x.device, x.dtype, O=co, D=dp, L=num, N=n, G=groups)
    bj, bo, split = cfg.meta["BLOCK_J"], cfg.meta["BLOCK_O"], cfg.meta["SPLIT"]
    tj, to = triton.cdiv(dp, bj), triton.cdiv(co, bo)
    bc, tc, tq, td = cm._pair_walk(cg, a["K"], cfg.meta["BLOCK_K"])
    target = cm._split_workspace(out, split)
    xs = cm._as_5d(x, a["ndim"])
    if cg > 1:  # a (tap, channel block) pair's channels contiguous: vector loads
        xs = cm._channels_last(xs)
    with cm._device(x):
        # grid dims 1 (groups) and 2 (SPLIT) are limited to 65535 on CUDA: a depthwise layer may have more
        for g0, ng in cm._group_slices(groups):
            ekfac_kernel[(tj * to, ng, split)](
                target[:, g0:g0 + ng], xs[:, g0 * cg:(g0 + ng) * cg], qa[g0:g0 + ng], gh[:, g0 * co:(g0 + ng) * co],
                cg, co, *a["in"], a["out"][1], a["out"][2], num, n, a["D"], dp, tj, tc, tq, td,
                *xs.stride(), *qa.stride(), *gh.stride(), *target.stride(),
                coef if split == 1 else 1.0,
                a["k"], a["s"], a["p"], a["d"],
                a["mode"], transposed, bias,
                **cm._math_args(x.dtype, ekfac_kernel), BLOCK_C=bc,
                **cfg.launch_kwargs(),
            )
    if split > 1:
        cm._sum_partials(target, out, coef=coef)
    return out
