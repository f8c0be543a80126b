"""extract_patches (unfold's patches in curvlinops' ``[N, L, C/groups·∏K]`` layout, the channel groups
averaged) for 1-, 2- and 3-d inputs: a Triton gather kernel and its launcher, and the launcher of its
adjoint (a fold, then the groups broadcast back).

Like :mod:`convzoo.kernels.unfold`, the kernel sees every input as 3-d (a 1-d or 2-d call gets leading
spatial dims of size 1 with kernel 1, stride 1, dilation 1, no padding) and the whole batch is one launch.
Padding modes are folded into the index math: no padded copy of the input, no group-mean copy, no
unfold + transpose copy; each output entry is written once, in its final place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from convzoo import _shapes, autotune, reference
from convzoo.autotune import Config, KernelSpec, TuneProblem
from convzoo.kernels import _common as cm
from convzoo.kernels import unfold as _unfold_kernels

__all__ = ["extract_patches", "extract_patches_backward"]


@triton.jit
def extract_patches_kernel(
    # output: [N, L, CG·∏KS], contiguous
    out_ptr,
    # input: [N, G*CG, ID, IH, IW], any strides
    x_ptr,
    # runtime sizes: R = N*L rows, D = CG·∏KS entries per row, G groups of CG channels, L = OD*OH*OW
    R, D, G, CG, ID, IH, IW, OD, OH, OW, L,
    stride_xn, stride_xc, stride_xd, stride_xh, stride_xw,
    # geometry (LO: the low paddings; the padding modes need no high ones)
    KS: tl.constexpr, ST: tl.constexpr, LO: tl.constexpr, DIL: tl.constexpr,
    MODE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Patch gather with the channel groups averaged:
    ``out[n, (od, oh, ow), (c, kd, kh, kw)] = (1/G)·Σ_g x[n, g·CG + c, od·ST[0] - LO[0] + kd·DIL[0], ...]``
    (each index mapped by the padding mode; 0 where ``'zeros'`` padding is read).

    Roofline: memory bound. Bytes = R·D·e written + at most G·(N·CG·ID·IH·IW)·e read once (the taps and
    neighbouring positions re-read the same lines, which L2 serves); FLOPs = (G - 1)·R·D adds + R·D
    divides, ≤ 1 per element read. The bench reports GB/s = (R·D + N·G·CG·ID·IH·IW)·e / t against the
    measured copy bandwidth. Each program writes a BLOCK_R (n, position) rows × BLOCK_D tile, contiguous
    along D (coalesced stores); along a row, consecutive kw taps read consecutive input columns when
    DW == 1. The group sum is in fp32 (fp64 for fp64) and divided with round-to-nearest (``div_rn``, as
    torch's mean), so G = 1 is an exact copy in every dtype.
    """
    # program id -> tile: offsets (int64; row = n*L + l, col = c*K + k) and masks
    rows, cols, row_ok, col_ok = cm._tile_offsets(R, D, BLOCK_R, BLOCK_D)
    n = rows // L
    blk = rows % L
    od, oh, ow = cm._position_coords(blk, OH, OW)
    k = cols % cm._taps(KS)
    c = cols // cm._taps(KS)
    kd, kh, kw = cm._tap_coords(k, KS[1], KS[2])

    # per dim, not _tap_sources: the tile mask first in the mask (as unfold_kernel's) keeps the registers down
    i_d, ok_d = cm._tap_source(od[:, None], kd[None, :], ID, LO[0], ST[0], DIL[0], MODE, False)
    i_h, ok_h = cm._tap_source(oh[:, None], kh[None, :], IH, LO[1], ST[1], DIL[1], MODE, False)
    i_w, ok_w = cm._tap_source(ow[:, None], kw[None, :], IW, LO[2], ST[2], DIL[2], MODE, False)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    ok = tile_ok & ok_d & ok_h & ok_w
    src = (x_ptr + (n * stride_xn)[:, None] + (c * stride_xc)[None, :]
           + i_d * stride_xd + i_h * stride_xh + i_w * stride_xw)

    # loop over the channel groups, fp32 (fp64) accumulation
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC_DTYPE)
    for g in range(G):
        # loop indices are int32: g · CG · stride_xc passes 2^31 with the channels
        group = tl.cast(g, tl.int64) * CG
        vals = tl.load(src + group * stride_xc, mask=ok, other=0)
        acc += cm._widen(vals, ACC_DTYPE, UPCAST)
    if acc.dtype == tl.float64:  # fp64 division is IEEE round-to-nearest already (div_rn is fp32 only)
        acc = acc / tl.cast(G, ACC_DTYPE)
    else:  # fp32 `/` may be approximate on a GPU
        acc = tl.math.div_rn(acc, tl.cast(G, ACC_DTYPE))

    tl.store(out_ptr + rows[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------------------------
# configs: the tile shapes of the gather kernels (kernels._common), rows × a contiguous inner dim D
def _default(dims, dtype, interpret: bool) -> Config:
    """The heuristic (dims R = N·L rows, D contiguous entries per row)."""
    # the group loop keeps an fp32 accumulator tile live (as fold's tap loop): 1024 elements = 8 registers
    # per thread at 4 warps, beside the three index tiles
    br, bd = cm._tile_default(dims["R"], dims["D"], interpret, inner_cap=128, tile=1024)
    return Config({"BLOCK_R": br, "BLOCK_D": bd}, num_warps=4, num_stages=1)


def _problem(layer, dtype, device) -> TuneProblem:
    g, geom = layer.resolved(), layer.geometry()
    groups = 2 if layer.c % 2 == 0 else 1  # the group loop runs; its count does not change the best tile
    return cm._random_problem({"R": layer.n * g.num_blocks, "D": layer.c // groups * g.kernel_numel},
                              (layer.n, layer.c, *layer.size), dtype, device,
                              lambda x, cfg: extract_patches(x, *geom, groups, config=cfg),
                              lambda x: reference.extract_patches(x, *geom, groups))


EXTRACT_PATCHES_SPEC = autotune.register(KernelSpec(
    "extract_patches", extract_patches_kernel, ("R", "D"), _default, cm._candidates("BLOCK_R", "BLOCK_D"),
    _problem, cm._space("BLOCK_R", "BLOCK_D")))


# ----------------------------------------------------------------------------------------------
# launchers
def extract_patches(x: torch.Tensor, kernel_size: list[int], dilation: list[int], padding: list[int],
                    stride: list[int], padding_mode: str, groups: int, config: Config | None = None) -> torch.Tensor:
    """The patches of ``x`` ``[N, C, *spatial]`` with the ``groups`` channel groups averaged, as
    ``[N, L, C/groups·∏K]`` (contiguous), one launch.

    ``config`` overrides the autotune lookup (tests use it to run every tile shape).

    Raises:
        ValueError / TypeError: bad arguments (see :func:`convzoo._shapes.extract_patches_geometry`), a device
            the kernels cannot run on, or ``'replicate'`` padding of an empty dim.
    """
    # (1) check
    g = _shapes.extract_patches_geometry(x, kernel_size, dilation, padding, stride, padding_mode, groups)
    cm._check_device(x)
    # (2) allocate; nothing to launch for an empty result (N, C = 0); an empty input dim (zero padding only)
    # reads nothing, so its patches are zeros, as the kernel writes
    out = x.new_empty(_shapes.extract_patches_out_shape(x, g, groups))
    if out.numel() == 0:
        return out
    buf = cm._launch_buffer(out, extract_patches_kernel)
    # (3) look up config and launch
    a = cm._as_3d(g)
    rows, D = out.shape[0] * out.shape[1], out.shape[2]
    cfg, grid = cm._tile_grid("extract_patches", x, rows, config, D=D)
    xs = cm._as_5d(x, g.ndim)
    with cm._device(x):
        extract_patches_kernel[grid](
            buf, xs,
            rows, D, groups, x.shape[1] // groups, *a["in"], *a["out"], g.num_blocks,
            *xs.stride(),
            a["k"], a["s"], a["lo"], a["d"],
            _shapes.PADDING_MODE_CODES[g.padding_mode],
            cm._acc_dtype(x.dtype), cm._upcast(x.dtype, extract_patches_kernel),
            **cfg.launch_kwargs(),
        )
    return cm._finish(out, buf)


def extract_patches_backward(grad: torch.Tensor, input_size: list[int], kernel_size: list[int],
                             dilation: list[int], padding: list[int], stride: list[int], padding_mode: str,
                             groups: int) -> torch.Tensor:
    """The adjoint of :func:`extract_patches`: ``grad`` ``[N, L, C/groups·∏K]`` → ``[N, C, *input_size]``
    (contiguous), ``dx[n, g·C/groups + c] = fold(grad.transpose(1, 2))[n, c] / groups`` for every group g.

    One fold launch reading ``grad`` through its strides (no transposing copy), then the division and the
    broadcast to the groups in torch (for fp16/bf16 with a ``groups`` that is not a power of two the
    division rounds a second time: ≤ 1 ulp).

    Raises:
        ValueError / TypeError: bad arguments (see
            :func:`convzoo._shapes.extract_patches_backward_geometry`) or a device the kernels cannot run on.
    """
    g = _shapes.extract_patches_backward_geometry(grad, input_size, kernel_size, dilation, padding, stride,
                                                  padding_mode, groups)
    cm._check_device(grad)
    folded = _unfold_kernels.fold(grad.transpose(1, 2), list(input_size), kernel_size, dilation, padding, stride,
                                  padding_mode)
    return reference.broadcast_groups(folded, groups, _shapes.extract_patches_backward_out_shape(grad, g, groups))
