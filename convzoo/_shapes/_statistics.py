"""Shape math of the patch statistics: KFAC factors (patch_covariance), extract_patches, out buffers."""

from __future__ import annotations

import torch

from convzoo._shapes._core import Geometry, _is_int, check, check_float_tensor, geometry, unfold_geometry

# ---------------------------------------------------------------------------------------------- patch_covariance
COVARIANCE_MODES = ("expand", "reduce")
GROUP_REDUCTIONS = ("blocks", "mean")


def check_groups(groups, channels: int) -> int:
    """``groups`` as a positive Python int dividing ``channels``.

    Raises:
        TypeError: ``groups`` is not an int (a bool neither).
        ValueError: ``groups`` is not positive or does not divide ``channels``.
    """
    check(_is_int(groups), lambda: f"groups must be an int, got {groups!r}", TypeError)
    groups = int(groups)
    check(groups > 0, lambda: f"groups must be positive, got {groups}")
    check(channels % groups == 0, lambda: f"groups={groups} must divide the input channels C={channels}")
    return groups


def covariance_shape(channels: int, groups: int, kernel_numel: int, bias: bool, group_mean: bool) -> tuple:
    """The factor's shape, ``[G', D', D']`` (``G' = 1`` when the groups are averaged first) with
    ``D' = C/G·∏K (+ 1 for the bias)``."""
    d = channels // groups * kernel_numel + int(bias)
    return (1 if group_mean else groups, d, d)


def check_out_buffer(out, shape: tuple, dtype: torch.dtype, device: torch.device, dtype_why: str) -> None:
    """``out`` must be the result's buffer: a tensor of exactly ``shape``, ``dtype`` (``dtype_why`` says why that
    one, in the message) and ``device`` (the input's).

    Raises:
        TypeError: ``out`` is not a tensor, or has another dtype.
        ValueError: ``out`` has another shape or device.
    """
    check(isinstance(out, torch.Tensor), lambda: f"out must be a tensor, got {type(out).__name__}", TypeError)
    check(out.dtype == dtype, lambda: f"out must be {dtype} ({dtype_why}), got {out.dtype}", TypeError)
    check(tuple(out.shape) == tuple(shape), lambda: f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    check(out.device == device, lambda: f"out must be on the input's device {device}, got {out.device}")


# ----------------------------------------------------------------------------------------------
# extract_patches: the patches of unfold, channel groups averaged, as [N, L, C/groups·∏K]
def extract_patches_geometry(x: torch.Tensor, kernel_size, dilation, padding, stride, padding_mode,
                             groups) -> Geometry:
    """Checks for ``extract_patches(x, ..., groups)``; ``x`` is ``[N, C, *spatial]``, ``groups`` divides C."""
    g = unfold_geometry(x, kernel_size, dilation, padding, stride, padding_mode)
    check_groups(groups, x.shape[1])
    return g


def extract_patches_out_shape(x: torch.Tensor, g: Geometry, groups) -> tuple:
    n, c = x.shape[:2]
    return (n, g.num_blocks, c // groups * g.kernel_numel)


def extract_patches_backward_geometry(grad: torch.Tensor, input_size, kernel_size, dilation, padding, stride,
                                      padding_mode, groups) -> Geometry:
    """Checks for ``extract_patches_backward(grad, input_size, ..., groups)``; ``grad`` is ``[N, L, C/groups·∏K]``."""
    check_float_tensor(grad, "grad")
    check(grad.dim() == 3, lambda: f"grad must be [N, L, C/groups*prod(kernel_size)], got shape {tuple(grad.shape)}")
    g = geometry(tuple(input_size), kernel_size, dilation, padding, stride, padding_mode)
    check(_is_int(groups) and groups > 0, lambda: f"groups must be a positive int, got {groups!r}")
    check(grad.shape[2] % g.kernel_numel == 0,
          lambda: f"grad.shape[2]={grad.shape[2]} is not divisible by prod(kernel_size)={g.kernel_numel}")
    check(grad.shape[1] == g.num_blocks,
          lambda: f"grad.shape[1]={grad.shape[1]} must be the number of positions L={g.num_blocks} (an output "
          f"grid of {list(g.out_size)} for input size {list(input_size)})")
    return g


def extract_patches_backward_out_shape(grad: torch.Tensor, g: Geometry, groups) -> tuple:
    return (grad.shape[0], groups * (grad.shape[2] // g.kernel_numel), *g.in_size)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range ``[first, last]`` that ``t`` (non-empty, non-negative strides) may touch."""
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size() - 1


def _self_overlapping(t: torch.Tensor) -> bool:
    """True unless each dim's stride steps past everything the smaller strides reach (a sufficient test:
    it also refuses a few exotic interleaved layouts that do not overlap)."""
    reach = 0  # the largest offset the dims of smaller strides reach
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def check_out_memory(out: torch.Tensor, **inputs: torch.Tensor) -> None:
    """``out`` must be distinct memory: no two of its elements at one address (an expanded buffer), none
    inside one of ``inputs`` (named by keyword). An in-place accumulation would otherwise read what it wrote.

    Raises:
        ValueError: ``out`` has elements that share memory, or shares memory with an input (named).
    """
    if out.numel() == 0 or out.device.type == "meta":
        return
    check(not _self_overlapping(out), lambda: f"out has elements that share memory (strides {out.stride()} for "
          f"shape {tuple(out.shape)}, an expanded view?): pass a buffer of distinct elements")
    for name, t in inputs.items():
        if t.numel():
            (a0, a1), (b0, b1) = _span(out), _span(t)
            check(a1 < b0 or b1 < a0, lambda name=name: f"out shares memory with {name}: it cannot accumulate "
                  f"over a tensor it is computed from; pass a separate buffer")
