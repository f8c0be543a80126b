"""What the kernel families share: the jit index helpers that map an output tap to the input it reads and
back (padding modes folded into the index math, a convolution's and a transposed one's: ``_tap_sources``,
``_tap_target``, with the tap and position decodes), the gather kernels' program → tile map, the implicit-GEMM
kernels' patch gather and tile product, the fp32 widening of bf16 under the interpreter, and the launchers'
host helpers (geometry as 3-d kernel arguments, device, accumulator dtype and ``tl.dot`` precision, launch
buffers, the gather grid, tuning problems, the split reductions' share count, workspace and fixed-order sum).

Imported by every kernel module; decorated when they are (so under the same ``TRITON_INTERPRET``).

Geometry reaches a kernel as per-dim constexpr tuples ``(d, h, w)`` (every input is 3-d to the kernels, see
:func:`_as_3d`): ``KS`` the kernel size, ``ST`` the stride, ``LO`` the low (or a transposed convolution's)
padding, ``HI`` the high padding, ``DIL`` the dilation, and ``NC`` the padded positions that can read one input
index (see :func:`_num_candidates`); ``KS[0]`` is the depth's. :func:`_taps` is ``∏KS``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from convzoo import _compat, _shapes, autotune
from convzoo.autotune import Config, ConfigSpace, TuneProblem


# ----------------------------------------------------------------------------------------------
# index helpers shared by both kernels
@triton.constexpr_function
def _taps(ks):
    """The number of taps ``∏ks`` of a kernel-size tuple, a compile-time constant."""
    return ks[0] * ks[1] * ks[2]


@triton.jit
def _source_index(p, n, MODE: tl.constexpr):
    """Input index read by padded position ``p`` (in input coordinates) along a dim of size ``n``,
    and whether it reads anything (only ``'zeros'`` padding reads nothing)."""
    if MODE == 0:  # zeros
        i = p
        ok = (p >= 0) & (p < n)
    elif MODE == 1:  # circular; % truncates toward zero, so shift into range first
        i = ((p % n) + n) % n
        ok = p == p
    elif MODE == 2:  # reflect (padding < n, so one reflection suffices)
        i = tl.abs(p)
        i = tl.where(i > n - 1, (n - 1) - (i - (n - 1)), i)  # 2(n-1) - i, no 2n formed: an int32 n may pass 2^30
        ok = p == p
    else:  # replicate
        i = tl.minimum(tl.maximum(p, 0), n - 1)
        ok = p == p
    return i, ok


@triton.jit
def _padded_candidate(i, j, n, lo, hi, MODE: tl.constexpr):
    """The ``j``-th padded position (input coordinates, in ``[-lo, n + hi)``) that reads input index
    ``i``, and whether it exists. The inverse of ``_source_index``: fold gathers from all of them.

    zeros: only ``i``. circular: ``i``, ``i - n``, ``i + n``. reflect: ``i``, ``-i``,
    ``2(n-1) - i``. replicate: ``i``, then ``-1..-lo`` (for ``i = 0``), then ``n..n-1+hi``
    (for ``i = n-1``).
    """
    if MODE == 0:
        p = i
        ok = i == i
    elif MODE == 1:
        p = tl.where(j == 0, i, tl.where(j == 1, i - n, i + n))
        ok = i == i
    elif MODE == 2:
        p = tl.where(j == 0, i, tl.where(j == 1, -i, 2 * (n - 1) - i))
        ok = (j == 0) | ((j == 1) & (i > 0)) | ((j == 2) & (i < n - 1))
    else:
        p = tl.where(j == 0, i, tl.where(j <= lo, -j, n - 1 + j - lo))
        ok = (j == 0) | ((j <= lo) & (i == 0)) | ((j > lo) & (i == n - 1))
    ok = ok & (p >= -lo) & (p < n + hi)
    return p, ok


@triton.jit
def _tap_pairs(t, TC, TQ, CG, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Step ``t`` of a patch-row walk in (tap, channel block) pairs (pair ``q``: tap ``q // TC``, channels
    ``(q % TC)·BLOCK_C + [0, BLOCK_C)``; ``BLOCK / BLOCK_C`` pairs per step, ``TQ`` in all, see
    :func:`_pair_walk`): the ``BLOCK`` rows' tap ``k`` (int64; one scalar when ``BLOCK == BLOCK_C``, else one
    per row), channel ``c`` (int64) and validity. Their unfold row is ``c·K + k``."""
    if BLOCK == BLOCK_C:  # one tap per step: the callers' offsets and tests are one vector of positions
        k = (t // TC).to(tl.int64)
        c = ((t % TC) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        ok = c < CG
    else:  # a tap per BLOCK_C rows: small channel groups still fill BLOCK rows
        r = tl.arange(0, BLOCK)
        q = t * (BLOCK // BLOCK_C) + r // BLOCK_C
        k = (q // TC).to(tl.int64)
        c = ((q % TC) * BLOCK_C + r % BLOCK_C).to(tl.int64)
        ok = (c < CG) & (q < TQ)
    return k, c, ok


@triton.jit
def _padded_candidates(i_d, ih, iw, jd, jh, jw, ID, IH, IW, LO: tl.constexpr, HI: tl.constexpr,
                       MODE: tl.constexpr):
    """The ``(jd, jh, jw)``-th padded position ``(pd, ph, pw)`` that reads input position ``(i_d, ih, iw)``,
    and whether it exists in all three dims: ``_padded_candidate`` per dim. The gathers that invert a padded
    read (fold, the sparse conv's grad-input) loop ``jd``, ``jh``, ``jw`` over ``range(NC[0..2])``, in that
    nesting, and call it in the innermost loop (each dim's part depends on its own index only, so the
    compiler hoists it out of the loops inside)."""
    pd, ok_d = _padded_candidate(i_d, jd, ID, LO[0], HI[0], MODE)
    ph, ok_h = _padded_candidate(ih, jh, IH, LO[1], HI[1], MODE)
    pw, ok_w = _padded_candidate(iw, jw, IW, LO[2], HI[2], MODE)
    return pd, ph, pw, ok_d & ok_h & ok_w


@triton.jit
def _widen(v, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """``v`` in the accumulator dtype. ``UPCAST`` (bf16 under the interpreter only) widens by the bits
    — a bf16 is the top half of an fp32 — because the interpreter's own bf16 → fp32 cast gets
    subnormals (below 2^-126) wrong; on a GPU the plain cast is exact."""
    if UPCAST:
        w = (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        w = v.to(ACC_DTYPE)
    return w


@triton.jit
def _block_index(p, lo, k, O, S: tl.constexpr, D: tl.constexpr):
    """The block (output position) whose tap ``k`` reads padded position ``p``, and whether it exists."""
    q = p + lo - k * D
    l = q // S
    ok = (q >= 0) & (q % S == 0) & (l < O)
    return l, ok


@triton.jit
def _tap_coords(k, KH: tl.constexpr, KW: tl.constexpr):
    """The per-dim taps ``(kd, kh, kw)`` of the flat tap index ``k = (kd·KH + kh)·KW + kw`` (unfold's row
    order within a channel)."""
    kw = k % KW
    kh = (k // KW) % KH
    kd = k // (KW * KH)
    return kd, kh, kw


@triton.jit
def _position_coords(l, OH, OW):
    """The per-dim coordinates ``(od, oh, ow)`` of the flat position ``l = (od·OH + oh)·OW + ow``."""
    ow = l % OW
    oh = (l // OW) % OH
    od = l // OW // OH  # not l // (OW * OH): an int32 product of two sizes
    return od, oh, ow


@triton.jit
def _window(l, OH, OW, ID, IH, IW, KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, DIL: tl.constexpr,
            MODE: tl.constexpr):
    """For output positions ``l`` (local_conv's forward: once per program; ekfac: once per position step): their
    windows' corner ``(i_d0, i_h0, i_w0)`` (the padded input index of tap 0, per dim) and, for ``'zeros'`` with at
    most 31 taps, a bit per tap saying whether the tap reads inside x; ``bits`` is 0 otherwise (unused)."""
    od, oh, ow = _position_coords(l, OH, OW)
    i_d0 = od * ST[0] - LO[0]
    i_h0 = oh * ST[1] - LO[1]
    i_w0 = ow * ST[2] - LO[2]
    bits = tl.zeros_like(i_w0).to(tl.int32)
    if MODE == 0 and _taps(KS) <= 31:
        for tap in tl.static_range(_taps(KS)):
            kd, kh, kw = tap // (KS[2] * KS[1]), tap // KS[2] % KS[1], tap % KS[2]
            p_d, p_h, p_w = i_d0 + kd * DIL[0], i_h0 + kh * DIL[1], i_w0 + kw * DIL[2]
            v = (p_d >= 0) & (p_d < ID) & (p_h >= 0) & (p_h < IH) & (p_w >= 0) & (p_w < IW)
            bits = bits | (v.to(tl.int32) << tap)
    return i_d0, i_h0, i_w0, bits


@triton.jit
def _tap_source(o, k, n, lo, S: tl.constexpr, D: tl.constexpr, MODE: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Along one dim: the input index tap ``k`` of output position ``o`` reads, and whether it reads anything.
    A convolution's patches: padded position ``o·S - lo + k·D``, mapped by the padding mode (``_source_index``).
    ``TRANSPOSED`` (a transposed convolution's patches, ``lo`` its padding, ``MODE`` unused: zeros): the ``i``
    with ``o + lo - k·D = i·S``, if there is one (``_block_index``)."""
    if TRANSPOSED:
        i, ok = _block_index(o, lo, k, n, S, D)
    else:
        i, ok = _source_index(o * S - lo + k * D, n, MODE)
    return i, ok


@triton.jit
def _tap_sources(od, oh, ow, kd, kh, kw, ID, IH, IW,
                 ST: tl.constexpr, LO: tl.constexpr, DIL: tl.constexpr,
                 MODE: tl.constexpr, TRANSPOSED: tl.constexpr):
    """``_tap_source`` in all three dims: the input indices ``(i_d, i_h, i_w)`` tap ``(kd, kh, kw)`` of output
    position ``(od, oh, ow)`` reads (broadcast together), and whether it reads anything."""
    i_d, ok_d = _tap_source(od, kd, ID, LO[0], ST[0], DIL[0], MODE, TRANSPOSED)
    i_h, ok_h = _tap_source(oh, kh, IH, LO[1], ST[1], DIL[1], MODE, TRANSPOSED)
    i_w, ok_w = _tap_source(ow, kw, IW, LO[2], ST[2], DIL[2], MODE, TRANSPOSED)
    return i_d, i_h, i_w, ok_d & ok_h & ok_w


@triton.jit
def _tap_target(i, lo, k, O, S: tl.constexpr, D: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The adjoint of ``_tap_source`` along one dim: the output position whose tap ``k`` reads ``i``, and
    whether there is one. A convolution (fold): ``i`` is a padded position, ``_block_index``. ``TRANSPOSED``
    (unfold_transpose's adjoint): ``o = i·S - lo + k·D``, if it lies in ``[0, O)``."""
    if TRANSPOSED:
        o = i * S - lo + k * D
        ok = (o >= 0) & (o < O)
    else:
        o, ok = _block_index(i, lo, k, O, S, D)
    return o, ok


@triton.jit
def _tile_offsets(R, I, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """The gather kernels' program → tile map (a 1-d grid of ``cdiv(R, BLOCK_R)·cdiv(I, BLOCK_I)`` programs, the
    inner dim fastest): this program's rows and inner indices (int64) and their masks."""
    pid = tl.program_id(0).to(tl.int64)
    num_i = tl.cdiv(I, BLOCK_I)
    pid_r = pid // num_i
    pid_i = pid % num_i
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    inner = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    return rows, inner, rows < R, inner < I


@triton.jit
def _split_tile(TK, ROWS, TO, OG, BLOCK_O: tl.constexpr):
    """The split-position reductions' program → tile map (masked_conv's grad-weight, coactivation): a 1-d grid
    of ``SPLIT·ROWS·TK`` programs, k-slots fastest, then the ``ROWS = G·TO`` o-tile rows ``(g, to)``, shares
    slowest (the programs of one share read the same positions, so they run together and hit in L2). Returns
    the share ``s``, the row, the slot ``j``, the group ``g`` (int64), the tile's output-channel mask and its
    output channels ``co`` in all of C_out."""
    pid = tl.program_id(0).to(tl.int64)
    j = pid % TK
    row = (pid // TK) % ROWS
    s = pid // TK // ROWS
    g = row // TO
    o = (row % TO) * BLOCK_O + tl.arange(0, BLOCK_O)
    return s, row, j, g, o < OG, g * OG + o


# ----------------------------------------------------------------------------------------------
# the implicit-GEMM kernels' (local_conv, patch_covariance) patch gather and tile product
@triton.jit
def _mma(a, b, acc, FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b``. fp64 is a broadcast-sum: ``tl.dot`` does not take fp64 on every target.
    ``UPCAST`` (bf16 under the interpreter only) feeds ``tl.dot`` fp32 operands: the interpreter's
    ``tl.dot`` multiplies bf16 bit patterns as integers. The widening is exact (``_widen``) and bf16
    products are exact in fp32, so this is what the tensor cores compute, up to summation order; on
    a GPU bf16 stays on the tensor cores."""
    if FP64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif UPCAST:
        acc = tl.dot(_widen(a, tl.float32, UPCAST), _widen(b, tl.float32, UPCAST), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _patch_columns(r, l, ID, IH, IW, OH, OW, stride_xc, stride_xd, stride_xh, stride_xw,
                   KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, DIL: tl.constexpr, MODE: tl.constexpr,
                   TRANSPOSED: tl.constexpr):
    """For patch rows ``r = (c, kd, kh, kw)`` of position ``l``: the offset into ``x[n]`` each reads,
    and whether it reads anything (``'zeros'`` padding reads nothing). ``TRANSPOSED``: the patches of a
    transposed convolution (unfold_transpose's), where tap ``k`` of ``o`` reads the ``i`` with
    ``o + P - k·D = i·S``, if there is one (``MODE`` is then unused: zeros)."""
    k = r % _taps(KS)
    c = r // _taps(KS)
    kd, kh, kw = _tap_coords(k, KS[1], KS[2])
    od, oh, ow = _position_coords(l, OH, OW)
    # per dim, the validity combined after the offset: in this order patch_covariance's fp16 tile keeps 152
    # registers (154 through _tap_sources, static sm_90 report)
    i_d, ok_d = _tap_source(od, kd, ID, LO[0], ST[0], DIL[0], MODE, TRANSPOSED)
    i_h, ok_h = _tap_source(oh, kh, IH, LO[1], ST[1], DIL[1], MODE, TRANSPOSED)
    i_w, ok_w = _tap_source(ow, kw, IW, LO[2], ST[2], DIL[2], MODE, TRANSPOSED)
    off = c * stride_xc + i_d * stride_xd + i_h * stride_xh + i_w * stride_xw
    return off, ok_d & ok_h & ok_w


# ----------------------------------------------------------------------------------------------
# configs of the gather kernels (unfold, fold, unfold_transpose and its adjoint: a tile contiguous along
# its inner dim)
def _tile_default(rows: int, inner: int, interpret: bool, inner_cap: int, tile: int) -> tuple[int, int]:
    """(BLOCK_rows, BLOCK_inner): the inner (contiguous) dim first, then rows up to ``tile`` elements.
    The interpreter pays per program, not per element, so it gets the largest tiles."""
    if interpret:
        inner_cap, tile = 1024, 16384
    b_inner = max(16, min(inner_cap, autotune.bucket(inner)))
    b_rows = max(1, min(autotune.bucket(rows), tile // b_inner))
    return b_rows, b_inner


def _gather_default(dims, dtype, interpret: bool) -> Config:
    """unfold's and unfold_transpose's heuristic (dims R rows, L contiguous outputs)."""
    # 4 KiB-ish tiles: 128 contiguous outputs × 16 rows keeps 4 warps busy with 16 elements each
    br, bl = _tile_default(dims["R"], dims["L"], interpret, inner_cap=128, tile=2048)
    return Config({"BLOCK_R": br, "BLOCK_L": bl}, num_warps=4, num_stages=1)


def _reduce_gather_default(dims, dtype, interpret: bool) -> Config:
    """fold's and unfold_transpose_backward's heuristic (dims R rows, P contiguous pixels, a tap loop)."""
    # the tap loop keeps an fp32 accumulator tile live: 1024 elements = 8 registers/thread at 4 warps
    br, bp = _tile_default(dims["R"], dims["P"], interpret, inner_cap=128, tile=1024)
    return Config({"BLOCK_R": br, "BLOCK_P": bp}, num_warps=4, num_stages=1)


def _tile_grid(name: str, t: torch.Tensor, rows: int, config: Config | None, **inner: int):
    """A gather kernel's config (``config``, or the autotune lookup of kernel ``name`` for ``t``'s device and dtype
    at dims ``R = rows`` and the one ``inner`` dim) and its grid (``_tile_offsets``': ``BLOCK_R`` rows ×
    ``BLOCK_<inner>`` tiles)."""
    ((dim, size),) = inner.items()
    cfg = config or autotune.lookup(name, t.device, t.dtype, R=rows, **inner)
    return cfg, (triton.cdiv(rows, cfg.meta["BLOCK_R"]) * triton.cdiv(size, cfg.meta[f"BLOCK_{dim}"]),)


def _random_problem(dims: dict, shape: tuple, dtype, device, run, ref, exact: bool = False) -> TuneProblem:
    """A tuning problem on one random input ``t`` of ``shape``: ``run(t, cfg)`` against ``ref(t)`` (``exact``:
    bit-equality, for the copy kernels)."""
    def setup():
        t = torch.randn(*shape, device=device, dtype=dtype)
        return (lambda cfg: run(t, cfg)), (lambda: ref(t))

    return TuneProblem(dims, setup, exact=exact)


def _candidates(row_name: str, inner_name: str):
    def gen(dims, dtype):
        for inner in (32, 64, 128, 256, 512):
            for rows in (1, 2, 4, 8, 16, 32, 64):
                for warps in (1, 2, 4, 8):
                    cfg = Config({row_name: rows, inner_name: inner}, num_warps=warps, num_stages=1)
                    if _keep(cfg, row_name, inner_name):
                        yield cfg
    return gen


def _keep(cfg: Config, row_name: str, inner_name: str) -> bool:
    """Validity: power-of-2 tiles of 256..8192 elements, at least one element per thread."""
    r, i = cfg.meta[row_name], cfg.meta[inner_name]
    pow2 = r & (r - 1) == 0 and i & (i - 1) == 0
    return pow2 and 256 <= r * i <= 8192 and r * i >= 32 * cfg.num_warps


def _space(row_name: str, inner_name: str) -> ConfigSpace:
    """What a tuned table entry may hold: the candidates' grid (rows 1..64, inner 32..512, 1..8 warps,
    one stage) widened to the heuristic's tiles (rows up to 128, inner from 16), under ``_keep``."""
    return ConfigSpace({row_name: (1, 128), inner_name: (16, 512)}, num_warps=(1, 8), num_stages=(1, 1),
                       keep=lambda cfg, dtype: _keep(cfg, row_name, inner_name))


# ----------------------------------------------------------------------------------------------
# launcher helpers
def _pad3(values, fill) -> tuple:
    """Per-dim ``values`` with leading ``fill`` entries to 3 spatial dims (kernels see every input as 3-d)."""
    return (fill,) * (3 - len(values)) + tuple(values)


def _as_3d(g: _shapes.Geometry) -> dict:
    """Geometry padded with leading unit dims to 3 spatial dims, as kernel arguments."""
    return {
        "in": _pad3(g.in_size, 1), "out": _pad3(g.out_size, 1), "k": _pad3(g.kernel_size, 1),
        "s": _pad3(g.stride, 1), "lo": _pad3(g.pad_lo, 0), "hi": _pad3(g.pad_hi, 0),
        "d": _pad3(g.dilation, 1),
    }


def _as_5d(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[N, C, *spatial]`` as a view with leading unit spatial dims, to 3 spatial dims."""
    for _ in range(3 - ndim):
        x = x.unsqueeze(2)
    return x


def _acc_dtype(dtype: torch.dtype):
    """The kernels' accumulator: fp64 for fp64 inputs, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_device(t: torch.Tensor) -> None:
    """The kernels run on CUDA tensors, and on CPU tensors under the interpreter.

    Raises:
        ValueError: ``t`` is neither a CUDA tensor nor a CPU tensor under ``TRITON_INTERPRET=1``.
    """
    if not (t.is_cuda or (autotune.interpret_mode() and t.device.type == "cpu")):
        raise ValueError(
            f"the Triton kernels need a CUDA tensor (or CPU tensors with TRITON_INTERPRET=1), got {t.device}")


def _device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it ``t``'s for the launch."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _upcast(dtype: torch.dtype, kernel) -> bool:
    """The kernels' ``UPCAST`` flag: bf16 on an interpreted kernel, whose bf16 arithmetic (``tl.dot``
    included) and bf16 → fp32 cast are wrong; see ``_widen``."""
    return dtype == torch.bfloat16 and _compat.interpreted(kernel)  # fixed when decorated, not by the variable now


def _launch_buffer(out: torch.Tensor, kernel) -> torch.Tensor:
    """The tensor ``kernel`` writes the result ``out`` into: ``out`` itself, except bf16 under the
    interpreter, which gets an fp32 twin (same strides) that :func:`_finish` rounds into ``out``. The
    interpreter's fp32 → bf16 cast truncates where the GPU's rounds to nearest even, so in-kernel
    rounding would be 1 ulp off torch's (fold is bit-exact against torch on the GPU)."""
    if _upcast(out.dtype, kernel):
        return torch.empty_like(out, dtype=torch.float32)
    return out


def _math_args(dtype: torch.dtype, kernel) -> dict:
    """Accumulator and ``tl.dot`` precision: fp32 inputs use TF32 only where torch's own matmuls
    would (``torch.set_float32_matmul_precision``); bf16 operands are upcast for ``tl.dot`` only
    when ``kernel`` runs on the interpreter (see ``_mma``)."""
    fp64 = dtype == torch.float64
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return {"FP64": fp64, "PRECISION": "tf32" if tf32 else "ieee",
            "UPCAST": _upcast(dtype, kernel), "ACC_DTYPE": _acc_dtype(dtype)}


def _finish(out: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``out`` after the kernel wrote ``buf`` (see :func:`_launch_buffer`); ``copy_`` rounds to nearest even."""
    if buf is not out:
        out.copy_(buf)
    return out


def _num_candidates(g: _shapes.Geometry, lead: int) -> tuple[int, int, int]:
    """How many padded positions can read one input index, per dim (see ``_padded_candidate``)."""
    if g.padding_mode == "zeros":
        per = [1] * g.ndim
    elif g.padding_mode in ("circular", "reflect"):
        per = [3 if lo + hi > 0 else 1 for lo, hi in zip(g.pad_lo, g.pad_hi)]
    else:
        per = [1 + lo + hi for lo, hi in zip(g.pad_lo, g.pad_hi)]
    return (1,) * lead + tuple(per)


def _index_fits(xs: torch.Tensor, a: dict, first: int) -> bool:
    """Whether a gather's index math over ``xs`` (a kernel's 5-d view, :func:`_as_5d`) below dim ``first`` may be
    int32: every index value it forms and the farthest element it reads past the base of dims ``< first`` (2: one
    (sample, channel) plane; 1: a sample's channels too) below 2^31, so that every offset it reads fits (a masked
    lane's offset may wrap: it is never read). The index values, per dim (``a``: :func:`_as_3d`'s geometry): a
    position's padded index ``o·S - lo + k·D`` (the transposed gather's ``o + lo - k·D``), circular's shift by
    ``n`` and reflect's ``2(n-1) - i`` stay within ``(O-1)·S + |lo| + (K-1)·D + 2n`` in magnitude."""
    reach = sum(max(n - 1, 0) * s for n, s in zip(xs.shape[first:], xs.stride()[first:]))
    index = max((o - 1) * s + abs(lo) + (k - 1) * d + 2 * n
                for n, o, k, s, lo, d in zip(a["in"], a["out"], a["k"], a["s"], a["lo"], a["d"]))
    return max(reach, index) < 2**31


def _batch_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[N, C, D, H, W]`` (a kernel's 5-d view) with the batch innermost (stride 1), for a per-position
    GEMM whose batch is an MMA dim (local_conv): ``t`` itself when it is, when the batch is too small to fill a
    16-byte vector, or when ``t`` is empty; else a batch-last copy (one read and one write of ``t``, and its size in
    memory while the kernel runs). A patch row of one position is then ``N`` contiguous elements: 16-byte
    ``cp.async`` for the patch tile, not one 16-bit load with its own address per element."""
    if t.shape[0] * t.element_size() < 16 or t.stride(0) == 1 or t.numel() == 0:
        return t
    return t.permute(1, 2, 3, 4, 0).contiguous().permute(4, 0, 1, 2, 3)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[N, C, D, H, W]`` (a kernel's 5-d view, see :func:`_as_5d`) with the channels innermost (stride
    1): ``t`` itself when they are (or C ≤ 1), else a channels-last copy (one read and one write of ``t``, and
    its size in memory while the kernel runs), for an implicit-GEMM gather that reads a tap's channels as
    contiguous vectors (masked_conv's tap walk): a channels-first gather is one 16-bit load, with its own
    64-bit address, per element, which capped masked_conv's forward hot loop at ~0.37 of the tensor cores'
    peak (the static report, fp16 conv3_x), against 1.0 for the vector gather. Pass channels-last input
    (``torch.channels_last`` / ``channels_last_3d``) to skip it."""
    if t.shape[1] <= 1 or t.stride(1) == 1:
        return t
    return t.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)


# ----------------------------------------------------------------------------------------------
# the gathers' tile orientation: Triton's coalescing pass, where it proves no contiguity in either dim of a
# gather's addresses, lays the threads along dim 0 up to triton 3.7 and along the last dim from 3.8 (static sm_90
# report: local_conv's forward patch tile, unfold's gather); those gathers hold their tiles by it so that the dim
# they want the threads along wins
_TIES_TO_LAST_DIM = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 8)


# ----------------------------------------------------------------------------------------------
# the split reductions' host side (patch_covariance, ekfac: SPLIT programs per output tile, each writing a
# partial into a workspace that the launcher sums in a fixed order; no atomics, deterministic)
_SMS = 132  # the heuristics' GPU: an H100 SXM (tuned tables pick tiles and SPLIT for other GPUs)
_MAX_GRID_YZ = 65535  # CUDA's limit on grid dims 1 and 2


def _pair_walk(channels: int, taps: int, block: int) -> tuple[int, int, int, int]:
    """A patch-row walk in (tap, channel block) pairs (patch_covariance, ekfac; see :func:`_tap_pairs`) of
    ``channels`` per group and ``taps`` taps in steps of ``block`` rows: ``(BLOCK_C, TC, TQ, steps)``, the
    channels per pair (the group's to a power of two, at most ``block``), the pairs per tap, the pairs
    (``taps·TC``) and the steps (``block / BLOCK_C`` pairs each)."""
    bc = min(block, triton.next_power_of_2(max(channels, 1)))
    tc = -(-channels // bc)
    return bc, tc, taps * tc, -(-(taps * tc) // (block // bc))


def _fit(v: int, lo: int, hi: int) -> int:
    """``v`` rounded up to a power of two, clamped to ``[lo, hi]`` (``tl.dot`` needs tiles ≥ 16)."""
    return max(lo, min(hi, autotune.bucket(v)))


def _split_count(tiles: int, most: int) -> int:
    """Programs per output tile for ``tiles`` tiles: enough for two programs per SM, at most ``most`` (rounded
    down to a power of two: each share must keep enough work to pay for its partial) and 64."""
    want = autotune.bucket(-(-2 * _SMS // tiles))
    return max(1, min(want, 1 << (max(1, most).bit_length() - 1), 64))


def _group_slices(groups: int):
    """``(g0, ng)``: the channel groups in launches of at most ``_MAX_GRID_YZ`` (a grid dim 1 or 2 limit a
    depthwise layer may pass), each on its slices of the tensors."""
    for g0 in range(0, groups, _MAX_GRID_YZ):
        yield g0, min(_MAX_GRID_YZ, groups - g0)


def _split_workspace(target: torch.Tensor, split: int) -> torch.Tensor:
    """Where a split kernel writes ``target``'s partials: ``target`` itself as ``[1, ...]`` (no split), else a
    ``[split, ...]`` workspace of its shape and dtype."""
    if split == 1:
        return target[None]
    return torch.empty((split, *target.shape), device=target.device, dtype=target.dtype)


def _sum_partials(work: torch.Tensor, target: torch.Tensor, read_out: bool = False, alpha: float = 0.0,
                  coef: float = 1.0) -> None:
    """``target ← coef·Σ_s work[s]`` (``+ alpha·target`` when ``read_out``), the partials summed in a fixed
    order: deterministic (after a split launch: without one the kernel wrote, scaled and blended ``target``
    itself, see ``_split_workspace``)."""
    total = work.sum(0)
    if read_out:
        target.mul_(alpha).add_(total, alpha=coef)
    else:
        torch.mul(total, coef, out=target)


def _conv_geometry_3d(x: torch.Tensor, kernel_size, stride, padding, output_padding, dilation, padding_mode: str,
                      transposed: bool, groups: int, bias: bool) -> dict:
    """A (transposed) convolution's geometry on ``x`` as 3-d kernel arguments, for the patch statistic kernels
    that gather its patches with ``_tap_sources`` (``p``: the low padding, or the transposed padding; ``mode``: 0
    when transposed; ``L`` positions, ``K`` taps, ``ndim`` spatial dims), and their sizes: ``CG`` channels per
    group, ``D = CG·K`` patch rows, ``DP = D + bias``, ``acc`` the accumulator dtype. Checks the geometry, then
    the device.

    ``padding`` is the flat ``[lo_0, hi_0, ...]`` list of a convolution, or the per-dim symmetric padding of a
    transposed one (``transposed=True``, with ``output_padding``; ``padding_mode`` must then be ``'zeros'``).

    Raises:
        ValueError / TypeError: bad geometry (see :func:`convzoo._shapes.geometry` and
            :func:`convzoo._shapes.transpose_geometry`) or a device the kernels cannot run on.
    """
    if transposed:
        g = _shapes.transpose_geometry(list(x.shape[2:]), kernel_size, stride, padding, output_padding, dilation)
        lo, mode, num = g.padding, 0, g.num_positions
    else:
        g = _shapes.geometry(list(x.shape[2:]), kernel_size, dilation, padding, stride, padding_mode)
        lo, mode, num = g.pad_lo, _shapes.PADDING_MODE_CODES[padding_mode], g.num_blocks
    _check_device(x)
    cg = x.shape[1] // groups
    return {"in": _pad3(g.in_size, 1), "out": _pad3(g.out_size, 1), "k": _pad3(g.kernel_size, 1),
            "s": _pad3(g.stride, 1), "p": _pad3(lo, 0), "d": _pad3(g.dilation, 1), "mode": mode, "L": num,
            "transposed": transposed, "K": g.kernel_numel, "ndim": g.ndim, "CG": cg, "D": cg * g.kernel_numel,
            "DP": cg * g.kernel_numel + int(bias), "acc": torch.float64 if x.dtype == torch.float64 else torch.float32}


def _layer_conv_args(layer) -> dict:
    """A tuning grid layer's geometry as the keyword arguments of the statistic launchers (no output padding)."""
    kernel, dil, pad, stride, mode = layer.geometry()
    return {"kernel_size": kernel, "stride": stride, "padding": pad, "output_padding": [0] * layer.ndim,
            "dilation": dil, "padding_mode": mode}
