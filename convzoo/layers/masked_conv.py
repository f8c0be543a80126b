"""``MaskedConv1d/2d/3d``: ``nn.Conv1d/2d/3d`` whose weight is multiplied by a bool ``mask`` buffer."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from convzoo import functional as cf

__all__ = ["MaskedConv1d", "MaskedConv2d", "MaskedConv3d"]


def _initial_mask(shape, density: float, block, groups: int, device, dims=(0,)) -> torch.Tensor:
    """A random mask keeping exactly ``round(density·n)`` of the ``n`` entries of each slice along ``dims``
    (default: each output channel), or (``block`` given) whole ``block`` tiles, ``round(density·tiles)`` of them,
    chosen at random."""
    from convzoo import sparsity

    if block is None:
        return sparsity.random_mask(shape, density, device=device, dims=dims)
    return sparsity.block_mask(torch.rand(shape, device=device), block=block, density=density, groups=groups)


def _dense_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """``layer``'s weight and bias as a dense checkpoint for ``from_dense``: a masked layer (an ``nn.ConvNd`` /
    ``nn.Linear`` too) gives ``weight·mask`` and no ``mask`` (its own would override ``from_dense``'s) nor
    statistics."""
    state = {"weight": layer.weight.detach()}
    if isinstance(layer, _MaskedConvNd):
        state["weight"] = torch.where(layer.mask, state["weight"], 0)
    if layer.bias is not None:
        state["bias"] = layer.bias.detach()
    return state


def _fx_leaf(module: nn.Module, input):
    """Under ``torch.fx.symbolic_trace`` (``input`` a ``torch.fx.Proxy``): the layer as one ``call_module`` node of
    the traced graph (the GraphModule then calls the layer itself on real tensors: its checks, kernels, mask and
    statistics, the same outputs), since its forward branches on the input's shape and device; the layer traced
    as the root itself: one ``call_function`` node calling that layer object (the GraphModule then holds a reference
    to it, in process: not picklable). None otherwise."""
    if not isinstance(input, torch.fx.Proxy):
        return None
    tracer = input.tracer
    path = tracer.path_of_module(module)
    if path:
        return tracer.create_proxy("call_module", path, (input,), {})

    def masked_layer(x):
        return module(x)

    return tracer.create_proxy("call_function", masked_layer, (input,), {})


class _MaskedConvNd:
    """The mask handling shared by the three classes (mixed in before ``nn.ConvNd``)."""

    mask: torch.Tensor

    def _init_mask(self, density, block, nm=None, default_density: float = 1.0, zero: bool = True) -> None:
        from convzoo import sparsity

        # kept to draw the mask again in reset_parameters (after to_empty the buffer is uninitialised memory)
        self._mask_block = None if block is None else sparsity._check_block(block)
        self._mask_nm = None
        if nm is not None:
            if block is not None:
                raise ValueError(f"nm and block are exclusive: got nm={nm!r} and block={block!r}")
            self._mask_nm = sparsity._check_nm(nm, self.weight.shape[1])
            n, m = self._mask_nm
            if density is not None and sparsity._check_density(density) != n / m:
                raise ValueError(f"density must be N/M = {n / m} (or left out) with nm={self._mask_nm}, got {density}")
            density = n / m
        self._mask_density = sparsity._check_density(default_density if density is None else density)
        self.register_buffer("mask", self._draw_mask())
        if zero:  # (a DynamicSparseConv may draw the mask again: it zeroes once it has its final mask)
            self._zero_masked_weight()

    def _draw_mask(self) -> torch.Tensor:
        """A fresh mask by the construction's rule (``density``, ``block``) on the weight's device."""
        density, block = self._mask_density, self._mask_block
        shape, device = self.weight.shape, self.weight.device
        if self._mask_nm is not None:
            from convzoo import sparsity

            return sparsity.nm_mask(torch.rand(shape, device=device), self._mask_nm, self.groups)
        if density == 1.0 and block is None:
            return torch.ones(shape, dtype=torch.bool, device=device)
        return _initial_mask(shape, density, block, self.groups, device, self._mask_dims())

    def _mask_dims(self) -> tuple[int, ...]:
        """The dims whose every index is one slice of the initial mask with its own exact count."""
        return (0,)

    def reset_parameters(self) -> None:
        """``nn.ConvNd``'s re-initialisation of the weight and bias, and a new random mask drawn as at
        construction (same density and ``block``: the same kept counts)."""
        super().reset_parameters()
        if "mask" in self._buffers:  # (nn.ConvNd's constructor calls this before the mask exists)
            with torch.no_grad():
                self.mask.copy_(self._draw_mask())
            self._zero_masked_weight()

    @torch.no_grad()
    def _zero_masked_weight(self) -> None:
        """The stored weight set to zero where the mask is off, so it *is* the sparse weight (``(w != 0)`` is the
        mask, a plain ``nn.ConvNd`` loading the state_dict is the sparse model). Done where the mask changes
        (construction, ``reset_parameters``, :meth:`set_mask`, ``load_state_dict``; ``prune_regrow`` zeroes what it
        prunes): the weight gradient is exactly zero where the mask is, so optimizer steps (SGD with momentum or
        weight decay, Adam, AdamW) keep those entries at zero without a pass per step."""
        w, mask = self.weight, self.mask
        if w.is_meta or mask.is_meta or mask.shape != w.shape:
            return
        off = ~mask
        if isinstance(w, DTensor):  # FSDP: the weight is sharded, the mask buffer is not
            off = distribute_tensor(off, w.device_mesh, w.placements)
        w.masked_fill_(off, 0)

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        leaf = _fx_leaf(self, input)
        if leaf is not None:
            return leaf
        # the mask's block is the kernels' tile: a dropped block is a skipped tile
        return cf.masked_conv(input, weight, self.mask, bias, self.stride, self.padding, self.dilation, self.groups,
                              padding_mode=self.padding_mode, block=self._mask_block)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (in place: the buffer keeps its identity, device and bool dtype).

        Raises:
            TypeError: not a tensor, or neither bool nor the weight's dtype.
            ValueError: another shape than the weight's, or values other than 0 and 1.
        """
        self.mask.copy_(cf._bool_mask(mask, self.weight))
        self._zero_masked_weight()

    def tile_lists(self):
        """The :class:`convzoo.sparsity.TileLists` the kernels iterate over for the current mask: built in the
        layer's ``block`` (capped at the kernels' 128 and at the weight matrix's size; the kernels' default tile
        without a block). ``convzoo.sparsity.tile_fraction(layer.tile_lists())`` is the fraction of tiles visited."""
        from convzoo.ops import masked_conv as ops

        return ops._tile_lists(self.mask, self.weight.shape, self.groups, self.mask.device, self._mask_block)

    @property
    def density(self) -> float:
        """The fraction of weight entries the mask keeps."""
        return self.mask.float().mean().item() if self.mask.numel() else 1.0

    @classmethod
    def _dense_class(cls) -> type:
        """The ``nn.Conv1d/2d/3d`` this class extends (found in the MRO: a subclass adds classes before it)."""
        return next(c for c in cls.__mro__ if c in (nn.Conv1d, nn.Conv2d, nn.Conv3d))

    @classmethod
    def from_dense(cls, conv: nn.Module, mask: torch.Tensor | None = None, **kwargs):
        """A masked copy of ``conv`` (an ``nn.Conv{1,2,3}d`` of the same rank): its configuration, weight (copied,
        zero where ``mask`` is off; a masked layer's is its ``weight·mask``, its own mask not taken) and bias
        (copied), and ``mask`` (default all ones); ``kwargs`` go to the
        constructor (e.g. a ``DynamicSparseConv``'s ``score``).

        Raises:
            TypeError: ``conv`` is not the matching ``nn.ConvNd``.
        """
        dense = cls._dense_class()
        if not isinstance(conv, dense):
            raise TypeError(f"conv must be an {dense.__name__}, got {type(conv).__name__}")
        out = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                  dtype=conv.weight.dtype, **kwargs)
        # the mask first: loading zeroes the weight where the mask is off (the constructor's random one would cut)
        out.set_mask(torch.ones_like(out.mask) if mask is None else mask)
        out.load_state_dict(_dense_state(conv), strict=False)  # reports the mask missing: it is set above
        return out

    def to_dense(self) -> nn.Module:
        """An ``nn.ConvNd`` of the same configuration whose weight is ``weight·mask`` (masked entries zero)."""
        dense = self._dense_class()(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                    self.padding, self.dilation, self.groups, self.bias is not None,
                                    self.padding_mode, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(torch.where(self.mask, self.weight, 0))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the mask read as set_mask reads it: a bool, or a floating 0/1 (copy_ into the bool buffer would read
        # any nonzero, 0.5 included, as True)
        from convzoo import sparsity

        key = prefix + "mask"
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and value.dtype != torch.bool:
            state_dict = {**state_dict, key: sparsity._as_bool_mask(value, f"state_dict[{key!r}]")}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not error_msgs:
            self._zero_masked_weight()  # a dense checkpoint's weight, or a masked one's stale entries

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mask={tuple(self.mask.shape)}"


_DOC = """``nn.Conv{n}d`` with a bool ``mask`` buffer of the weight's shape: ``forward`` is
:func:`convzoo.functional.masked_conv` (``F.conv{n}d(x, weight·mask, bias, ...)``; the weight gradient is exactly
zero where the mask is). The same constructor as ``nn.Conv{n}d`` plus ``density`` (the initial random mask keeps
exactly ``round(density·numel)`` entries of each output channel's filter; 1.0: all) and ``block`` (``(BO, BK)``:
the initial mask keeps whole tiles of the kernels' tiling instead, see :func:`convzoo.sparsity.block_mask`; the
kernels then tile in that block, so a dropped block is a skipped tile) or ``nm`` (``(N, M)``, e.g. ``(2, 4)``: an
N:M mask, N kept of every M consecutive input channels of a tap, :func:`convzoo.sparsity.nm_mask`; density N/M;
``M`` must divide ``C_in/groups``; not with ``block``). The
``state_dict`` has ``nn.Conv{n}d``'s keys plus ``mask``; a dense checkpoint (no ``mask``) loads only with
``strict=False``, which lists ``mask`` in ``missing_keys`` and keeps the layer's mask; :meth:`from_dense` /
:meth:`to_dense` convert both ways, :meth:`set_mask` replaces the mask. A loaded ``mask`` is checked as
:meth:`set_mask` checks it (bool, or floating 0/1).

Raises:
    TypeError, ValueError: ``nn.Conv{n}d``'s own errors, or ``density`` not a real number in [0, 1] (or not N/M
        with ``nm``), a bad ``block`` or ``nm`` (named in the message); from
        ``load_state_dict``, a ``mask`` neither bool nor floating (TypeError) or with values other than 0 and 1
        (ValueError).
"""


class MaskedConv1d(_MaskedConvNd, nn.Conv1d):
    __doc__ = _DOC.format(n=1)

    def __init__(self, *args, density: float | None = None, block=None, nm=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask(density, block, nm)


class MaskedConv2d(_MaskedConvNd, nn.Conv2d):
    __doc__ = _DOC.format(n=2)

    def __init__(self, *args, density: float | None = None, block=None, nm=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask(density, block, nm)


class MaskedConv3d(_MaskedConvNd, nn.Conv3d):
    __doc__ = _DOC.format(n=3)

    def __init__(self, *args, density: float | None = None, block=None, nm=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask(density, block, nm)
