"""unfold_transpose (the patches a transposed convolution sees) and its adjoint, for 1-, 2- and 3-d
inputs: Triton kernels and launchers.

Like :mod:`convzoo.kernels.unfold`, both kernels see every input as 3-d (a 1-d or 2-d call gets leading
spatial dims of size 1 with kernel 1, stride 1, dilation 1, no padding) and the whole batch is one
launch. Input position ``i`` reaches output position ``o = i·S - P + t·D`` through tap ``t``: the forward
gather is unfold's kernel (``unfold_kernel`` with ``TRANSPOSED``), which takes, for each ``(t, o)``, the one
``i`` (if any) with ``o + P - t·D = i·S``; the adjoint gathers,
for each ``i``, the ``(t, o)`` entries it was copied to and sums them. Both are gathers: no atomics.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from convzoo import _shapes, autotune, reference
from convzoo.autotune import Config, KernelSpec, TuneProblem
from convzoo.kernels._common import (
    _acc_dtype,
    _as_5d,
    _candidates,
    _check_device,
    _device,
    _finish,
    _gather_default,
    _launch_buffer,
    _pad3,
    _reduce_gather_default,
    _space,
    _upcast,
    _widen,
)
from convzoo.kernels.unfold import unfold_kernel

__all__ = ["unfold_transpose", "unfold_transpose_backward"]


@triton.jit
def unfold_transpose_backward_kernel(
    # output: [N, C, ID, IH, IW], contiguous
    out_ptr,
    # input (the columns): [N, C*KD*KH*KW, L], any strides
    cols_ptr,
    # runtime sizes: R = N*C rows, P = ID*IH*IW pixels
    R, C, ID, IH, IW, OD, OH, OW, P,
    stride_cn, stride_ck, stride_cl,
    # geometry
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The adjoint of unfold_transpose (``unfold_kernel`` with ``TRANSPOSED``), as a gather: input pixel ``i``
    sums, over the taps in a fixed order, the column entry at ``o = i·S - P + t·D`` when it lies in the output.
    Deterministic.

    Roofline: reads at most R·K·P column entries (each entry at most once: a (t, o) pair has at most one
    i) and writes R·P pixels; ≤ R·K·P adds, so memory bound: GB/s = (R·K·P + R·P)·e / t. Tiles are
    BLOCK_R (n, c) rows × BLOCK_P pixels, contiguous along the pixels (coalesced stores).
    """
    # program id -> tile
    pid = tl.program_id(0).to(tl.int64)
    num_p = tl.cdiv(P, BLOCK_P)
    pid_r = pid // num_p
    pid_p = pid % num_p

    # offsets and masks
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: row = n*C + c
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = rows < R
    pix_ok = pix < P
    n = rows // C
    c = rows % C
    row_base = n * stride_cn + c * (KD * KH * KW) * stride_ck
    iw = pix % IW
    ih = (pix // IW) % IH
    i_d = pix // IW // IH  # not pix // (IW * IH): an int32 product of two sizes

    # loop over the taps, fp32 (fp64) accumulation
    acc = tl.zeros([BLOCK_R, BLOCK_P], dtype=ACC_DTYPE)
    for kd in range(KD):
        od = i_d * SD - PD + kd * DD
        ok_d = (od >= 0) & (od < OD)
        for kh in range(KH):
            oh = ih * SH - PH + kh * DH
            ok_h = (oh >= 0) & (oh < OH)
            for kw in range(KW):
                ow = iw * SW - PW + kw * DW
                ok = ok_d & ok_h & (ow >= 0) & (ow < OW) & pix_ok
                blk = (od * OH + oh) * OW + ow
                # loop indices are int32: tap · stride_ck passes 2^31 once (K-1)·L does
                tap = tl.cast((kd * KH + kh) * KW + kw, tl.int64)
                src = cols_ptr + (row_base + tap * stride_ck)[:, None] + blk[None, :] * stride_cl
                vals = tl.load(src, mask=row_ok[:, None] & ok[None, :], other=0)
                acc += _widen(vals, ACC_DTYPE, UPCAST)

    out = out_ptr + rows[:, None] * P + pix[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & pix_ok[None, :])


# ----------------------------------------------------------------------------------------------
# configs: the tile shapes and heuristics of unfold/fold (the same access pattern), from kernels._common
def _layer_geometry(layer) -> tuple[list, list, list, list, list]:
    """A tuning grid layer read as a transposed convolution: its kernel, stride and (int) padding, no
    output_padding, no dilation."""
    nd = layer.ndim
    pad = layer.padding if isinstance(layer.padding, int) else 0
    return [layer.kernel] * nd, [layer.stride] * nd, [pad] * nd, [0] * nd, [1] * nd


def _forward_problem(layer, dtype, device) -> TuneProblem:
    geom = _layer_geometry(layer)
    g = _shapes.transpose_geometry(layer.size, *geom)

    def setup():
        x = torch.randn(layer.n, layer.c, *layer.size, device=device, dtype=dtype)
        return (lambda cfg: unfold_transpose(x, *geom, config=cfg)), (lambda: reference.unfold_transpose(x, *geom))

    return TuneProblem({"R": layer.n * layer.c * g.kernel_numel, "L": g.num_positions}, setup, exact=True)


def _backward_problem(layer, dtype, device) -> TuneProblem:
    geom = _layer_geometry(layer)
    g = _shapes.transpose_geometry(layer.size, *geom)

    def setup():
        cols = torch.randn(layer.n, layer.c * g.kernel_numel, g.num_positions, device=device, dtype=dtype)
        return (lambda cfg: unfold_transpose_backward(cols, list(layer.size), *geom, config=cfg),
                lambda: reference.unfold_transpose_backward(cols, list(layer.size), *geom))

    return TuneProblem({"R": layer.n * layer.c, "P": math.prod(layer.size)}, setup)


UNFOLD_TRANSPOSE_SPEC = autotune.register(KernelSpec(
    "unfold_transpose", unfold_kernel, ("R", "L"), _gather_default, _candidates("BLOCK_R", "BLOCK_L"),
    _forward_problem, _space("BLOCK_R", "BLOCK_L")))
UNFOLD_TRANSPOSE_BACKWARD_SPEC = autotune.register(KernelSpec(
    "unfold_transpose_backward", unfold_transpose_backward_kernel, ("R", "P"), _reduce_gather_default,
    _candidates("BLOCK_R", "BLOCK_P"), _backward_problem, _space("BLOCK_R", "BLOCK_P")))


# ----------------------------------------------------------------------------------------------
# launchers
def _as_3d(g: _shapes.TransposeGeometry) -> dict:
    """Geometry padded with leading unit dims to 3 spatial dims, as kernel arguments."""
    return {"in": _pad3(g.in_size, 1), "out": _pad3(g.out_size, 1), "k": _pad3(g.kernel_size, 1),
            "s": _pad3(g.stride, 1), "p": _pad3(g.padding, 0), "d": _pad3(g.dilation, 1)}


def unfold_transpose(x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                     output_padding: list[int], dilation: list[int], config: Config | None = None) -> torch.Tensor:
    """Transposed im2col of ``x`` ``[N, C, *spatial]`` → ``[N, C·∏K, ∏out]`` (contiguous), one launch.

    ``config`` overrides the autotune lookup (tests use it to run every tile shape).

    Raises:
        ValueError / TypeError: bad arguments (see :func:`convzoo._shapes.transpose_geometry`) or a device
            the kernels cannot run on.
    """
    # (1) check
    g = _shapes.unfold_transpose_geometry(x, kernel_size, stride, padding, output_padding, dilation)
    _check_device(x)
    # (2) allocate; nothing to launch for an empty result (N or C = 0); an empty input dim reads nothing
    # (every load is masked off), so its columns are zeros, as the kernel writes
    out = x.new_empty(_shapes.unfold_transpose_out_shape(x, g))
    if out.numel() == 0:
        return out
    # (3) look up config and launch
    a = _as_3d(g)
    rows, L = out.shape[0] * out.shape[1], out.shape[2]
    cfg = config or autotune.lookup("unfold_transpose", x.device, x.dtype, R=rows, L=L)
    xs = _as_5d(x, g.ndim)
    grid = (triton.cdiv(rows, cfg.meta["BLOCK_R"]) * triton.cdiv(L, cfg.meta["BLOCK_L"]),)
    with _device(x):
        unfold_kernel[grid](
            out, xs,
            rows, x.shape[1], *a["in"], *a["out"], L,
            *xs.stride(),
            *a["k"], *a["s"], *a["p"], *a["d"],
            0, True,  # MODE (unused), TRANSPOSED
            **cfg.launch_kwargs(),
        )
    return out


def unfold_transpose_backward(cols: torch.Tensor, input_size: list[int], kernel_size: list[int], stride: list[int],
                              padding: list[int], output_padding: list[int], dilation: list[int],
                              config: Config | None = None) -> torch.Tensor:
    """The adjoint of :func:`unfold_transpose`: ``cols`` ``[N, C·∏K, ∏out]`` → ``[N, C, *input_size]``
    (contiguous), one launch, no atomics.

    Raises:
        ValueError / TypeError: bad arguments (see
            :func:`convzoo._shapes.unfold_transpose_backward_geometry`) or a device the kernels cannot run on.
    """
    # (1) check
    g = _shapes.unfold_transpose_backward_geometry(cols, input_size, kernel_size, stride, padding, output_padding,
                                                   dilation)
    _check_device(cols)
    # (2) allocate; nothing to launch for an empty result (N, C or an input dim = 0)
    out = cols.new_empty(_shapes.unfold_transpose_backward_out_shape(cols, g))
    if out.numel() == 0:
        return out
    buf = _launch_buffer(out, unfold_transpose_backward_kernel)
    # (3) look up config and launch
    a = _as_3d(g)
    rows, P = out.shape[0] * out.shape[1], math.prod(g.in_size)
    cfg = config or autotune.lookup("unfold_transpose_backward", cols.device, cols.dtype, R=rows, P=P)
    grid = (triton.cdiv(rows, cfg.meta["BLOCK_R"]) * triton.cdiv(P, cfg.meta["BLOCK_P"]),)
    with _device(cols):
        unfold_transpose_backward_kernel[grid](
            buf, cols,
            rows, out.shape[1], *a["in"], *a["out"], P,
            *cols.stride(),
            *a["k"], *a["s"], *a["p"], *a["d"],
            _acc_dtype(cols.dtype), _upcast(cols.dtype, unfold_transpose_backward_kernel),
            **cfg.launch_kwargs(),
        )
    return _finish(out, buf)
