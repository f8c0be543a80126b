"""``MaskedLinear`` and ``DynamicSparseLinear``: ``nn.Linear`` with a bool ``mask`` buffer, run as a 1-tap
convolution on the masked-conv op and kernels (``[*, in] → [N, in, 1]``), with everything the masked and
dynamic-sparse conv layers have (the same mixins)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convzoo import _shapes
from convzoo import functional as cf
from convzoo.autotune import interpret_mode
from convzoo.layers.dynamic_sparse import _DynamicSparseConvNd
from convzoo.layers.masked_conv import _dense_state, _fx_leaf, _MaskedConvNd

__all__ = ["DynamicSparseLinear", "MaskedLinear"]



class MaskedLinear(_MaskedConvNd, nn.Linear):
    """``nn.Linear`` with a bool ``mask`` buffer of the weight's shape ``[out_features, in_features]``: ``forward``
    is ``F.linear(input, weight·mask, bias)``, computed on CUDA (and under the Triton interpreter) by
    :func:`convzoo.functional.masked_conv` as a 1-tap convolution (``input [*, in]`` viewed as ``[N, in, 1]``, the
    weight as ``[out, in, 1]``), so the tile-skipping kernels run it; elsewhere (the plain-torch path) by
    ``F.linear(input, where(mask, weight, 0), bias)``, the same math as the op's own plain path (a 1-tap
    ``F.conv1d``) at ``F.linear``'s speed. The weight gradient is exactly zero where the mask is. Any leading dims,
    an unbatched ``[in]`` input and an empty batch work as with ``nn.Linear``.

    The same constructor as ``nn.Linear`` plus ``density`` (the initial random mask keeps exactly
    ``round(density·in_features)`` entries of each output row; 1.0, the default: all), ``block`` (``(BO, BK)``: the
    initial mask keeps whole ``BO × BK`` tiles of the ``[out, in]`` matrix, :func:`convzoo.sparsity.block_mask`,
    and the kernels tile in that block, so a dropped block is a skipped tile) or ``nm`` (``(N, M)``: N kept of
    every M consecutive inputs, :func:`convzoo.sparsity.nm_mask`; ``M`` must divide ``in_features``; not with
    ``block``). As :class:`convzoo.MaskedConv2d`: :meth:`set_mask`, :meth:`tile_lists`, :attr:`density`,
    :meth:`from_dense` / :meth:`to_dense` (``nn.Linear`` both ways), the stored weight zero where the mask is off,
    ``reset_parameters`` (also after meta-device construction and ``to_empty``: a new mask of the same density).
    The ``state_dict`` has ``nn.Linear``'s keys plus ``mask``; an ``nn.Linear`` checkpoint loads with
    ``strict=False`` (``mask`` listed in ``missing_keys``, the layer's mask kept, the weight zeroed where it is off).

    Raises:
        TypeError, ValueError: ``nn.Linear``'s own errors, or a bad ``density``, ``block`` or ``nm`` (named in the
            message); in ``forward``, an input that is not a floating tensor (TypeError) or is 0-d or whose last
            dim is not ``in_features`` (ValueError).
    """

    # the geometry of a 1-tap convolution, which is what the mixins and the op read
    stride, padding, dilation, groups, padding_mode = (1,), (0,), (1,), 1, "zeros"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 density: float | None = None, block=None, nm=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_mask(density, block, nm)

    def _conv_mask(self) -> torch.Tensor:
        """The mask as the 1-tap conv weight's ``[out, in, 1]`` view, the same view object while the buffer is the
        same tensor on the same memory (the op caches the tile lists per mask tensor; the view shares the buffer's
        version counter, so an in-place write to the mask rebuilds them; a ``mask.data = ...`` swap, a device move
        or a new buffer makes a new view)."""
        mask = self.mask
        if torch.compiler.is_compiling():
            return mask.unsqueeze(-1)
        key = (mask.data_ptr(), mask.storage_offset(), tuple(mask.shape), mask.stride(), mask.device)
        cached = self.__dict__.get("_conv_mask_view")
        if cached is None or cached[0] is not mask or cached[1] != key:
            cached = (mask, key, mask.unsqueeze(-1))
            self.__dict__["_conv_mask_view"] = cached
        return cached[2]

    def _check_input(self, input: torch.Tensor) -> None:
        _shapes.check_float_tensor(input, "input")
        _shapes.check(input.dim() >= 1 and input.shape[-1] == self.in_features,
                      lambda: f"input must be [*, in_features={self.in_features}], got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        leaf = _fx_leaf(self, input)  # torch.fx.symbolic_trace: the layer as one call_module node
        if leaf is not None:
            return leaf
        self._check_input(input)
        return self._linear_forward(input)

    def _kernel_path(self, input: torch.Tensor) -> bool:
        return input.is_cuda or (input.device.type == "cpu" and interpret_mode())

    def _linear_forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._kernel_path(input):
            # the plain-torch path: the op's own (F.conv1d of the masked weight) is the same math, but a 1-tap
            # F.conv1d is several times slower than F.linear on a CPU; where(), not a product: a masked NaN stays
            # invisible, and the weight gradient is exactly zero where the mask is
            return F.linear(input, torch.where(self.mask, self.weight, 0), self.bias)
        lead = input.shape[:-1]
        x = (input.flatten(0, -2) if input.dim() > 1 else input[None]).unsqueeze(-1)  # [N, in, 1]
        y = cf.masked_conv(x, self.weight.unsqueeze(-1), self._conv_mask(), self.bias, 1, 0, 1, 1,
                           block=self._mask_block)
        return y.reshape(*lead, self.out_features)

    def tile_lists(self):
        """The :class:`convzoo.sparsity.TileLists` the kernels iterate over for the current mask (those of the
        ``[out, in, 1]`` conv weight, the same tiling as the ``[out, in]`` matrix), in the layer's ``block`` (capped
        at the kernels' 128 and the matrix's size; the kernels' default tile without one).
        ``convzoo.sparsity.tile_fraction(layer.tile_lists())`` is the fraction of tiles visited."""
        from convzoo.ops import masked_conv as ops

        return ops._tile_lists(self._conv_mask(), (*self.weight.shape, 1), 1, self.mask.device, self._mask_block)

    @classmethod
    def _dense_class(cls) -> type:
        return nn.Linear

    @classmethod
    def from_dense(cls, linear: nn.Module, mask: torch.Tensor | None = None, **kwargs):
        """A masked copy of ``linear`` (an ``nn.Linear``): its sizes, weight (copied, zero where ``mask`` is off; a
        masked layer's is its ``weight·mask``, its own mask not taken), bias (copied), device and dtype, and
        ``mask`` (default all ones); ``kwargs`` go to the constructor.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                  dtype=linear.weight.dtype, **kwargs)
        out.set_mask(torch.ones_like(out.mask) if mask is None else mask)
        out.load_state_dict(_dense_state(linear), strict=False)  # reports the mask missing: it is set above
        return out

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` of the same sizes, device and dtype whose weight is ``weight·mask``."""
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device,
                          dtype=self.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(torch.where(self.mask, self.weight, 0))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense


class DynamicSparseLinear(_DynamicSparseConvNd, MaskedLinear):
    """A :class:`MaskedLinear` whose mask is trained, as :class:`convzoo.DynamicSparseConv1d`'s is (the same
    mixin): in training mode it accumulates, every ``update_every`` forward calls, the coactivation statistics of
    its input and output (the 1-tap convolution's, so row ``o``, column ``i`` counts the samples — every leading
    index of the input — where input ``i`` and output ``o`` are both active) into ``coactivation``, and
    :meth:`prune_regrow` replaces the weakest connections (whole blocks with ``block``, N of every M with ``nm``);
    :class:`convzoo.PruneRegrowSchedule` finds and drives it. :meth:`to_dense` gives an ``nn.Linear``.

    Args: ``nn.Linear``'s, ``MaskedLinear``'s ``density`` (default 0.5 here), ``block`` and ``nm``, and
    ``DynamicSparseConv1d``'s ``update_every``, ``score``, ``prune_fraction``, ``regrow`` (``'coactivation'``,
    ``'random'`` or ``'gradient'``: RigL, the dense gradient tapped from the backward of every ``update_every``-th
    training forward, on the kernels and on the plain-torch ``F.linear`` path alike), ``regrow_init``,
    ``prune_dims`` (``(0,)`` per output row, ``(0, 1)`` per entry, ``()`` the whole weight), ``ema``,
    ``x_threshold``, ``y_threshold``, with the same meaning and defaults. Under a ``torch.func`` transform (grad,
    jvp, vmap) the layer is a pure function: no statistics, no counter step, no gradient tap.

    Raises:
        TypeError, ValueError: as :class:`MaskedLinear` and :class:`convzoo.DynamicSparseConv1d`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 density: float | None = None, block=None, nm=None, update_every: int = 1, score: str = "count",
                 prune_fraction: float = 0.1, regrow: str = "coactivation", prune_dims=(0,), ema=None,
                 x_threshold: float = 0.0, y_threshold: float = 0.0, regrow_init: str | None = None):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_mask(density, block, nm, default_density=0.5, zero=False)
        self._init_dynamic(update_every, score, prune_fraction, regrow, prune_dims, ema, x_threshold, y_threshold,
                           regrow_init)

    def _linear_forward(self, input: torch.Tensor) -> torch.Tensor:
        # regrow='gradient': the conv layers' dense-gradient tap (their _conv_forward), here through the 1-tap view
        # on the kernels, and as a zero-valued tap on the masked entries of F.linear's weight on the plain path
        if not self._taps_gradient(input):
            return super()._linear_forward(input)
        if torch.compiler.is_compiling():
            run = (self.calls + 1) % self.update_every == 0
        elif (self._calls + 1) % self.update_every:
            return super()._linear_forward(input)
        else:
            run = torch.ones((), dtype=torch.bool, device=self.mask.device)
        tap = self._grad_tap
        if not self._kernel_path(input):
            # value 0 at the masked entries (the forward is unchanged), gradient ∂L/∂W there into the tap's .grad
            # on update steps (zero on the others: a compiled graph takes one path for both)
            probe = torch.where(run, tap - tap.detach(), 0)
            return F.linear(input, torch.where(self.mask, self.weight, probe), self.bias)
        from convzoo.ops import masked_conv as ops

        lead = input.shape[:-1]
        x = (input.flatten(0, -2) if input.dim() > 1 else input[None]).unsqueeze(-1)  # [N, in, 1]
        w = self.weight.unsqueeze(-1)
        args = cf._resolved(cf._masked_conv_args, cf._cached_masked_conv_args, x.shape, w.shape, 1, 0, 1, 1, "zeros")
        x, w, b = cf._autocast(x, w, self.bias)
        block = None if self._mask_block is None else list(self._mask_block)
        y = ops.masked_conv_dense_grad(x, w, tap.unsqueeze(-1), self._conv_mask(), run, b, *cf._as_lists(args),
                                       block)
        return y.reshape(*lead, self.out_features)

    def _statistics(self, x: torch.Tensor, y: torch.Tensor, x_threshold: float, y_threshold: float) -> torch.Tensor:
        # the mixin hands the input and output with one leading dim at least ([*, in], [*, out]): every leading
        # index is one sample of the 1-tap convolution
        out, inp = self.weight.shape
        h = cf.coactivation(x.flatten(0, -2).unsqueeze(-1), y.flatten(0, -2).unsqueeze(-1), (out, inp, 1),
                            (1,), (0,), (1,), 1, x_threshold=x_threshold, y_threshold=y_threshold,
                            mode=self.statistic)
        return h.view(out, inp)
