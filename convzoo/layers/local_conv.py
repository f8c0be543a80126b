"""``LocalConv1d/2d/3d``: locally connected layers (a convolution without weight sharing)."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor, nn

from convzoo import _shapes
from convzoo import functional as F


def _positive_int(v, name: str) -> int:
    if not isinstance(v, numbers.Integral) or isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {v}")
    return v


class _LocalConvNd(nn.Module):
    _ndim: int

    def __init__(self, in_channels: int, out_channels: int, in_size, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, padding_mode: str = "zeros", no_weights: bool = False, device=None, dtype=None):
        super().__init__()
        nd = self._ndim
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.in_size = _shapes.as_tuple(in_size, nd, "in_size")
        if any(s <= 0 for s in self.in_size):
            raise ValueError(f"in_size must be positive, got {self.in_size}")
        self.kernel_size = _shapes.as_tuple(kernel_size, nd, "kernel_size")
        self.stride = _shapes.as_tuple(stride, nd, "stride")
        self.dilation = _shapes.as_tuple(dilation, nd, "dilation")
        self.padding = _shapes.plain_ints(padding)
        self.padding_mode = padding_mode
        ks, dil, pad, st, mode = F._geometry_args(nd, self.kernel_size, self.dilation, padding, self.stride,
                                                  self.in_size, padding_mode)
        g = _shapes.geometry(self.in_size, ks, dil, pad, st, mode)
        self.out_size = g.out_size
        self.num_positions = g.num_blocks
        self.has_bias = bool(bias)
        self.no_weights = bool(no_weights)
        fan_in = in_channels * g.kernel_numel
        #: shapes of the weight and bias a hypernetwork must produce (as hypnettorch's ``param_shapes``)
        self.param_shapes = [[out_channels, fan_in, g.num_blocks]] + ([[out_channels, g.num_blocks]] if bias else [])
        if no_weights:
            self.register_parameter("weight_by_position", None)
            self.register_parameter("bias", None)
            return
        kw = {"device": device, "dtype": dtype}
        # The weight is held position-major, [L, C_out, C_in·∏K] and contiguous: each position's filter
        # bank is one slab, the layout the kernels stream fastest, and a contiguous parameter is what
        # flat-parameter code needs (parameters_to_vector, p.view(-1), safetensors, FSDP).
        # ``weight`` is its logical [C_out, C_in·∏K, L] view. The bias (C_in·∏K times smaller, its layout
        # does not matter for speed) is a plain contiguous [C_out, L] parameter: hypnettorch's shape,
        # and the layout of the bias gradient that every path returns.
        self.weight_by_position = nn.Parameter(torch.empty(g.num_blocks, out_channels, fan_in, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, g.num_blocks, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def weight(self) -> Tensor | None:
        """The weight ``[C_out, C_in·∏K, L]``: the ``permute(1, 2, 0)`` view of the parameter
        ``weight_by_position`` ``[L, C_out, C_in·∏K]`` (None with ``no_weights=True``). Being a view,
        its ``.grad`` is None: the gradient (and optimizer state) lives on ``weight_by_position``."""
        w = self.weight_by_position
        return None if w is None else w.permute(1, 2, 0)

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation with the same fan-in: ``U(-1/√fan_in, 1/√fan_in)`` for both."""
        if self.weight_by_position is None:
            return
        bound = 1 / math.sqrt(self.param_shapes[0][1])
        nn.init.uniform_(self.weight_by_position, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint may hold the weight in its logical layout under "weight" ([C_out, C_in·∏K, L]):
        # saved before the parameter became position-major, built by hand, or converted from
        # hypnettorch ("filters"). Load it into weight_by_position. Copy both to contiguous tensors so
        # that load_state_dict(assign=True) keeps the parameters contiguous (the older layer saved the
        # bias as a transposed view).
        if self.weight_by_position is not None and prefix + "weight" in state_dict:
            logical, physical = prefix + "weight", prefix + "weight_by_position"
            w, shape = state_dict.pop(logical), self.param_shapes[0]
            if physical in state_dict:
                error_msgs.append(f"got both {logical!r} (the logical layout) and {physical!r}: keep one")
            elif not isinstance(w, Tensor) or list(w.shape) != shape:
                got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
                error_msgs.append(f"size mismatch for {logical}: copying a param with shape {got}, the logical "
                                  f"weight [C_out, C_in·∏K, L] of this layer is {shape}")
            else:
                state_dict[physical] = w.permute(2, 0, 1).contiguous()
        b = state_dict.get(prefix + "bias")
        if self.bias is not None and isinstance(b, Tensor) and not b.is_contiguous():
            state_dict[prefix + "bias"] = b.contiguous()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, input: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """``[N, C_in, *in_size]`` → ``[N, C_out, *out_size]``; unbatched ``[C_in, *in_size]`` → ``[C_out, *out_size]``.

        ``weight`` (``[C_out, C_in·∏K, L]``, any strides) and ``bias`` (``[C_out, L]`` or ``[C_out]``)
        replace the layer's own parameters, e.g. when a hypernetwork generates them; a layer built
        with ``no_weights=True`` needs them. A contiguous ``[C_out, C_in·∏K, L]`` weight (hypnettorch's
        layout) works; ``weight.permute(2, 0, 1).contiguous().permute(1, 2, 0)`` is this layer's own,
        fastest layout.

        Raises:
            TypeError: ``weight`` is a list (hypnettorch's ``weights=[W, b]`` is ``weight=W, bias=b`` here).
            ValueError: the input does not match ``in_channels``/``in_size``, a weight is missing, or a
                bias is missing (``bias=True``) or unexpected (``bias=False``).
        """
        nd = self._ndim
        if isinstance(weight, (list, tuple)):
            raise TypeError("weight must be a tensor, got a list: hypnettorch's forward(x, weights=[W, b]) is "
                            "forward(x, weight=W, bias=b) here")
        if isinstance(input, Tensor) and input.dim() == nd + 1:  # unbatched [C, *in_size], as nn.Conv2d reads it
            return self.forward(input[None], weight, bias)[0]
        if not isinstance(input, Tensor) or input.dim() != nd + 2:
            raise ValueError(f"input must be [N, C, *in_size] or [C, *in_size] with {nd} spatial dims, got "
                             f"{tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__}")
        if input.shape[1] != self.in_channels:
            raise ValueError(f"input has {input.shape[1]} channels, but the layer has in_channels={self.in_channels}")
        if tuple(input.shape[2:]) != self.in_size:
            raise ValueError(f"input has spatial size {tuple(input.shape[2:])}, but the layer was built for "
                             f"in_size={self.in_size} (a locally connected layer has one filter per position)")
        if weight is None:
            if self.weight is None:
                raise ValueError("this layer was built with no_weights=True: pass weight= (and bias=) to forward")
            weight = self.weight
        if bias is None:
            bias = self.bias
        if self.has_bias and bias is None:
            raise ValueError("this layer was built with bias=True but no bias was given: pass bias= to forward")
        if not self.has_bias and bias is not None:
            raise ValueError("this layer was built with bias=False but got a bias")
        return F.local_conv(input, weight, bias, kernel_size=self.kernel_size, stride=self.stride,
                            padding=self.padding, dilation=self.dilation, padding_mode=self.padding_mode)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, in_size={self.in_size}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, out_size={self.out_size}")
        if not self.has_bias:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.no_weights:
            s += ", no_weights=True"
        return s


class LocalConv1d(_LocalConvNd):
    """Locally connected 1-d layer: ``[N, C_in, W]`` → ``[N, C_out, W_out]``, one filter per output
    position. See :func:`convzoo.functional.local_conv` and :class:`LocalConv2d`."""

    _ndim = 1


class LocalConv2d(_LocalConvNd):
    """Locally connected 2-d layer (a convolution without weight sharing), like hypnettorch's
    ``LocalConv2dLayer`` without its ``[N, C_out, C_in·K², L]`` temporary (:meth:`from_hypnettorch`
    converts one, and documents the mapping).

    Args:
        in_channels, out_channels: channel counts.
        in_size: the input's spatial size (int or pair): it fixes the number of positions L.
        kernel_size, stride, padding, dilation, padding_mode: as in :class:`torch.nn.Conv2d`; padding
            also takes per-dim ``(lo, hi)`` pairs, ``'same'`` (strided too) and ``'valid'``.
        bias: a learnable bias per output pixel (``[C_out, L]``).
        no_weights: hold no parameters; ``forward`` then takes ``weight=`` and ``bias=`` (hypernetworks).

    Attributes:
        weight_by_position: the weight parameter, ``[L, C_out, C_in·∏K]``, contiguous: position ``l``'s
            filter bank is the slab ``weight_by_position[l]``. This is what ``parameters()``,
            ``state_dict`` and ``parameters_to_vector`` see (in this order, then ``bias``).
        weight: ``[C_out, C_in·∏K, L]``, the ``permute(1, 2, 0)`` view of ``weight_by_position`` (its
            ``.grad`` is on ``weight_by_position``). ``load_state_dict`` also takes a ``weight`` key in
            this logical layout.
        bias: ``[C_out, L]`` parameter, contiguous.
        out_size, num_positions, param_shapes: the output grid, L, and the logical shapes of weight and
            bias (what a hypernetwork generates for ``forward(x, weight, bias)``).
    """

    _ndim = 2

    @classmethod
    def from_hypnettorch(cls, layer) -> LocalConv2d:
        """A :class:`LocalConv2d` that computes what hypnettorch's ``LocalConv2dLayer`` ``layer`` computes,
        holding a copy of its parameters. hypnettorch is not imported: ``layer`` is read through the
        attributes its constructor sets (``_in_channels``, ``_in_height``, ``_kernel_size``, ...,
        ``filters``, ``bias``, ``param_shapes``).

        The mapping, for code moving from hypnettorch:

        - constructor: ``LocalConv2dLayer(C_in, C_out, H, W, k, stride, padding, bias, no_weights)`` is
          ``LocalConv2d(C_in, C_out, (H, W), k, stride, padding, bias=bias, no_weights=no_weights)``.
          The input size is ONE argument here and ``dilation`` precedes ``bias``: a positional
          ``LocalConv2d(3, 8, 32, 32, 3)`` would read 32 as the kernel size and 3 as the stride.
        - parameters: ``filters`` ``[C_out, C_in·K², L]`` is ``weight`` (the view of the parameter
          ``weight_by_position`` ``[L, C_out, C_in·K²]``); ``bias`` ``[C_out, L]`` is ``bias``. A
          hypnettorch state_dict loads with ``m.load_state_dict({"weight": sd["filters"], "bias": sd["bias"]})``
          (its ``_weights.0``/``_weights.1`` keys repeat the same two tensors).
        - forward: ``layer(x, weights=[W, b])`` is ``m(x, weight=W, bias=b)``, with the same ``W``
          (any strides) and ``param_shapes``; ``out_height, out_width`` is ``out_size``.
        - init: hypnettorch draws both parameters from ``U(±1/√(C_in·K²·L))`` (``kaiming_uniform_`` counts
          the L positions of a ``[C_out, C_in·K², L]`` tensor in its fan-in); convzoo from
          ``U(±1/√(C_in·K²))``, ``nn.Conv2d``'s bound for the per-position fan-in, √L times wider. For
          hypnettorch's scale: ``nn.init.uniform_(p, -s, s)`` for each ``p`` in ``m.parameters()``,
          ``s = 1/√(C_in·K²·L)``.

        Raises:
            TypeError: ``layer`` lacks an attribute of hypnettorch's ``LocalConv2dLayer``.
            ValueError: its ``param_shapes``, ``filters`` or ``bias`` do not have the shapes its geometry
                implies.
        """
        names = ("_in_channels", "_out_channels", "_in_height", "_in_width", "_kernel_size", "_stride", "_padding",
                 "_has_bias", "_no_weights", "param_shapes")
        missing = [n for n in names if not hasattr(layer, n)]
        if missing:
            raise TypeError(f"from_hypnettorch needs a hypnettorch LocalConv2dLayer; {type(layer).__name__} has "
                            f"no {', '.join(missing)}")
        no_weights, has_bias = bool(layer._no_weights), bool(layer._has_bias)
        params = {} if no_weights else {"filters": getattr(layer, "filters", None)}
        if has_bias and not no_weights:
            params["bias"] = getattr(layer, "bias", None)
        for name, t in params.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"from_hypnettorch: the layer's {name} must be a tensor, got {type(t).__name__}")
        filters = params.get("filters")
        kw = {} if filters is None else {"device": filters.device, "dtype": filters.dtype}
        m = cls(layer._in_channels, layer._out_channels, (layer._in_height, layer._in_width), layer._kernel_size,
                stride=layer._stride, padding=layer._padding, bias=has_bias, no_weights=no_weights, **kw)
        if [list(s) for s in layer.param_shapes] != m.param_shapes:  # e.g. a hand-edited layer
            raise ValueError(f"from_hypnettorch: the layer's param_shapes {layer.param_shapes} differ from those "
                             f"its geometry implies, {m.param_shapes}")
        for (name, t), shape in zip(params.items(), m.param_shapes):
            if list(t.shape) != shape:
                raise ValueError(f"from_hypnettorch: the layer's {name} is {list(t.shape)}, its geometry needs "
                                 f"{shape}")
        if filters is not None:
            with torch.no_grad():
                m.weight_by_position.copy_(filters.permute(2, 0, 1))
                if has_bias:
                    m.bias.copy_(params["bias"])
            for p, t in zip(m.parameters(), params.values()):
                p.requires_grad_(t.requires_grad)
        return m.train(getattr(layer, "training", True))


class LocalConv3d(_LocalConvNd):
    """Locally connected 3-d layer: ``[N, C_in, D, H, W]`` → ``[N, C_out, *out]``. See :class:`LocalConv2d`."""

    _ndim = 3
