"""The argument handling every entry point of :mod:`convzoo.functional` shares: rank and batching, int/tuple
normalisation, the geometry's checks and their per-signature cache, autocast, scalar options."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch

from convzoo import _shapes

# device types torch.autocast knows (torch.is_autocast_enabled raises for others, e.g. 'meta')
_AUTOCAST_DEVICE_TYPES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "ipu", "mtia", "maia")
                                   if torch.amp.is_autocast_available(d))


def _spatial_ndim(shape: tuple, *geometry) -> tuple[int, bool]:
    """``(spatial dims, batched)`` of an input of ``shape``, ``[N, C, *spatial]`` or ``[C, *spatial]``.

    The geometry arguments tell the rank when one of them is a sequence (as ``nn.Unfold((3, 3))``
    does): an input with one dim fewer than ``[N, C, *spatial]`` is then unbatched, as torch reads it.
    With ints only the input tells: ``[N, C, *spatial]``, so a 3-d input is a batch of 1-d signals.
    """
    told = _shapes.spatial_ndim_of(*geometry)
    if told is not None and 1 <= told <= 3 and len(shape) == told + 1:
        return told, False
    if not 3 <= len(shape) <= 5:
        raise ValueError(f"input must be [N, C, *spatial] with 1-3 spatial dims (or [C, *spatial] when a tuple "
                         f"argument tells the rank), got shape {tuple(shape)}")
    return len(shape) - 2, True


def _cache_key(*args) -> tuple | None:
    """``args`` as a hashable key when each is a str, a Python int or a flat tuple/list of Python ints
    (exact types: ``True``, ``3.0`` and ``np.int64(3)`` hash like ``1`` and ``3`` but must get the
    uncached path, to be rejected or converted there), else None."""
    key = []
    for v in args:
        t = type(v)
        if t is int or t is str:
            key.append(v)
        elif (t is tuple or t is list or t is torch.Size) and all(type(e) is int for e in v):
            key.append(tuple(v))  # a list and a tuple read alike; an int and a 1-tuple do not share a key
        else:
            return None
    return tuple(key)


def _resolved(resolve, cached, *args):
    """``resolve(*args)``, from its cached twin when the arguments make a cache key."""
    key = None if torch.compiler.is_compiling() else _cache_key(*args)
    return resolve(*args) if key is None else cached(*key)


def _positive_tuples(ndim, **values) -> list[tuple]:
    """Each ``name=value`` as a tuple of ``ndim`` ints (an int repeated), every entry positive, in order.

    Raises:
        TypeError, ValueError: as :func:`convzoo._shapes.as_tuple`, or an entry is not positive.
    """
    out = []
    for name, value in values.items():
        v = _shapes.as_tuple(value, ndim, name)
        if any(e <= 0 for e in v):
            raise ValueError(f"{name} must be positive, got {v}")
        out.append(v)
    return out


def _geometry_args(ndim, kernel_size, dilation, padding, stride, in_size, padding_mode):
    ks, dil, st = _positive_tuples(ndim, kernel_size=kernel_size, dilation=dilation, stride=stride)
    if not isinstance(padding_mode, str) or padding_mode not in _shapes.PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_shapes.PADDING_MODES}, got {padding_mode!r}")
    pad = _shapes.resolve_padding(padding, in_size, ks, dil, st)
    return ks, dil, tuple(pad), st, padding_mode


def _unfold_args(shape, kernel_size, dilation, padding, stride, padding_mode) -> tuple[bool, tuple]:
    """``(batched, resolved op arguments)`` of an unfold (or local_conv) call on an input of ``shape``."""
    ndim, batched = _spatial_ndim(shape, kernel_size, dilation, padding, stride)
    if not batched:
        return False, ()
    return True, _geometry_args(ndim, kernel_size, dilation, padding, stride, shape[2:], padding_mode)


# one entry per call signature (input shape and geometry arguments): the resolution and its checks run once
_cached_unfold_args = functools.lru_cache(maxsize=1024)(_unfold_args)


def _as_lists(args: tuple) -> list:
    """Fresh lists for the op (a cached resolution is shared): the string stays a string."""
    return [list(a) if isinstance(a, tuple) else a for a in args]


def _batched_unfold_args(input, kernel_size, dilation, padding, stride, padding_mode) -> tuple[bool, tuple]:
    """``(batched, resolved op arguments)`` of a call that takes an unfold's geometry on a floating ``input``
    (unfold, local_conv, the patch statistics), the input checked first and the resolution cached per signature."""
    _shapes.check_float_tensor(input, "input")
    return _resolved(_unfold_args, _cached_unfold_args, input.shape, kernel_size, dilation, padding, stride,
                     padding_mode)


def _check_same_unstrided(padding, stride, nd: int) -> None:
    """torch refuses ``padding='same'`` with a stride (it is no longer 'output size = input size'): so do the
    convolution-shaped entry points (conv_matrix, masked_conv, coactivation)."""
    if isinstance(padding, str) and padding == "same" and any(s != 1 for s in _shapes.as_tuple(stride, nd, "stride")):
        raise ValueError(f"padding='same' is not supported with stride {stride!r} (as in torch); pass the padding "
                         f"explicitly, e.g. as (lo, hi) pairs")


def _autocast(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """torch's autocast rule for convolutions: under ``torch.autocast`` on the input's device type, every
    floating argument except float64 computes in the autocast dtype (custom ops are not autocast-aware)."""
    device_type = input.device.type
    if device_type not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t if t is None or t.dtype == torch.float64 else t.to(dtype)

    return cast(input), cast(weight), cast(bias)


def _all_zero(value) -> bool:
    """``value`` is the int 0 or a sequence of int zeros (an ``output_padding`` that pads nothing)."""
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else (value,)
    return all(_shapes._is_int(v) and int(v) == 0 for v in values)


def _check_choice(value, name: str, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _real(value, name: str) -> float:
    """``value`` as a finite Python float.

    Raises:
        TypeError: not a real number (a bool, a tensor, a string).
        ValueError: not finite.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # np.float64 is Real, a tensor is not
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not -math.inf < v < math.inf:  # not math.isfinite: a symbolic float under torch.compile has no such method
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _threshold(value, name: str) -> float:
    """``value`` as a Python float, ±inf allowed (everything, or nothing, is above it).

    Raises:
        TypeError: not a real number (a bool, a tensor: reading one would synchronise with its device).
        ValueError: NaN (nothing is ever greater than NaN: every entry would be silently inactive).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # np.float64 is Real, a tensor is not
        raise TypeError(f"{name} must be a real number (a Python or numpy float or int), got {value!r}")
    v = float(value)
    if v != v:
        raise ValueError(f"{name} must not be NaN")
    return v
