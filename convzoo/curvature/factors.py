"""KFAC factors of a model's layers (input side A, and with ``gradients=True`` output-gradient side G), kept
up to date by forward hooks and by tensor hooks on the layers' outputs.

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

SCALES = ("sample", "curvlinops")

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

    **Gradient factors** (``gradients=True``): the forward hook also registers a tensor hook on the layer's
    output, which in the backward pass blends the second moment of the output gradient ``g`` (what the loss's
    backward sends into the layer; no second backward, no per-sample gradients) into ``G`` in place with the
    same EMA: ``G ← beta·G + (1 − beta)·N·Σ g gᵀ``, the sum over the samples and output positions (expand) or
    over the samples of ``Σ_l g_{n,l}`` (reduce), per channel group (``[G, C_out/G, C_out/G]``; ``[C_out, C_out]``
    with ``group_reduction='mean'``, curvlinops' dense grouped convention; ``[out, out]`` for a ``Linear``).
    The factor ``N`` (the batch) makes ``G`` curvlinops' ``gradient_covariances`` of a loss averaged over the
    batch (``reduction='mean'``; for a summed loss divide by ``N²``). A backward that does not reach a layer's
    output leaves its ``G`` unchanged; several backwards through one forward each count (the MC Fisher of
    :class:`convzoo.KFAC` turns the empirical one off). A forward under ``torch.no_grad()`` registers no hook.

    **Scale** (``scale=``): ``'sample'`` (the default) scales ``A`` by ``1/N`` (a sum over the output
    positions, averaged over the samples: einconv's normalisation, as before); ``'curvlinops'`` by
    ``1/(N·L)`` for expand (``L`` output positions; for a ``Linear`` on ``[N, T, in]``, ``1/(N·T)``), ``1/N``
    for reduce: curvlinops' ``input_covariances``, so that ``G ⊗ A`` is curvlinops' KFAC block
    (``fisher_type='empirical'``, the same ``kfac_approx``, ``separate_weight_and_bias=False``) for one batch
    and ``beta=0``. ``G`` is the same in both scales.

    An empty batch (``N = 0``) leaves every factor, and whether it has started, unchanged.

    Args:
        model: the module whose layers are hooked (itself included, if it is one of the supported types).
        mode: ``'expand'`` (KFC / KFAC-expand) or ``'reduce'`` (KFAC-reduce), as in ``patch_covariance``.
        beta: the EMA's decay, a real number in ``[0, 1]`` (``0``: each factor is the latest batch's).
        bias: append the bias column to the factor of each layer that has a bias.
        group_reduction: ``'blocks'`` or ``'mean'``, as in ``patch_covariance`` (conv layers only).
        modules: ``None`` for every supported layer of ``model``, else the names (as in
            ``model.named_modules()``) or the modules themselves to hook, each a supported layer of ``model``.
        gradients: also keep the output-gradient factors ``G`` (``gradient_factors``).
        scale: ``'sample'`` or ``'curvlinops'`` (see above).

    Attributes:
        factors: ``dict`` layer name → input factor ``A`` (updated in place; ``kfac[name]`` is the same).
        input_factors: the same dict as ``factors``.
        gradient_factors: ``dict`` layer name → ``G`` (empty without ``gradients``); fp32 (fp64 for fp64
            layers), updated in place.

    Raises:
        TypeError: ``model`` not an ``nn.Module``, ``beta`` not a real number, ``bias`` / ``gradients`` not a
            bool, a module in ``modules`` of a type that has no factor here.
        ValueError: ``beta`` outside ``[0, 1]``, an unknown ``mode`` / ``group_reduction`` / ``scale``, a name or module
            in ``modules`` that is not in ``model``, a hooked lazy layer (``LazyConv2d``, ...) not yet run.
    """

    def __init__(self, model: nn.Module, *, mode: str = "expand", beta: float = 0.95, bias: bool = True,
                 group_reduction: str = "blocks", modules: Iterable[str | nn.Module] | None = None,
                 gradients: bool = False, scale: str = "sample"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        for name, value, choices in (("mode", mode, _shapes.COVARIANCE_MODES),
                                     ("group_reduction", group_reduction, _shapes.GROUP_REDUCTIONS),
                                     ("scale", scale, SCALES)):
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
            raise TypeError(f"beta must be a real number, got {beta!r}")
        if not 0.0 <= float(beta) <= 1.0:  # NaN fails too
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        for name, flag in (("bias", bias), ("gradients", gradients)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        self.mode, self._beta, self.bias, self.group_reduction = mode, float(beta), bias, group_reduction
        self.gradients, self.scale = gradients, scale
        self.factors: dict[str, torch.Tensor] = {}
        self.input_factors = self.factors
        self.gradient_factors: dict[str, torch.Tensor] = {}
        self._g_started: dict[str, bool] = {}
        # the G hooks blend only while this is set (convzoo.KFAC's MC Fisher clears it for the training backward)
        self.record_gradients = True
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
            if gradients:
                self.gradient_factors[name] = g = self._new_gradient_factor(layer)
                self._g_started[name] = g.new_zeros(())
            self._handles.append(layer.register_forward_hook(_Hook(self._forward_hook, name), with_kwargs=True))

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
        for name, factor in self.gradient_factors.items():
            factor.zero_()
            self._g_started[name].zero_()

    def started(self, name: str) -> bool:
        """Whether layer ``name``'s factors (``A``, and ``G`` when kept) have had an update since construction
        or :meth:`reset`."""
        return self._started[name] and (not self.gradients or bool(self._g_started[name]))

    def state_dict(self) -> dict:
        """The factors and whether each has started its average, for a checkpoint (tensors are the live
        buffers, as ``nn.Module.state_dict`` gives them; ``torch.save`` copies). With ``gradients`` also
        ``'gradient_factors'`` and ``'gradient_started'``."""
        state = {"factors": dict(self.factors), "started": dict(self._started)}
        if self.gradients:
            state.update(gradient_factors=dict(self.gradient_factors),
                         gradient_started={k: bool(v) for k, v in self._g_started.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s factors (copied into the buffers, which keep their device and dtype)
        and started flags.

        Raises:
            ValueError: ``state`` is not a state_dict of the same layers with factors of the same shapes.
        """
        keys = {"factors", "started"} | ({"gradient_factors", "gradient_started"} if self.gradients else set())
        if not isinstance(state, dict) or set(state) != keys:
            raise ValueError(f"state must be a KFACFactors.state_dict(): a dict with the keys {sorted(keys)}")
        pairs = [(state["factors"], state["started"], self.factors, self._started)]
        if self.gradients:
            pairs.append((state["gradient_factors"], state["gradient_started"], self.gradient_factors,
                          self._g_started))
        for factors, started, mine, _ in pairs:
            if set(factors) != set(mine) or set(started) != set(mine):
                raise ValueError(f"state holds the layers {sorted(factors)}, these factors are for {sorted(mine)}")
            for name, value in factors.items():
                if not isinstance(value, torch.Tensor) or value.shape != mine[name].shape:
                    raise ValueError(f"state's factor {name!r} must be a tensor of shape "
                                     f"{tuple(mine[name].shape)}, got {getattr(value, 'shape', type(value))}")
        for factors, started, mine, mine_started in pairs:
            for name, value in factors.items():
                mine[name].copy_(value)
                if isinstance(mine_started[name], torch.Tensor):
                    mine_started[name].fill_(float(bool(started[name])))
                else:
                    mine_started[name] = bool(started[name])

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

    def _new_gradient_factor(self, layer: nn.Module) -> torch.Tensor:
        w = layer.weight
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        if isinstance(layer, nn.Linear):
            shape = (layer.out_features, layer.out_features)
        elif self.group_reduction == "mean":
            shape = (layer.out_channels, layer.out_channels)
        else:
            shape = (layer.groups, layer.out_channels // layer.groups, layer.out_channels // layer.groups)
        return torch.zeros(shape, dtype=dtype, device=w.device)

    # Under torch.compile(dynamic=True) dynamo turns a float read from an attribute into a SymFloat, which
    # patch_covariance's check of beta (math.isfinite) cannot trace with fullgraph=True. beta is fixed at
    # construction (read-only), so a constant the trace may bake in without a guard is exact.
    @torch.compiler.assume_constant_result
    def _decay(self) -> float:
        return self._beta

    @staticmethod
    def _dtype_of(x: torch.Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def _buffer(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The layer's factor on ``x``'s device, fp64 for an fp64 ``x`` and fp32 otherwise (converted once
        if the model moved or changed dtype since, as patch_covariance's ``out`` must match), and this
        update's beta."""
        buf = self.factors[name]
        dtype = self._dtype_of(x)
        if buf.device != x.device or buf.dtype != dtype:
            buf = self.factors[name] = buf.to(x.device, dtype)
        beta = self._decay() if self._started[name] else 0.0
        self._started[name] = True
        return buf, beta

    def _gradient_buffer(self, name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``G`` and its started flag (a 0-dim tensor, 0 or 1) on ``like``'s device and in its factor dtype,
        converted here, in the forward: the backward's tensor hook may mutate tensors but not Python state
        (Dynamo refuses a side effect there), so the hook's "is this the first update" is a tensor too."""
        buf, started = self.gradient_factors[name], self._g_started[name]
        dtype = self._dtype_of(like)
        if buf.device != like.device or buf.dtype != dtype:
            buf = self.gradient_factors[name] = buf.to(like.device, dtype)
            started = self._g_started[name] = started.to(like.device, dtype)
        return buf, started

    def _forward_hook(self, name: str, layer: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if not layer.training:
            return
        x = args[0]
        unbatched = x.dim() == (1 if isinstance(layer, nn.Linear) else len(layer.kernel_size) + 1)
        if x.numel() == 0:  # an empty batch (or sequence): no update at all, of A or G
            return
        if not _compat.recomputed_forward():
            if isinstance(layer, nn.Linear):
                self._linear_update(name, layer, x.detach()[None] if unbatched else x.detach())
            else:
                self._conv_update(name, layer, x.detach(), args, kwargs, output, unbatched)
        # G: a hook on this forward's output (a tensor hook, not a module backward hook: it also sees through an
        # in-place activation after the layer and compiles). Reentrant checkpointing runs the real forward without
        # grad and this hook in its recompute, so the recompute is not skipped here.
        if self.gradients and isinstance(output, torch.Tensor) and output.requires_grad:
            buf, started = self._gradient_buffer(name, output)
            output.register_hook(_GradientHook(self, layer, unbatched, buf, started, self._decay()))

    def _conv_update(self, name: str, layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict, output,
                     unbatched: bool) -> None:
        buf, beta = self._buffer(name, x)
        scale = None
        if self.scale == "curvlinops" and self.mode == "expand":
            n = 1 if unbatched else x.shape[0]
            positions = output.shape[1:].numel() if unbatched else output.shape[2:].numel()
            scale = 1.0 / (n * positions)
        common = dict(mode=self.mode, group_reduction=self.group_reduction, bias=self.bias and layer.bias is not None,
                      out=buf, beta=beta, scale=scale)
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

    def _linear_update(self, name: str, layer: nn.Linear, x: torch.Tensor) -> None:
        buf, beta = self._buffer(name, x)
        n = x.shape[0]
        if self.mode == "reduce":
            a, rows = x.reshape(n, -1, layer.in_features).mean(1), n
        else:
            a = x.reshape(-1, layer.in_features)
            rows = a.shape[0] if self.scale == "curvlinops" else n  # curvlinops: 1/(N·T) for [N, T, in]
        a = a.to(buf.dtype)
        if self.bias and layer.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        # addmm ignores buf (NaN included) at beta = 0
        buf.addmm_(a.T, a, beta=beta, alpha=(1.0 - beta) / rows)

    def _gradient_update(self, layer: nn.Module, unbatched: bool, buf: torch.Tensor, started: torch.Tensor,
                         beta: float, grad: torch.Tensor) -> None:
        if not self.record_gradients:
            return
        g = grad.detach()
        if unbatched:
            g = g[None]
        n = g.shape[0]
        if g.numel() == 0:
            return
        groups = buf.shape[0] if buf.dim() == 3 else 1
        g = g.to(buf.dtype)
        if isinstance(layer, nn.Linear):  # [N, *, out]: rows are the last dim (a view)
            rows = g.reshape(n, -1, layer.out_features)
            rows = rows.sum(1) if self.mode == "reduce" else rows.reshape(-1, layer.out_features)
            new = rows.T @ rows
        elif self.mode == "reduce":
            rows = g.reshape(n, g.shape[1], -1).sum(2)  # [N, C_out]
            rows = rows.view(n, groups, -1).transpose(0, 1)  # [G, N, C_out/G]
            new = torch.bmm(rows.transpose(1, 2), rows)
        else:
            # [N, C_out, L]: one [C_out/G, L] @ [L, C_out/G] per sample and group, no copy for a contiguous
            # gradient (a channels-last one is copied by the reshape; no branch on its strides: Dynamo cannot
            # trace a hook that reads the gradient's layout)
            per = g.reshape(n * groups, g.shape[1] // groups, -1)
            new = torch.bmm(per, per.transpose(1, 2)).view(n, groups, per.shape[1], per.shape[1]).sum(0)
        if buf.dim() == 2 and new.dim() == 3:
            new = new[0]
        new = new * n  # N: curvlinops' correction for a mean-reduced loss
        # G ← G + w·(new − G), w = 1 − beta·started: new itself at the first update (started = 0)
        buf.lerp_(new, 1.0 - beta * started)
        started.fill_(1.0)


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
        self.update(self.name, module, args, kwargs, output)

    def __deepcopy__(self, memo) -> _InertHook:
        return _InertHook()

    def __reduce__(self):
        return _InertHook, ()


class _InertHook:
    """The hook a copy of a hooked model gets (see :class:`_Hook`): does nothing."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        return None


class _GradientHook:
    """The tensor hook on one forward's output of a layer: blends its gradient into the layer's ``G``; returns
    nothing, so the gradient flows on unchanged."""

    def __init__(self, owner: KFACFactors, layer: nn.Module, unbatched: bool, buf: torch.Tensor,
                 started: torch.Tensor, beta: float):
        self.owner, self.layer, self.unbatched = owner, layer, unbatched
        self.buf, self.started, self.beta = buf, started, beta

    def __call__(self, grad: torch.Tensor) -> None:
        self.owner._gradient_update(self.layer, self.unbatched, self.buf, self.started, self.beta, grad)
