"""unfold (im2col) and fold (col2im) for 1-, 2- and 3-d inputs: Triton kernels and launchers.

Both kernels see every input as 3-d: a 1-d or 2-d call gets leading spatial dims of size 1 with
kernel 1, stride 1, dilation 1 and no padding, so one kernel serves all ranks. The whole batch is
one launch. Padding modes are folded into the index math: no padded copy of the input is made.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from convzoo import _shapes, autotune, reference
from convzoo.autotune import Config, KernelSpec, TuneProblem
from convzoo.kernels import _common as cm

__all__ = ["fold", "unfold"]


@triton.jit
def unfold_kernel(
    # output: [N, C·∏KS, L], contiguous
    out_ptr,
    # input: [N, C, ID, IH, IW], any strides
    x_ptr,
    # runtime sizes: R = N·C·∏KS rows, L = OD·OH·OW blocks
    R, C, ID, IH, IW, OD, OH, OW, L,
    stride_xn, stride_xc, stride_xd, stride_xh, stride_xw,
    # geometry
    KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, DIL: tl.constexpr,
    MODE: tl.constexpr, TRANSPOSED: tl.constexpr,
    # R, L, every index value and every input offset within one (sample, channel) plane below 2^31 (the launcher's
    # _narrow): the per-row, per-position and in-plane index math in int32
    NARROW: tl.constexpr,
    # the tile held positions × rows (else rows × positions): whichever makes the threads lie along the positions
    POS_FIRST: tl.constexpr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """im2col gather: ``out[n, (c, kd, kh, kw), (od, oh, ow)] = x[n, c, od·ST[0] - LO[0] + kd·DIL[0], ...]``.

    ``TRANSPOSED``: unfold_transpose's gather instead (the patches a transposed convolution sees; LO its
    symmetric padding, ``MODE`` unused): ``x[n, c, i_d, ...]`` with ``od = i_d·ST[0] - LO[0] + kd·DIL[0]``
    (and alike per dim), 0 where no input index lands there. With stride S only 1/∏S of those entries read anything, so
    that gather is bound by its stores.

    Roofline: pure data movement. Bytes = R·L·e written + at most the input read (neighbouring
    taps re-read the same lines, which L2 serves), e = element size; 0 FLOPs. Memory bound: the
    bench reports GB/s = (R·L + N·C·ID·IH·IW)·e / t against the measured copy bandwidth.
    Each program writes BLOCK_R rows × BLOCK_L positions (held either way round, ``POS_FIRST``, so that the threads
    lie along the positions), contiguous along L (coalesced 16-byte stores where L allows); for a row, consecutive L
    read consecutive input columns when SW == 1 (coalesced loads).
    """
    # program id -> tile: offsets (int64, int32 where NARROW; row = (n*C + c)*K + k) and masks. The coalescing pass
    # proves no contiguity in either dim of the gather's addresses and lays the threads by its tie-break
    # (_common._TIES_TO_LAST_DIM); POS_FIRST (the launcher's) holds the tile so that they lie along the positions,
    # which read neighbouring input columns and store 16-byte vectors straight from the load layout (along the
    # rows, a warp read 16 taps of 2 positions and the tile went through shared memory to be stored)
    rows, blocks, row_ok, blk_ok = cm._tile_offsets(R, L, BLOCK_R, BLOCK_L)
    if NARROW:  # int32 divisions in place of int64 ones (a call each, for a runtime divisor)
        r, l = rows.to(tl.int32), blocks.to(tl.int32)
    else:
        r, l = rows, blocks
    k = r % cm._taps(KS)
    nc = r // cm._taps(KS)
    c = nc % C
    n = nc // C
    kd, kh, kw = cm._tap_coords(k, KS[1], KS[2])
    od, oh, ow = cm._position_coords(l, OH, OW)
    # the input index each (position, tap) reads, per dim (TRANSPOSED: the one that reaches it, if any); per dim,
    # not _tap_sources: the tile mask first in the load's mask keeps fp32 at 52 registers, not 66 (cifar_conv2)
    od, kd = _axes(od, kd, POS_FIRST)
    oh, kh = _axes(oh, kh, POS_FIRST)
    ow, kw = _axes(ow, kw, POS_FIRST)
    i_d, ok_d = cm._tap_source(od, kd, ID, LO[0], ST[0], DIL[0], MODE, TRANSPOSED)
    i_h, ok_h = cm._tap_source(oh, kh, IH, LO[1], ST[1], DIL[1], MODE, TRANSPOSED)
    i_w, ok_w = cm._tap_source(ow, kw, IW, LO[2], ST[2], DIL[2], MODE, TRANSPOSED)
    blk_ok, row_ok = _axes(blk_ok, row_ok, POS_FIRST)
    tile_ok = blk_ok & row_ok

    # the (sample, channel) plane's offset in int64; the offset within it in int32 where NARROW says it fits
    if NARROW:
        sd, sh, sw = tl.cast(stride_xd, tl.int32), tl.cast(stride_xh, tl.int32), tl.cast(stride_xw, tl.int32)
    else:
        sd, sh, sw = tl.cast(stride_xd, tl.int64), tl.cast(stride_xh, tl.int64), tl.cast(stride_xw, tl.int64)
    pos, plane = _axes(l, n.to(tl.int64) * stride_xn + c.to(tl.int64) * stride_xc, POS_FIRST)
    vals = tl.load(x_ptr + plane + (i_d * sd + i_h * sh + i_w * sw), mask=tile_ok & ok_d & ok_h & ok_w, other=0)
    _, row_base = _axes(l, rows * L, POS_FIRST)
    tl.store(out_ptr + row_base + pos, vals, mask=tile_ok)


@triton.jit
def _axes(pos, row, POS_FIRST: tl.constexpr):
    """A per-position and a per-row vector as the tile's two axes: positions × rows (``POS_FIRST``) or rows ×
    positions."""
    if POS_FIRST:
        p, r = pos[:, None], row[None, :]
    else:
        p, r = pos[None, :], row[:, None]
    return p, r


@triton.jit
def fold_kernel(
    # output: [N, C, ID, IH, IW], contiguous
    out_ptr,
    # input (the columns): [N, C·∏KS, L], any strides
    cols_ptr,
    # runtime sizes: R = N*C rows, P = ID*IH*IW pixels
    R, C, ID, IH, IW, OD, OH, OW, P,
    stride_cn, stride_ck, stride_cl,
    # geometry (per-dim (d, h, w) tuples, see _common): LO the low paddings, HI the high ones
    KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, DIL: tl.constexpr,
    MODE: tl.constexpr, TRANSPOSED: tl.constexpr,
    # padded positions that can read one input index, per dim (1 for 'zeros')
    NC: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """col2im as a gather: each output pixel sums, in a fixed order, every column entry that
    unfold would have copied from it. Deterministic: no atomics.

    ``TRANSPOSED``: the adjoint of unfold_transpose (``unfold_kernel`` with ``TRANSPOSED``; LO its symmetric
    padding, HI 0, ``MODE`` 0 and NC 1 per dim) instead: input pixel ``i`` sums, over the taps in a fixed order, the
    column entry at ``o = i·S - P + t·D`` when it lies in the output. Each column entry is then read at most
    once (a (t, o) pair has at most one i): ≤ R·K·P entries read.

    Roofline: reads R·K·L column entries (each once) and writes R·P pixels; R·K·L adds.
    Memory bound (≤ 1 add per element read): GB/s = (R·K·L + R·P)·e / t vs the copy bandwidth.
    Tiles are BLOCK_R (n, c) rows × BLOCK_P pixels, contiguous along the pixels (coalesced stores).
    """
    # program id -> tile: offsets (int64; row = n*C + c) and masks
    rows, pix, row_ok, pix_ok = cm._tile_offsets(R, P, BLOCK_R, BLOCK_P)
    n = rows // C
    c = rows % C
    row_base = n * stride_cn + c * cm._taps(KS) * stride_ck
    i_d, ih, iw = cm._position_coords(pix, IH, IW)

    # loop over every (padded position, tap) pair that can read this pixel, fp32 (fp64) accumulation
    acc = tl.zeros([BLOCK_R, BLOCK_P], dtype=ACC_DTYPE)
    for jd in range(NC[0]):
        for jh in range(NC[1]):
            for jw in range(NC[2]):
                pd, ph, pw, cand = cm._padded_candidates(i_d, ih, iw, jd, jh, jw, ID, IH, IW, LO, HI, MODE)
                for kd in range(KS[0]):
                    ld, ok_d = cm._tap_target(pd, LO[0], kd, OD, ST[0], DIL[0], TRANSPOSED)
                    for kh in range(KS[1]):
                        lh, ok_h = cm._tap_target(ph, LO[1], kh, OH, ST[1], DIL[1], TRANSPOSED)
                        for kw in range(KS[2]):
                            lw, ok_w = cm._tap_target(pw, LO[2], kw, OW, ST[2], DIL[2], TRANSPOSED)
                            ok = cand & ok_d & ok_h & ok_w & pix_ok
                            blk = (ld * OH + lh) * OW + lw
                            # loop indices are int32: tap · stride_ck passes 2^31 once (K-1)·L does
                            tap = tl.cast((kd * KS[1] + kh) * KS[2] + kw, tl.int64)
                            src = (cols_ptr + (row_base + tap * stride_ck)[:, None]
                                   + blk.to(tl.int64)[None, :] * stride_cl)
                            vals = tl.load(src, mask=row_ok[:, None] & ok[None, :], other=0)
                            acc += cm._widen(vals, ACC_DTYPE, UPCAST)

    out = out_ptr + rows[:, None] * P + pix[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & pix_ok[None, :])


# ----------------------------------------------------------------------------------------------
# configs
def _unfold_problem(layer, dtype, device) -> TuneProblem:
    g, geom = layer.resolved(), layer.geometry()
    return cm._random_problem({"R": layer.n * layer.c * g.kernel_numel, "L": g.num_blocks},
                              (layer.n, layer.c, *layer.size), dtype, device,
                              lambda x, cfg: unfold(x, *geom, config=cfg), lambda x: reference.unfold(x, *geom),
                              exact=True)


def _fold_problem(layer, dtype, device) -> TuneProblem:
    g, geom, size = layer.resolved(), layer.geometry(), list(layer.size)
    return cm._random_problem({"R": layer.n * layer.c, "P": math.prod(size)},
                              (layer.n, layer.c * g.kernel_numel, g.num_blocks), dtype, device,
                              lambda cols, cfg: fold(cols, size, *geom, config=cfg),
                              lambda cols: reference.fold(cols, size, *geom))


UNFOLD_SPEC = autotune.register(KernelSpec(
    "unfold", unfold_kernel, ("R", "L"), cm._gather_default, cm._candidates("BLOCK_R", "BLOCK_L"), _unfold_problem,
    cm._space("BLOCK_R", "BLOCK_L")))
FOLD_SPEC = autotune.register(KernelSpec(
    "fold", fold_kernel, ("R", "P"), cm._reduce_gather_default, cm._candidates("BLOCK_R", "BLOCK_P"), _fold_problem,
    cm._space("BLOCK_R", "BLOCK_P")))


# ----------------------------------------------------------------------------------------------
# launchers
def unfold(x: torch.Tensor, kernel_size: list[int], dilation: list[int], padding: list[int],
           stride: list[int], padding_mode: str = "zeros", config: Config | None = None) -> torch.Tensor:
    """im2col of ``x`` ``[N, C, *spatial]`` → ``[N, C·∏K, L]`` (contiguous), one launch.

    ``config`` overrides the autotune lookup (tests use it to run every tile shape).

    Raises:
        ValueError / TypeError: bad arguments (see :func:`convzoo._shapes.unfold_geometry`), a device the
            kernels cannot run on, or ``'replicate'`` padding of an empty dim.
    """
    # (1) check
    g = _shapes.unfold_geometry(x, kernel_size, dilation, padding, stride, padding_mode)
    cm._check_device(x)
    # (2) allocate; nothing to launch for an empty result (N, C = 0); an empty input dim (zero
    # padding only: _shapes.geometry refuses it for replicate) reads nothing, so its columns are zeros,
    # as the kernel writes
    out = x.new_empty(_shapes.unfold_out_shape(x, g))
    if out.numel() == 0:
        return out
    # (3) look up config and launch
    return _launch_unfold("unfold", cm._as_5d(x, g.ndim), out, cm._as_3d(g), _shapes.PADDING_MODE_CODES[g.padding_mode],
                          False, config)


def _launch_unfold(name: str, xs: torch.Tensor, out: torch.Tensor, a: dict, mode: int, transposed: bool,
                   config: Config | None) -> torch.Tensor:
    """``unfold_kernel`` (the autotune entry ``name``'s config) from ``xs`` (the 5-d view, :func:`_as_5d`) into
    ``out`` ``[N, C·∏K, L]``, for the 3-d geometry ``a`` (:func:`_as_3d`'s keys): unfold's, or ``transposed``
    unfold_transpose's (``lo`` its padding, ``mode`` unused)."""
    rows, L = out.shape[0] * out.shape[1], out.shape[2]
    cfg, grid = cm._tile_grid(name, xs, rows, config, L=L)
    with cm._device(xs):
        unfold_kernel[grid](
            out, xs,
            rows, xs.shape[1], *a["in"], *a["out"], L,
            *xs.stride(),
            a["k"], a["s"], a["lo"], a["d"],
            mode, transposed, _narrow(xs, rows, L, a), not cm._TIES_TO_LAST_DIM,
            **cfg.launch_kwargs(),
        )
    return out


def _narrow(xs: torch.Tensor, rows: int, L: int, a: dict) -> bool:
    """Whether ``unfold_kernel`` may take its row, position and in-plane index math in int32 (rows and positions
    below 2^31, and :func:`_common._index_fits` for one (sample, channel) plane of ``xs``)."""
    return max(rows, L) < 2**31 and cm._index_fits(xs, a, first=2)


def fold(cols: torch.Tensor, output_size: list[int], kernel_size: list[int], dilation: list[int],
         padding: list[int], stride: list[int], padding_mode: str = "zeros",
         config: Config | None = None) -> torch.Tensor:
    """col2im of ``cols`` ``[N, C·∏K, L]`` → ``[N, C, *output_size]`` (contiguous), one launch, no atomics.

    Raises:
        ValueError / TypeError: bad arguments (see :func:`convzoo._shapes.fold_geometry`) or a device the
            kernels cannot run on.
    """
    # (1) check
    g = _shapes.fold_geometry(cols, output_size, kernel_size, dilation, padding, stride, padding_mode)
    cm._check_device(cols)
    # (2) allocate; nothing to launch for an empty result (N, C or an output dim = 0). L >= 1 always.
    out = cols.new_empty(_shapes.fold_out_shape(cols, g))
    if out.numel() == 0:
        return out
    # (3) look up config and launch
    return _launch_fold("fold", cols, out, cm._as_3d(g), _shapes.PADDING_MODE_CODES[g.padding_mode], False,
                        cm._num_candidates(g, 3 - g.ndim), config)


def _launch_fold(name: str, cols: torch.Tensor, out: torch.Tensor, a: dict, mode: int, transposed: bool,
                 candidates: tuple[int, int, int], config: Config | None) -> torch.Tensor:
    """``fold_kernel`` (the autotune entry ``name``'s config) from ``cols`` ``[N, C·∏K, L]`` into ``out``
    ``[N, C, *in]``, for the 3-d geometry ``a`` (:func:`_as_3d`'s keys) and ``candidates`` padded positions per
    dim (:func:`_num_candidates`): fold's, or ``transposed`` unfold_transpose's adjoint (``lo`` its padding,
    ``hi`` 0, ``mode`` 0, one candidate)."""
    buf = cm._launch_buffer(out, fold_kernel)
    rows, P = out.shape[0] * out.shape[1], math.prod(out.shape[2:])
    cfg, grid = cm._tile_grid(name, cols, rows, config, P=P)
    with cm._device(cols):
        fold_kernel[grid](
            buf, cols,
            rows, out.shape[1], *a["in"], *a["out"], P,
            *cols.stride(),
            a["k"], a["s"], a["lo"], a["hi"], a["d"],
            mode, transposed, candidates,
            cm._acc_dtype(cols.dtype), cm._upcast(cols.dtype, fold_kernel),
            **cfg.launch_kwargs(),
        )
    return cm._finish(out, buf)
