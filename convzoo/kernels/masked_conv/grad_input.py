"""Masked sparse convolution, grad-input: ``dX = dY ⋆ (W ⊙ mask)ᵀ``, a gather over the grad-input tile lists
(``t_count`` / ``t_index``), and its launcher."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from convzoo import _shapes, autotune, reference
from convzoo.autotune import Config, KernelSpec, TuneProblem
from convzoo.kernels import _common as cm
from convzoo.kernels.masked_conv.fwd import (
    _SPACE,
    _candidates,
    _check_block,
    _default,
    default_block,
)

__all__ = ["dense_grad_input_lists", "masked_conv_grad_input"]


# ==============================================================================================
# grad-input: dX = dY ⋆ (W ⊙ mask)ᵀ, a gather over the grad-input tile lists (t_count / t_index)
@triton.jit
def _grad_input_taps(acc, g_n, w_ptr, idx_row, count, g, c0, c_ok, pd, ph, pw, cand,
                     E, TO, OG, CG, OD, OH, OW, stride_go, stride_gd, stride_gh, stride_gw, stride_wo, stride_wk,
                     KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, DIL: tl.constexpr,
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
    nd = pd + LO[0]
    nh = ph + LO[1]
    nw = pw + LO[2]
    if cm._taps(KS) <= 31:
        bits = tl.zeros_like(nw)
        for tap in tl.static_range(cm._taps(KS)):
            ad = nd - (tap // (KS[2] * KS[1])) * DIL[0]
            ah = nh - (tap // KS[2] % KS[1]) * DIL[1]
            aw = nw - (tap % KS[2]) * DIL[2]
            v = (cand & (ad >= 0) & (ad % ST[0] == 0) & (ad // ST[0] < OD)
                 & (ah >= 0) & (ah % ST[1] == 0) & (ah // ST[1] < OH)
                 & (aw >= 0) & (aw % ST[2] == 0) & (aw // ST[2] < OW))
            bits = bits | (v.to(tl.int32) << tap)
    if ST[0] * ST[1] * ST[2] == 1:
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
        kw = t % KS[2]
        kh = (t // KS[2]) % KS[1]
        kd = t // (KS[2] * KS[1])
        # (!= 0: the newest Triton's interpreter makes a block bool & a scalar bool int64, which a load mask
        # refuses; a no-op when compiled)
        o_ok = (((o0 + tl.arange(0, BLOCK_O)) < OG) & e_ok) != 0
        co0 = g * OG + o0
        if cm._taps(KS) <= 31:
            ok = ((bits >> tl.where(e_ok, t, 31)) & 1) != 0
        else:
            ad = nd - kd * DIL[0]
            ah = nh - kh * DIL[1]
            aw = nw - kw * DIL[2]
            ok = (cand & (ad >= 0) & (ad % ST[0] == 0) & (ad // ST[0] < OD) & (ah >= 0) & (ah % ST[1] == 0)
                  & (ah // ST[1] < OH) & (aw >= 0) & (aw % ST[2] == 0) & (aw // ST[2] < OW))
        if ST[0] * ST[1] * ST[2] == 1:
            g_off = co0 * stride_go - (kd * DIL[0]).to(tl.int64) * stride_gd - (kh * DIL[1]).to(tl.int64) * stride_gh \
                - (kw * DIL[2]).to(tl.int64) * stride_gw
            if NARROW:  # the launcher bounded it: int32 scalar math
                g_off = g_off.to(tl.int32)
            src = g_pos + g_off
        else:
            src = g_n + co0 * stride_go + ((nd - kd * DIL[0]) // ST[0]).to(tl.int64) * stride_gd \
                + ((nh - kh * DIL[1]) // ST[1]).to(tl.int64) * stride_gh \
                + ((nw - kw * DIL[2]) // ST[2]).to(tl.int64) * stride_gw
        a = tl.load(src[:, None] + go[None, :], mask=ok[:, None] & o_ok[None, :], other=0)
        # the weight block: W[co, c, t] at tap-major column t·CG + c
        w_off = co0 * stride_wo + (t.to(tl.int64) * CG + c0) * stride_wk
        if NARROW:
            w_off = w_off.to(tl.int32)
        w = tl.load(w_ptr + w_off + wo[:, None] + wc[None, :], mask=o_ok[:, None] & c_ok[None, :], other=0)
        acc = cm._mma(a, w, acc, FP64, PRECISION, UPCAST)
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
    # geometry (per-dim (d, h, w) tuples, see _common): LO the low paddings, HI the high ones
    KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, DIL: tl.constexpr,
    MODE: tl.constexpr,
    # padded positions that can read one input index, per dim (1 for 'zeros')
    NC: tl.constexpr,
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
    for jd in range(NC[0]):
        for jh in range(NC[1]):
            for jw in range(NC[2]):
                pd, ph, pw, cand = cm._padded_candidates(i_d, ih, iw, jd, jh, jw, ID, IH, IW, LO, HI, MODE)
                cand = m_ok & cand
                # MODE is a constexpr and the test a runtime branch: two ifs, so 'zeros' pays no reduction
                if MODE == 0:  # noqa: SIM114  (one candidate, p = i: nothing to skip)
                    acc = _grad_input_taps(acc, g_n, w_ptr, idx_row, count, g, c0, c_ok, pd, ph, pw, cand,
                                           E, TO, OG, CG, OD, OH, OW, stride_go, stride_gd, stride_gh, stride_gw,
                                           stride_wo, stride_wk, KS, ST, LO, DIL,
                                           FP64, PRECISION, UPCAST, BLOCK_O, BLOCK_K, NARROW)
                elif tl.max(cand.to(tl.int32), axis=0) > 0:
                    acc = _grad_input_taps(acc, g_n, w_ptr, idx_row, count, g, c0, c_ok, pd, ph, pw, cand,
                                           E, TO, OG, CG, OD, OH, OW, stride_go, stride_gd, stride_gh, stride_gw,
                                           stride_wo, stride_wk, KS, ST, LO, DIL,
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
    k, d = cm._as_3d(g)["k"], cm._as_3d(g)["d"]
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
    cm._check_device(grad)
    # (2) allocate; nothing to launch for an empty dx (N, C_in or an input dim = 0), and dx = 0 without
    # output channels (C_out = 0: nothing reaches the input; the output grid is never empty, see geometry)
    n, c = grad.shape[0], cg * groups
    dx = grad.new_empty((n, c, *g.in_size))
    if dx.numel() == 0:
        return dx
    if co == 0:
        return dx.zero_()
    buf = cm._launch_buffer(dx, masked_conv_grad_input_kernel)
    # (3) look up config and launch
    P = math.prod(g.in_size)
    M = n * P
    cfg = config or autotune.lookup("masked_conv_grad_input", grad.device, grad.dtype, M=M, C=c, K=og * kt,
                                    BO=bo, BK=bk)
    a = cm._as_3d(g)
    # the tap walk reads BLOCK_O contiguous output channels per position from channels-last dY; other layouts
    # are copied once (see _channels_last)
    gs = cm._channels_last(cm._as_5d(grad, g.ndim))
    w2 = weight.movedim(1, -1).reshape(co, cg * kt)  # tap-major: a view for channels-last weights, else a copy
    t_count, t_index = t_count.contiguous(), t_index.contiguous()
    rows = groups * tc
    grid = (triton.cdiv(M, cfg.meta["BLOCK_M"]) * rows,)
    with cm._device(grad):
        masked_conv_grad_input_kernel[grid](
            buf, gs, w2, t_count, t_index,
            M, P, c, og, cg, tc, to, kt * to, rows, *a["in"], *a["out"],
            *gs.stride(), *w2.stride(),
            a["k"], a["s"], a["lo"], a["hi"], a["d"],
            _shapes.PADDING_MODE_CODES[g.padding_mode],
            cm._num_candidates(g, 3 - g.ndim),
            **cm._math_args(grad.dtype, masked_conv_grad_input_kernel),
            BLOCK_O=bo, BLOCK_K=bk,
            NARROW=_narrow(gs, w2, g, bo, bk),
            POS32=M + cfg.meta["BLOCK_M"] < 2**31 and c * P < 2**31, **cfg.launch_kwargs(),
        )
    return cm._finish(dx, buf)
