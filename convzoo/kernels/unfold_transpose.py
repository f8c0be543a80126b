"""unfold_transpose (the patches a transposed convolution sees) and its adjoint, for 1-, 2- and 3-d
inputs: Triton kernels and launchers.

Like :mod:`convzoo.kernels.unfold`, both kernels see every input as 3-d (a 1-d or 2-d call gets leading
spatial dims of size 1 with kernel 1, stride 1, dilation 1, no padding) and the whole batch is one
launch. Input position ``i`` reaches output position ``o = i·S - P + t·D`` through tap ``t``: the forward
gather is unfold's kernel (``unfold_kernel`` with ``TRANSPOSED``), which takes, for each ``(t, o)``, the one
``i`` (if any) with ``o + P - t·D = i·S``; the adjoint is fold's kernel (``fold_kernel`` with ``TRANSPOSED``),
which gathers, for each ``i``, the ``(t, o)`` entries it was copied to and sums them. Both are gathers: no
atomics.
"""

from __future__ import annotations

import math

import torch
import triton

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
)
from convzoo.kernels.unfold import fold_kernel, unfold_kernel

# the adjoint's kernel is fold's, with TRANSPOSED (the name stays for the imports that know it)
unfold_transpose_backward_kernel = fold_kernel

__all__ = ["unfold_transpose", "unfold_transpose_backward"]


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
    "unfold_transpose_backward", fold_kernel, ("R", "P"), _reduce_gather_default,
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
    buf = _launch_buffer(out, fold_kernel)
    # (3) look up config and launch
    a = _as_3d(g)
    rows, P = out.shape[0] * out.shape[1], math.prod(g.in_size)
    cfg = config or autotune.lookup("unfold_transpose_backward", cols.device, cols.dtype, R=rows, P=P)
    grid = (triton.cdiv(rows, cfg.meta["BLOCK_R"]) * triton.cdiv(P, cfg.meta["BLOCK_P"]),)
    with _device(cols):
        fold_kernel[grid](
            buf, cols,
            rows, out.shape[1], *a["in"], *a["out"], P,
            *cols.stride(),
            *a["k"], *a["s"], *a["p"], 0, 0, 0, *a["d"],  # high paddings: none
            0, True, 1, 1, 1,  # MODE (zeros), TRANSPOSED, one candidate per dim
            _acc_dtype(cols.dtype), _upcast(cols.dtype, fold_kernel),
            **cfg.launch_kwargs(),
        )
    return _finish(out, buf)
