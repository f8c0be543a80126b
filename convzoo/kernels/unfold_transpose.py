"""unfold_transpose (the patches a transposed convolution sees) and its adjoint, for 1-, 2- and 3-d
inputs: launchers of :mod:`convzoo.kernels.unfold`'s two Triton kernels, with the transposed geometry.

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

from convzoo import _shapes, autotune, reference
from convzoo.autotune import Config, KernelSpec, TuneProblem
from convzoo.kernels import _common as cm
from convzoo.kernels.unfold import _launch_fold, _launch_unfold, fold_kernel, unfold_kernel

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
    return cm._random_problem({"R": layer.n * layer.c * g.kernel_numel, "L": g.num_positions},
                              (layer.n, layer.c, *layer.size), dtype, device,
                              lambda x, cfg: unfold_transpose(x, *geom, config=cfg),
                              lambda x: reference.unfold_transpose(x, *geom), exact=True)


def _backward_problem(layer, dtype, device) -> TuneProblem:
    geom, size = _layer_geometry(layer), list(layer.size)
    g = _shapes.transpose_geometry(layer.size, *geom)
    return cm._random_problem({"R": layer.n * layer.c, "P": math.prod(size)},
                              (layer.n, layer.c * g.kernel_numel, g.num_positions), dtype, device,
                              lambda cols, cfg: unfold_transpose_backward(cols, size, *geom, config=cfg),
                              lambda cols: reference.unfold_transpose_backward(cols, size, *geom))


UNFOLD_TRANSPOSE_SPEC = autotune.register(KernelSpec(
    "unfold_transpose", unfold_kernel, ("R", "L"), cm._gather_default, cm._candidates("BLOCK_R", "BLOCK_L"),
    _forward_problem, cm._space("BLOCK_R", "BLOCK_L")))
UNFOLD_TRANSPOSE_BACKWARD_SPEC = autotune.register(KernelSpec(
    "unfold_transpose_backward", fold_kernel, ("R", "P"), cm._reduce_gather_default,
    cm._candidates("BLOCK_R", "BLOCK_P"), _backward_problem, cm._space("BLOCK_R", "BLOCK_P")))


# ----------------------------------------------------------------------------------------------
# launchers
def _as_3d(g: _shapes.TransposeGeometry) -> dict:
    """Geometry padded with leading unit dims to 3 spatial dims, as kernel arguments (the keys of
    :func:`convzoo.kernels._common._as_3d`: ``lo`` the padding, ``hi`` none)."""
    return {"in": cm._pad3(g.in_size, 1), "out": cm._pad3(g.out_size, 1), "k": cm._pad3(g.kernel_size, 1),
            "s": cm._pad3(g.stride, 1), "lo": cm._pad3(g.padding, 0), "hi": (0, 0, 0), "d": cm._pad3(g.dilation, 1)}


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
    cm._check_device(x)
    # (2) allocate; nothing to launch for an empty result (N or C = 0); an empty input dim reads nothing
    # (every load is masked off), so its columns are zeros, as the kernel writes
    out = x.new_empty(_shapes.unfold_transpose_out_shape(x, g))
    if out.numel() == 0:
        return out
    # (3) look up config and launch
    return _launch_unfold("unfold_transpose", cm._as_5d(x, g.ndim), out, _as_3d(g), 0, True, config)


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
    cm._check_device(cols)
    # (2) allocate; nothing to launch for an empty result (N, C or an input dim = 0)
    out = cols.new_empty(_shapes.unfold_transpose_backward_out_shape(cols, g))
    if out.numel() == 0:
        return out
    # (3) look up config and launch
    return _launch_fold("unfold_transpose_backward", cols, out, _as_3d(g), 0, True, (1, 1, 1), config)
