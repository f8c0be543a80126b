"""Shape math of masked convolution and coactivation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from convzoo._shapes._core import Geometry, _is_int, check, check_float_tensor, geometry, plain_ints


# ---------------------------------------------------------------------------------------------- masked_conv
def check_masked_conv_channels(x_shape, w_shape, groups) -> None:
    """The channel arithmetic of a (masked) convolution: a 3-5-d weight ``[C_out, C_in/groups, *kernel]``, a
    positive int ``groups`` dividing C_out, and ``C_in = weight.shape[1]·groups``.

    Raises:
        ValueError: any of these fails (naming weight, groups or the input's channels).
    """
    check(len(w_shape) in (3, 4, 5), lambda: f"weight must be [C_out, C_in/groups, *kernel] with 1-3 kernel dims, "
          f"got shape {tuple(w_shape)}")
    check(_is_int(groups) and groups > 0, lambda: f"groups must be a positive int, got {groups!r}")
    check(w_shape[0] % groups == 0, lambda: f"groups={groups} must divide the output channels "
          f"C_out={w_shape[0]} (weight.shape[0])")
    check(x_shape[1] == w_shape[1] * groups, lambda: f"input has C_in={x_shape[1]} channels but the weight "
          f"expects weight.shape[1]·groups = {w_shape[1]}·{groups} = {w_shape[1] * groups}")


def _check_masked_weight(weight: torch.Tensor, mask: torch.Tensor | None) -> None:
    if mask is not None:
        check(mask.dtype == torch.bool, lambda: f"mask must be a bool tensor here, got {mask.dtype}", TypeError)
        check(mask.shape == weight.shape, lambda: f"mask must have the weight's shape {tuple(weight.shape)}, got "
              f"{tuple(mask.shape)}")


def masked_conv_geometry(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None,
                         bias: torch.Tensor | None, stride, padding, dilation, groups: int,
                         padding_mode: str) -> Geometry:
    """Checks for ``masked_conv(x, weight, mask, bias, ...)`` with resolved geometry arguments.

    Raises:
        ValueError / TypeError: shapes, dtypes or devices that do not match (naming the argument), or a bad
            geometry.
    """
    nd = weight.dim() - 2
    check(x.dim() == nd + 2, lambda: f"input must be [N, C_in, *spatial] with {nd} spatial dims (the weight's "
          f"kernel dims), got shape {tuple(x.shape)}")
    check_masked_conv_channels(x.shape, weight.shape, groups)
    _check_masked_weight(weight, mask)
    # one meta operand among real ones sends the call to the fake (the Meta kernel), which would return an
    # uninitialised real tensor: refuse every device mix here, where both the fake and the torch path look
    for name, t in (("weight", weight), ("mask", mask), ("bias", bias)):
        check(t is None or t.device == x.device,
              lambda name=name, t=t: f"{name} is on {t.device} but input is on {x.device}")
    check(x.dtype == weight.dtype, lambda: f"input and weight must have the same dtype, got {x.dtype} and "
          f"{weight.dtype}", TypeError)
    if bias is not None:
        check(bias.dtype == weight.dtype, lambda: f"bias must have the weight's dtype {weight.dtype}, got "
              f"{bias.dtype}", TypeError)
        check(tuple(bias.shape) == (weight.shape[0],), lambda: f"bias must be [C_out] = [{weight.shape[0]}], got "
              f"shape {tuple(bias.shape)}")
    return geometry(tuple(x.shape[2:]), tuple(weight.shape[2:]), dilation, padding, stride, padding_mode)


def masked_conv_out_shape(x: torch.Tensor, weight: torch.Tensor, g: Geometry) -> tuple:
    return (x.shape[0], weight.shape[0], *g.out_size)


# ---------------------------------------------------------------------------------------------- coactivation
COACTIVATION_MODES = ("count", "correlation")


def check_weight_shape(weight_shape) -> tuple:
    """``weight_shape`` as a tuple of ints ``(C_out, C_in/groups, *kernel)`` with 1-3 kernel dims, every entry
    positive (torch's convolutions refuse an empty weight).

    Raises:
        TypeError: not a sequence of ints (bools refused).
        ValueError: not 3-5 entries, or an entry that is not positive.
    """
    if (not isinstance(weight_shape, Sequence) or isinstance(weight_shape, str)
            or not all(_is_int(e) for e in weight_shape)):
        raise TypeError(f"weight_shape must be a sequence of ints [C_out, C_in/groups, *kernel], got {weight_shape!r}")
    shape = tuple(plain_ints(e) for e in weight_shape)
    check(3 <= len(shape) <= 5, lambda: f"weight_shape must be [C_out, C_in/groups, *kernel] with 1-3 kernel dims, "
          f"got {shape}")
    for e in shape:
        check(e > 0, lambda: f"weight_shape must be positive, got {shape}")
    return shape


def check_coactivation_shapes(x_shape, y_shape, weight_shape: tuple, groups) -> None:
    """The ranks, batch and channels of ``coactivation(x, y, weight_shape, ..., groups)``: ``x`` ``[N, C_in, *in]``
    and ``y`` ``[N, C_out, *out]`` with ``weight_shape``'s number of kernel dims, ``C_in = weight_shape[1]·groups``,
    ``C_out = weight_shape[0]``, a positive int ``groups`` dividing it.

    Raises:
        TypeError: ``groups`` is not an int (a bool neither).
        ValueError: any of the rest fails, naming ``x``, ``y``, ``weight_shape`` or ``groups``.
    """
    nd = len(weight_shape) - 2
    check(len(x_shape) == nd + 2, lambda: f"x must be [N, C_in, *spatial] with {nd} spatial dims (weight_shape "
          f"{tuple(weight_shape)} has {nd} kernel dims), got shape {tuple(x_shape)}")
    check(len(y_shape) == nd + 2, lambda: f"y must be [N, C_out, *out] with {nd} spatial dims (weight_shape "
          f"{tuple(weight_shape)} has {nd} kernel dims), got shape {tuple(y_shape)}")
    check(_is_int(groups), lambda: f"groups must be an int, got {groups!r}", TypeError)
    check(groups > 0, lambda: f"groups must be positive, got {groups}")
    check(weight_shape[0] % groups == 0, lambda: f"groups={groups} must divide the output channels "
          f"C_out={weight_shape[0]} (weight_shape[0])")
    check(x_shape[1] == weight_shape[1] * groups, lambda: f"x has C_in={x_shape[1]} channels but weight_shape "
          f"{tuple(weight_shape)} with groups={groups} expects weight_shape[1]·groups = {weight_shape[1] * groups}")
    check(y_shape[1] == weight_shape[0], lambda: f"y has {y_shape[1]} channels but weight_shape "
          f"{tuple(weight_shape)} has C_out={weight_shape[0]}")
    check(y_shape[0] == x_shape[0], lambda: f"y has batch size {y_shape[0]} but x has {x_shape[0]}")


def check_coactivation_output_size(y_shape, g: Geometry) -> None:
    """``y``'s spatial size must be the convolution's output size.

    Raises:
        ValueError: it is not (naming ``y``, with the geometry that gives the expected size).
    """
    for i in range(g.ndim):
        check(y_shape[2 + i] == g.out_size[i], lambda: f"y must have the convolution's output size "
              f"{list(g.out_size)} (x's size {list(g.in_size)} with kernel {list(g.kernel_size)}, stride "
              f"{list(g.stride)}, padding {list(g.padding)}, dilation {list(g.dilation)}), got {list(y_shape[2:])}")


def coactivation_geometry(x: torch.Tensor, y: torch.Tensor, weight_shape, stride, padding, dilation, groups,
                          padding_mode: str) -> Geometry:
    """Checks for ``coactivation(x, y, weight_shape, ...)`` with resolved geometry arguments: ``x`` is the
    convolution's input ``[N, C_in, *in]``, ``y`` its output ``[N, C_out, *out]``, ``weight_shape`` its weight's
    ``[C_out, C_in/groups, *kernel]``, and the shapes must be what that convolution gives.

    Raises:
        TypeError: ``x`` or ``y`` is not a floating tensor, ``groups`` not an int.
        ValueError: a rank, batch, channel count or spatial size that does not match (naming ``x``, ``y``,
            ``weight_shape`` or ``groups``), tensors on two devices, or an invalid geometry.
    """
    check_float_tensor(x, "x")
    check_float_tensor(y, "y")
    check(y.device == x.device, lambda: f"y is on {y.device} but x is on {x.device}")
    check_coactivation_shapes(x.shape, y.shape, weight_shape, groups)
    g = geometry(tuple(x.shape[2:]), tuple(weight_shape[2:]), dilation, padding, stride, padding_mode)
    check_coactivation_output_size(y.shape, g)
    return g


def coactivation_dtype(x: torch.Tensor, mode: str) -> torch.dtype:
    """The result's dtype: float32 for ``'count'``, ``x``'s for ``'correlation'``."""
    return torch.float32 if mode == "count" else x.dtype
