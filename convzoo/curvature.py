"""KFAC input factors of a model's layers, kept up to date by forward hooks.

Example (every conv / transposed conv / linear layer's Kronecker factor, inside a training loop)::

    import torch, convzoo

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with convzoo.KFACFactors(model, beta=0.95) as kfac:   # hooks removed on exit
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)  # the hooks update the factors here
            opt.zero_grad(); loss.backward(); opt.step()
            A_conv = kfac["0"]        # Conv2d '0': [1, 28, 28] (groups, 3·3·3 patch rows + the bias column)
            A_fc = kfac["4"]          # Linear '4': [16 + 1, 16 + 1] (a Linear's factor is dense: keep it narrow)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
from torch import nn

from convzoo import _compat, _shapes
from convzoo.functional import patch_covariance

__all__ = ["KFACFactors"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_SUPPORTED = (*_CONVS, *_TRANSPOSED, nn.Linear)


class KFACFactors:
    """The input-side Kronecker factor of every ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` and ``Linear`` of
    ``model``, each an exponential moving average updated by a forward hook in training mode.

    A conv layer's factor is :func:`convzoo.functional.patch_covariance` of its input with the layer's own
    geometry (kernel size, stride, padding incl. ``'same'``, dilation, groups, padding mode; ``transposed``
    and ``output_padding`` for a transposed layer, resolved from ``output_size`` when the forward gets one),
    blended into a preallocated buffer in the same call: ``A ← beta·A + (1 − beta)·F``, with ``F`` scaled by
    ``1/N`` (einconv's normalisation, see ``patch_covariance``). The first update after construction or
    :meth:`reset` uses ``beta = 0``, so ``A`` starts at the first factor, not at a zero-biased average.

    A ``Linear`` layer's factor is that of its input rows ``a = x.reshape(-1, in_features)`` (plus a column
    of ones for the bias), ``F = aᵀa / N`` with ``N = x.shape[0]`` (the batch; an input without a batch dim
    counts as one sample), blended with the same EMA in plain torch (``addmm``). ``mode='reduce'`` averages
    the rows of each sample first (``x.reshape(N, -1, in_features).mean(1)``, KFAC-reduce for weight-sharing
    inputs ``[N, T, in]``), which for a 2-d input ``[N, in]`` is the same as ``'expand'``.

    Which forwards count: every call of a hooked layer in training mode (``layer.training``), also under
    ``torch.no_grad()`` / ``torch.inference_mode()`` (put the model in ``eval()`` for forwards that must not
    count), except a forward that activation checkpointing recomputes during backward (its input was
    counted by the real forward). Each call is one EMA update: a layer called twice in one forward (a
    shared module) blends its second input into the first with ``beta``, not a sum over the calls. A copy
    of the model (``copy.deepcopy``, ``torch.save(model)`` + ``torch.load``) has weights of its own and
    carries inert hooks: its forwards never count here.

    Factors are fp32 (fp64 for an fp64 layer), on the layer's device; a ``model.to(device / dtype)`` after
    construction moves or converts them (average kept) at the next update, as a new tensor: read
    ``kfac[name]`` again rather than keeping an old reference. Their shape is ``[G, D, D]`` for a conv
    (``[D, D]`` with ``group_reduction='mean'``), ``D = C_in/G·∏kernel_size (+1 with a bias column)``, and
    ``[D, D]``, ``D = in_features (+1)``, for a ``Linear``. Hooks only read the (detached) input: the
    forward, its output and the gradients are unchanged. convzoo's ``LocalConv*`` layers (no weight sharing,
    no Kronecker structure) and every other module are left alone.

    Args:
        model: the module whose layers are hooked (itself included, if it is one of the supported types).
        mode: ``'expand'`` (KFC / KFAC-expand) or ``'reduce'`` (KFAC-reduce), as in ``patch_covariance``.
        beta: the EMA's decay, a real number in ``[0, 1]`` (``0``: each factor is the latest batch's).
        bias: append the bias column to the factor of each layer that has a bias.
        group_reduction: ``'blocks'`` or ``'mean'``, as in ``patch_covariance`` (conv layers only).
        modules: ``None`` for every supported layer of ``model``, else the names (as in
            ``model.named_modules()``) or the modules themselves to hook, each a supported layer of ``model``.

    Attributes:
        factors: ``dict`` layer name → factor tensor (updated in place; ``kfac[name]`` is the same).

    Raises:
        TypeError: ``model`` not an ``nn.Module``, ``beta`` not a real number, ``bias`` not a bool, a module
            in ``modules`` of a type that has no factor here.
        ValueError: ``beta`` outside ``[0, 1]``, an unknown ``mode`` / ``group_reduction``, a name or module
            in ``modules`` that is not in ``model``, a hooked lazy layer (``LazyConv2d``, ...) not yet run.
    """

    def __init__(self, model: nn.Module, *, mode: str = "expand", beta: float = 0.95, bias: bool = True,
                 group_reduction: str = "blocks", modules: Iterable[str | nn.Module] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        for name, value, choices in (("mode", mode, _shapes.COVARIANCE_MODES),
                                     ("group_reduction", group_reduction, _shapes.GROUP_REDUCTIONS)):
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
            raise TypeError(f"beta must be a real number, got {beta!r}")
        if not 0.0 <= float(beta) <= 1.0:  # NaN fails too
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        self.mode, self._beta, self.bias, self.group_reduction = mode, float(beta), bias, group_reduction
        self.factors: dict[str, torch.Tensor] = {}
        # per layer: has it been updated since construction / reset()? A bool, not a step count: under
        # torch.compile each distinct value is a guard, and a bool flips once (one recompile), a count each step
        self._started: dict[str, bool] = {}
        self._handles = []
        _compat.warn_if_blind_to_recompute("KFACFactors")
        for name, layer in self._chosen(model, modules):
            if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
                raise ValueError(f"model: {name!r} is a lazy layer whose shapes are not known yet (run one forward "
                                 f"of the model before KFACFactors)")
            self.factors[name] = self._new_factor(layer)
            self._started[name] = False
            hook = self._linear_hook if isinstance(layer, nn.Linear) else self._conv_hook
            self._handles.append(layer.register_forward_hook(_Hook(hook, name), with_kwargs=True))

    # ------------------------------------------------------------------------------------------ public
    @property
    def beta(self) -> float:
        """The EMA's decay (fixed at construction)."""
        return self._beta

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.factors[name]

    def __enter__(self) -> KFACFactors:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hooks: the factors stay as they are and are no longer updated."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Zero every factor; the next update of each starts the average afresh (``beta = 0``)."""
        for name, factor in self.factors.items():
            factor.zero_()
            self._started[name] = False

    def state_dict(self) -> dict:
        """The factors and whether each has started its average, for a checkpoint (tensors are the live
        buffers, as ``nn.Module.state_dict`` gives them; ``torch.save`` copies)."""
        return {"factors": dict(self.factors), "started": dict(self._started)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s factors (copied into the buffers, which keep their device and dtype)
        and started flags.

        Raises:
            ValueError: ``state`` is not a state_dict of the same layers with factors of the same shapes.
        """
        if not isinstance(state, dict) or set(state) != {"factors", "started"}:
            raise ValueError("state must be a KFACFactors.state_dict(): a dict with 'factors' and 'started'")
        factors, started = state["factors"], state["started"]
        if set(factors) != set(self.factors) or set(started) != set(self.factors):
            raise ValueError(f"state holds the layers {sorted(factors)}, these factors are for {sorted(self.factors)}")
        for name, value in factors.items():
            if not isinstance(value, torch.Tensor) or value.shape != self.factors[name].shape:
                raise ValueError(f"state's factor {name!r} must be a tensor of shape "
                                 f"{tuple(self.factors[name].shape)}, got {getattr(value, 'shape', type(value))}")
        for name, value in factors.items():
            self.factors[name].copy_(value)
            self._started[name] = bool(started[name])

    # ------------------------------------------------------------------------------------------ internals
    @staticmethod
    def _chosen(model: nn.Module, modules) -> list[tuple[str, nn.Module]]:
        named = list(model.named_modules())
        if modules is None:
            return [(n, m) for n, m in named if isinstance(m, _SUPPORTED)]
        by_name, by_id = dict(named), {id(m): n for n, m in named}
        out = []
        for item in modules:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"modules: no module named {item!r} in model")
                name = item
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(f"modules: {type(item).__name__} is not a module of model")
                name = by_id[id(item)]
            else:
                raise TypeError(f"modules must hold names or modules, got {type(item).__name__}")
            if not isinstance(by_name[name], _SUPPORTED):
                raise TypeError(f"modules: {name!r} is a {type(by_name[name]).__name__}; factors are kept for "
                                f"Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear only")
            out.append((name, by_name[name]))
        return out

    def _new_factor(self, layer: nn.Module) -> torch.Tensor:
        w = layer.weight
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        bias = self.bias and layer.bias is not None
        if isinstance(layer, nn.Linear):
            d = layer.in_features + bias
            shape = (d, d)
        else:
            shape = _shapes.covariance_shape(layer.in_channels, layer.groups, math.prod(layer.kernel_size), bias,
                                             self.group_reduction == "mean")
            shape = shape[1:] if self.group_reduction == "mean" else shape
        return torch.zeros(shape, dtype=dtype, device=w.device)

    # Under torch.compile(dynamic=True) dynamo turns a float read from an attribute into a SymFloat, which
    # patch_covariance's check of beta (math.isfinite) cannot trace with fullgraph=True. beta is fixed at
    # construction (read-only), so a constant the trace may bake in without a guard is exact.
    @torch.compiler.assume_constant_result
    def _decay(self) -> float:
        return self._beta

    def _buffer(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The layer's factor on ``x``'s device, fp64 for an fp64 ``x`` and fp32 otherwise (converted once
        if the model moved or changed dtype since, as patch_covariance's ``out`` must match), and this
        update's beta."""
        buf = self.factors[name]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if buf.device != x.device or buf.dtype != dtype:
            buf = self.factors[name] = buf.to(x.device, dtype)
        beta = self._decay() if self._started[name] else 0.0
        self._started[name] = True
        return buf, beta

    def _conv_hook(self, name: str, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        if not layer.training or _compat.recomputed_forward():
            return
        x = args[0].detach()
        buf, beta = self._buffer(name, x)
        common = dict(mode=self.mode, group_reduction=self.group_reduction, bias=self.bias and layer.bias is not None,
                      out=buf, beta=beta)
        if isinstance(layer, _TRANSPOSED):
            output_size = args[1] if len(args) > 1 else kwargs.get("output_size")
            ndim = len(layer.kernel_size)
            # nn.ConvTranspose's own resolution of output_size into output_padding
            output_padding = layer._output_padding(x, output_size, layer.stride, layer.padding, layer.kernel_size,
                                                   ndim, layer.dilation)
            patch_covariance(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups,
                             transposed=True, output_padding=tuple(output_padding), **common)
        else:
            patch_covariance(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups,
                             padding_mode=layer.padding_mode, **common)

    def _linear_hook(self, name: str, layer: nn.Linear, args: tuple, kwargs: dict) -> None:
        if not layer.training or _compat.recomputed_forward():
            return
        x = args[0].detach()
        if x.dim() == 1:  # unbatched: one sample
            x = x[None]
        buf, beta = self._buffer(name, x)
        n = x.shape[0]
        a = x.reshape(n, -1, layer.in_features).mean(1) if self.mode == "reduce" else x.reshape(-1, layer.in_features)
        a = a.to(buf.dtype)
        if self.bias and layer.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        # addmm ignores buf (NaN included) at beta = 0; an empty batch adds nothing
        buf.addmm_(a.T, a, beta=beta, alpha=(1.0 - beta) / n if n else 0.0)


class _Hook:
    """One layer's forward hook: ``update(name, module, args, kwargs)``.

    A class, not a lambda, for what copying the model does with it: a copy (``copy.deepcopy``, an EMA or
    ``swa_utils.AveragedModel`` copy, ``torch.save(model)`` then ``torch.load``) has weights of its own and
    gets an :class:`_InertHook` instead, so its forwards never blend into these factors, and the whole model
    stays picklable (a lambda is not).
    """

    def __init__(self, update, name: str):
        self.update, self.name = update, name

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self.update(self.name, module, args, kwargs)

    def __deepcopy__(self, memo) -> _InertHook:
        return _InertHook()

    def __reduce__(self):
        return _InertHook, ()


class _InertHook:
    """The hook a copy of a hooked model gets (see :class:`_Hook`): does nothing."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        return None
