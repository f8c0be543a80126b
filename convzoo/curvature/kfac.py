"""convzoo.KFAC: a K-FAC preconditioner for training, on the factors :class:`convzoo.KFACFactors` keeps.

Example (any ``torch.optim`` optimizer after it)::

    import torch, convzoo

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kfac = convzoo.KFAC(model, damping=1e-3, inverse_every=10)
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)   # hooks update A (forward) and G (backward)
        opt.zero_grad(); loss.backward()
        kfac.step()                                              # weight.grad, bias.grad ← preconditioned
        opt.step()
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from convzoo.curvature.factors import _TRANSPOSED, KFACFactors, _Hook
from convzoo.functional import ekfac_eigenvalues

__all__ = ["KFAC"]

DAMPING_SPLITS = ("pi", "none")
FISHERS = ("empirical", "mc")
LOSSES = ("cross_entropy", "mse")


def _positive_real(value, name: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not (value > 0 or (allow_zero and value == 0)) or not math.isfinite(value):
        raise ValueError(f"{name} must be {'≥ 0' if allow_zero else '> 0'} and finite, got {value}")
    return value


class KFAC:
    """K-FAC preconditioning of the gradients of every ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` and
    ``Linear`` of ``model`` (or of ``modules``).

    :meth:`step`, called after ``loss.backward()`` and before ``optimizer.step()``, replaces each hooked
    layer's gradient matrix ``∇W`` (``[C_out/G, C_in/G·∏K + 1]`` per channel group: the weight's gradient,
    and the bias's as the last column, curvlinops' ``separate_weight_and_bias=False``) by
    ``(G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹`` and writes it back into ``weight.grad`` / ``bias.grad``. ``A`` and
    ``G`` are ``self.factors``' (a :class:`convzoo.KFACFactors` with ``gradients=True, scale='curvlinops'``:
    exponential moving averages with decay ``beta``, scaled as curvlinops' ``input_covariances`` /
    ``gradient_covariances`` for a loss averaged over the batch). Each factor's eigendecomposition
    (``torch.linalg.eigh``, batched over the groups, in ``inverse_dtype``) is recomputed every
    ``inverse_every`` steps (at the first step, and at a step where a layer has none yet); in between the
    last ones are reused with the damping of their time. With ``damping=(λ_A, λ_G)``, ``damping_split='none'``
    and ``beta=0`` one step is exactly curvlinops' ``KFACInverseLinearOperator(KFACLinearOperator(...,
    fisher_type='empirical', separate_weight_and_bias=False), damping=(λ_A, λ_G))`` applied to the gradient.

    Damping: a number ``λ`` with ``damping_split='pi'`` is Martens & Grosse's factored Tikhonov damping, per
    Kronecker pair (per group): ``π = sqrt((tr A / dim A) / (tr G / dim G))``, ``λ_A = max(π·√λ, min_damping)``,
    ``λ_G = max(√λ/π, min_damping)`` (curvlinops' ``use_heuristic_damping``); with ``'none'``, ``λ_A = λ_G = λ``
    (curvlinops' float damping). A pair ``(λ_A, λ_G)`` needs ``damping_split='none'``.

    KL clipping (``kl_clip=c``, kfac-pytorch's): with ``v`` the preconditioned and ``g`` the raw gradients
    of all hooked layers, every ``v`` is scaled by ``ν = min(1, sqrt(c / |Σ v·g·lr²|))``; ``lr`` (an
    attribute too, for a schedule) is the optimizer's learning rate.

    Fisher: ``'empirical'`` takes ``G`` from the training loss's backward. ``'mc'`` (curvlinops' MC Fisher
    with one sample) takes it from an extra backward, :meth:`mc_backward`, on labels drawn from the model's
    predictive distribution (``loss='cross_entropy'``: categorical of ``softmax(output)``; ``'mse'``:
    ``output + N(0, ½)``, the loss times ``√C`` as curvlinops scales a mean-reduced MSE); the training
    backward then leaves ``G`` alone. Call ``kfac.mc_backward(output)`` after the forward and before
    ``loss.backward()``: it costs one more backward through the model (the graph is kept for the training one).

    EKFAC (``ekfac=True``, George et al. 2018): the eigenvalues ``λ_G λ_Aᵀ`` of ``G ⊗ A`` are replaced by the
    corrected ones, ``s = E_n[(Q_Gᵀ dW_n Q_A)²]`` (the per-sample gradients' second moment in the Kronecker
    eigenbasis, :func:`convzoo.functional.ekfac_eigenvalues`: computed in each backward from the layer's input
    and output gradient without forming per-sample gradients, blended with the factors' ``beta``), and the step
    is ``Q_G [(Q_Gᵀ ∇W Q_A) / (s + λ)] Q_Aᵀ`` with the one damping ``λ`` (``damping_split`` does not apply).
    ``s`` needs an eigenbasis: it is collected from the backward after each eigendecomposition on, and a step
    without one in the current basis (the first, and each refresh, whose backward ran in the old basis) uses
    KFAC's ``λ_G λ_Aᵀ``. So ``inverse_every`` must be ≥ 2. ``kfac.corrected_eigenvalues[name]`` is ``s``
    (``[G, C_out/G, D]`` for a conv, ``[out, D]`` for a Linear). Blocks only (``group_reduction='blocks'``).

    Distributed: when ``torch.distributed`` is initialised with more than one process, every factor is
    all-reduced (averaged over the ranks, in place) before each eigendecomposition, so all ranks precondition
    identically (the gradients themselves are DDP's to average).

    Args:
        model: the module whose layers are preconditioned.
        damping: ``λ > 0``, or ``(λ_A, λ_G)``, both ``≥ 0``.
        damping_split: ``'pi'`` or ``'none'`` (see above).
        inverse_every: recompute the eigendecompositions every this many steps (a positive int).
        kl_clip: ``None``, or the KL bound ``c > 0`` (needs ``lr``).
        lr: the learning rate for KL clipping.
        fisher: ``'empirical'`` or ``'mc'``.
        loss: the training loss's likelihood for ``fisher='mc'``: ``'cross_entropy'`` or ``'mse'``
            (both mean-reduced, output ``[N, C]``).
        mode: ``'expand'`` or ``'reduce'`` (KFAC-expand / KFAC-reduce, as curvlinops' ``kfac_approx``).
        beta: the factors' EMA decay in ``[0, 1]``.
        group_reduction: ``'blocks'`` (a Kronecker pair per channel group) or ``'mean'`` (curvlinops' grouped
            convention: ``A`` of the group-averaged input, dense ``G [C_out, C_out]``).
        modules: as in :class:`convzoo.KFACFactors`.
        inverse_dtype: ``torch.float32`` or ``torch.float64`` for the eigendecompositions (``None``: the
            factor's dtype).
        min_damping: the floor of the π-split dampings.
        generator: the ``torch.Generator`` that draws the MC labels (``None``: the global one).
        ekfac: precondition with EKFAC's corrected eigenvalues (see above).

    Attributes:
        factors: the :class:`convzoo.KFACFactors` (``factors.input_factors`` / ``factors.gradient_factors``).
        corrected_eigenvalues: ``dict`` layer name → EKFAC's ``s`` in the current eigenbasis (``ekfac=True``;
            a layer is missing until its first backward after an eigendecomposition).
        steps: how many :meth:`step` calls so far.

    Raises:
        TypeError / ValueError: an argument of the wrong type or out of range, naming it (and those of
            :class:`convzoo.KFACFactors`).
    """

    def __init__(self, model: nn.Module, *, damping: float | tuple[float, float] = 1e-3, damping_split: str = "pi",
                 inverse_every: int = 10, kl_clip: float | None = None, lr: float | None = None,
                 fisher: str = "empirical", loss: str = "cross_entropy", mode: str = "expand", beta: float = 0.95,
                 group_reduction: str = "blocks", modules: Iterable[str | nn.Module] | None = None,
                 inverse_dtype: torch.dtype | None = None, min_damping: float = 1e-8,
                 generator: torch.Generator | None = None, ekfac: bool = False):
        for name, value, choices in (("damping_split", damping_split, DAMPING_SPLITS), ("fisher", fisher, FISHERS),
                                     ("loss", loss, LOSSES)):
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if isinstance(damping, tuple):
            if len(damping) != 2:
                raise ValueError(f"damping must be a number or a pair (λ_A, λ_G), got {damping!r}")
            if damping_split != "none":
                raise ValueError("damping=(λ_A, λ_G) needs damping_split='none' (the π split divides one λ)")
            damping = (_positive_real(damping[0], "damping[0]", allow_zero=True),
                       _positive_real(damping[1], "damping[1]", allow_zero=True))
        else:
            damping = _positive_real(damping, "damping")
        if isinstance(inverse_every, bool) or not isinstance(inverse_every, int):
            raise TypeError(f"inverse_every must be an int, got {inverse_every!r}")
        if inverse_every < 1:
            raise ValueError(f"inverse_every must be ≥ 1, got {inverse_every}")
        if kl_clip is not None:
            kl_clip = _positive_real(kl_clip, "kl_clip")
            if lr is None:
                raise ValueError("kl_clip needs lr (the optimizer's learning rate)")
        if lr is not None:
            lr = _positive_real(lr, "lr")
        if inverse_dtype not in (None, torch.float32, torch.float64):
            raise TypeError(f"inverse_dtype must be None, torch.float32 or torch.float64, got {inverse_dtype!r}")
        min_damping = _positive_real(min_damping, "min_damping", allow_zero=True)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if not isinstance(ekfac, bool):
            raise TypeError(f"ekfac must be a bool, got {ekfac!r}")
        if ekfac:
            if isinstance(damping, tuple):
                raise ValueError("ekfac=True takes one damping λ (added to the corrected eigenvalues), not a pair")
            if inverse_every < 2:
                raise ValueError("ekfac=True needs inverse_every ≥ 2: the corrected eigenvalues of a basis come from "
                                 "the backwards after it is computed")
            if group_reduction != "blocks":
                raise ValueError("ekfac=True needs group_reduction='blocks' (one eigenbasis per channel group)")
        self.factors = KFACFactors(model, mode=mode, beta=beta, bias=True, group_reduction=group_reduction,
                                   modules=modules, gradients=True, scale="curvlinops")
        self.damping, self.damping_split, self.inverse_every = damping, damping_split, inverse_every
        self.kl_clip, self.lr, self.fisher, self.loss = kl_clip, lr, fisher, loss
        self.inverse_dtype, self.min_damping, self.generator = inverse_dtype, min_damping, generator
        self.factors.record_gradients = fisher == "empirical"
        self._layers = {name: layer for name, layer in model.named_modules() if name in self.factors.factors}
        # per layer: (Q_A, eigenvalues of A + λ_A, Q_G, eigenvalues of G + λ_G), batched over groups
        self._eigen: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._lambdas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.steps = 0
        self.ekfac = ekfac
        self.corrected_eigenvalues: dict[str, torch.Tensor] = {}
        self._handles = []
        if ekfac:
            for name, layer in self._layers.items():
                self._handles.append(layer.register_forward_hook(_Hook(self._ekfac_forward, name), with_kwargs=True))

    # ------------------------------------------------------------------------------------------ public
    def remove(self) -> None:
        """Remove the factors' hooks (:meth:`step` keeps working on the last factors)."""
        self.factors.remove()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def step(self) -> None:
        """Precondition every hooked layer's ``weight.grad`` (and ``bias.grad``) in place.

        Layers without a gradient are skipped.

        Raises:
            RuntimeError: a layer has a gradient but its factors have had no update (no forward in training
                mode, or with ``fisher='mc'`` no :meth:`mc_backward`).
        """
        refresh = self.steps % self.inverse_every == 0
        if refresh:
            self._all_reduce_factors()
        pending = []
        for name, layer in self._layers.items():
            if layer.weight.grad is None:
                continue
            if not self.factors.started(name):
                hint = " (fisher='mc': call kfac.mc_backward(output) before loss.backward())" \
                    if self.fisher == "mc" else ""
                raise RuntimeError(f"KFAC.step(): layer {name!r} has a gradient but its factors have no update yet"
                                   f"{hint}")
            if refresh or name not in self._eigen:
                self._eigen[name] = self._decompose(name)
                self.corrected_eigenvalues.pop(name, None)  # s of the old basis
            grad = self._grad_matrix(layer)
            pending.append((layer, grad, self._precondition(name, grad)))
        nu = self._kl_scale(pending) if self.kl_clip is not None else None
        for layer, _, new in pending:
            if nu is not None:
                new = new * nu
            self._write_grad(layer, new)
        self.steps += 1

    def mc_backward(self, output: torch.Tensor) -> None:
        """``fisher='mc'``: one backward of the loss on labels sampled from the model's predictive
        distribution at ``output`` (``[N, C]``, the model's output of this step's forward); it updates ``G``
        and leaves every ``.grad`` unchanged. Call it before ``loss.backward()`` (the graph is retained).

        Raises:
            RuntimeError: ``fisher`` is not ``'mc'``.
            ValueError: ``output`` is not a 2-d tensor that requires grad.
        """
        if self.fisher != "mc":
            raise RuntimeError("mc_backward() is for fisher='mc'; with fisher='empirical' G comes from loss.backward()")
        if not isinstance(output, torch.Tensor) or output.dim() != 2 or not output.requires_grad:
            raise ValueError(f"output must be the model's [N, C] output that requires grad, got "
                             f"{tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__}")
        with torch.no_grad():
            if self.loss == "cross_entropy":
                labels = output.softmax(1).multinomial(1, generator=self.generator).squeeze(-1)
            else:
                labels = output + math.sqrt(0.5) * torch.randn(output.shape, dtype=output.dtype, device=output.device,
                                                               generator=self.generator)
        if self.loss == "cross_entropy":
            sampled = F.cross_entropy(output, labels)
        else:
            sampled = F.mse_loss(output, labels) * math.sqrt(output.shape[1])
        params = [p for layer in self._layers.values() for p in layer.parameters(recurse=False) if p.requires_grad]
        self.factors.record_gradients = True
        try:
            torch.autograd.grad(sampled, params, retain_graph=True, allow_unused=True)
        finally:
            self.factors.record_gradients = False

    def state_dict(self) -> dict:
        """The factors (:meth:`KFACFactors.state_dict`), the step count and the current eigendecompositions."""
        return {"factors": self.factors.state_dict(), "steps": self.steps,
                "eigen": {name: tuple(t for t in value) for name, value in self._eigen.items()},
                "lambdas": {name: tuple(value) for name, value in self._lambdas.items()},
                "corrected_eigenvalues": dict(self.corrected_eigenvalues)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (eigendecompositions copied to each factor's device).

        Raises:
            ValueError: ``state`` is not a ``KFAC.state_dict()`` of the same layers.
        """
        keys = {"factors", "steps", "eigen", "lambdas", "corrected_eigenvalues"}
        if not isinstance(state, dict) or set(state) != keys:
            raise ValueError(f"state must be a KFAC.state_dict(): a dict with the keys {sorted(keys)}")
        eigen = state["eigen"]
        if not isinstance(eigen, dict) or not set(eigen) <= set(self._layers):
            raise ValueError(f"state's eigendecompositions are for layers {sorted(eigen)}, not all of "
                             f"{sorted(self._layers)}")
        if isinstance(state["steps"], bool) or not isinstance(state["steps"], int) or state["steps"] < 0:
            raise ValueError(f"state's steps must be an int ≥ 0, got {state['steps']!r}")
        self.factors.load_state_dict(state["factors"])
        device = {name: f.device for name, f in self.factors.factors.items()}
        self._eigen = {name: tuple(t.to(device[name]) for t in value) for name, value in eigen.items()}
        self._lambdas = {name: tuple(t.to(device[name]) for t in value) for name, value in state["lambdas"].items()}
        self.corrected_eigenvalues = {name: t.to(device[name]) for name, t in state["corrected_eigenvalues"].items()}
        self.steps = state["steps"]

    # ------------------------------------------------------------------------------------------ internals
    def _all_reduce_factors(self) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        for factors in (self.factors.input_factors, self.factors.gradient_factors):
            for factor in factors.values():
                dist.all_reduce(factor)
                factor.div_(world)

    def _decompose(self, name: str):
        a, g = self.factors.input_factors[name], self.factors.gradient_factors[name]
        dtype = self.inverse_dtype or a.dtype
        a, g = a.to(dtype), g.to(dtype)
        if a.dim() == 2:
            a = a[None]
        if g.dim() == 2:
            g = g[None]
        if isinstance(self.damping, tuple):
            lam_a = a.new_full((a.shape[0], 1), self.damping[0])
            lam_g = g.new_full((g.shape[0], 1), self.damping[1])
        elif self.damping_split == "none":
            lam_a = a.new_full((a.shape[0], 1), self.damping)
            lam_g = g.new_full((g.shape[0], 1), self.damping)
        else:
            mean_a = a.diagonal(dim1=1, dim2=2).mean(1, keepdim=True)
            mean_g = g.diagonal(dim1=1, dim2=2).mean(1, keepdim=True)
            pi = (mean_a / mean_g).sqrt()
            root = math.sqrt(self.damping)
            lam_a = (pi * root).clamp(min=self.min_damping)
            lam_g = (root / pi).clamp(min=self.min_damping)
        eig_a, q_a = torch.linalg.eigh(a)
        eig_g, q_g = torch.linalg.eigh(g)
        self._lambdas[name] = (lam_a, lam_g)
        return q_a, eig_a + lam_a, q_g, eig_g + lam_g

    def _precondition(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """``(G + λ_G)⁻¹ M (A + λ_A)⁻¹`` of ``M = grad`` ``[B, C_out', D]`` through the eigendecompositions."""
        q_a, eig_a, q_g, eig_g = self._eigen[name]
        m = grad.to(q_a.dtype)
        inner = q_g.transpose(1, 2) @ m @ q_a
        s = self.corrected_eigenvalues.get(name)
        if s is not None:
            inner = inner / (s.reshape(inner.shape).to(inner.dtype) + self.damping)
        elif self.ekfac:  # no s in this basis yet: KFAC's eigenvalues, damped as EKFAC damps
            undamped_a, undamped_g = eig_a - self._lambdas[name][0], eig_g - self._lambdas[name][1]
            inner = inner / (undamped_g[:, :, None] * undamped_a[:, None, :] + self.damping)
        else:
            inner = inner / (eig_g[:, :, None] * eig_a[:, None, :])
        return (q_g @ inner @ q_a.transpose(1, 2)).to(grad.dtype)

    def _ekfac_forward(self, name: str, layer: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """EKFAC: keep this forward's input for its backward, where the statistic is taken in the basis of then."""
        if not layer.training or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        x = args[0].detach()
        if x.numel() == 0:
            return
        output_size = args[1] if len(args) > 1 else kwargs.get("output_size")
        output.register_hook(lambda grad: self._ekfac_update(name, layer, x, output_size, grad))

    @torch.no_grad()
    def _ekfac_update(self, name: str, layer: nn.Module, x: torch.Tensor, output_size, grad: torch.Tensor) -> None:
        if not self.factors.record_gradients or name not in self._eigen or grad.numel() == 0:
            return
        q_a, _, q_g, _ = self._eigen[name]
        dtype = self.factors.input_factors[name].dtype  # the statistic's (x's accumulator) dtype
        q_a, q_g = q_a.to(x.device, dtype), q_g.to(x.device, dtype)
        bias = layer.bias is not None
        if isinstance(layer, nn.Linear):
            new = ekfac_eigenvalues(x, grad.detach(), q_a[0], q_g[0], bias=bias)
        elif isinstance(layer, _TRANSPOSED):
            output_padding = layer._output_padding(x, output_size, layer.stride, layer.padding, layer.kernel_size,
                                                   len(layer.kernel_size), layer.dilation)
            new = ekfac_eigenvalues(x, grad.detach(), q_a, q_g, layer.kernel_size, layer.stride, layer.padding,
                                    layer.dilation, layer.groups, bias=bias, transposed=True,
                                    output_padding=tuple(output_padding))
        else:
            new = ekfac_eigenvalues(x, grad.detach(), q_a, q_g, layer.kernel_size, layer.stride, layer.padding,
                                    layer.dilation, layer.groups, bias=bias, padding_mode=layer.padding_mode)
        old = self.corrected_eigenvalues.get(name)
        beta = self.factors.beta
        self.corrected_eigenvalues[name] = new if old is None else old.mul_(beta).add_(new, alpha=1.0 - beta)

    def _kl_scale(self, pending) -> torch.Tensor:
        if not pending:
            return None
        vg = sum((new.to(torch.float64) * grad.to(torch.float64)).sum() for _, grad, new in pending) * self.lr ** 2
        return torch.sqrt(self.kl_clip / vg.abs()).clamp(max=1.0)  # vg = 0 → inf → 1

    def _blocks(self, layer: nn.Module) -> int:
        """How many Kronecker pairs the layer's gradient matrix is cut into (the leading dim)."""
        if isinstance(layer, nn.Linear) or self.factors.group_reduction == "mean":
            return 1
        return layer.groups

    def _grad_matrix(self, layer: nn.Module) -> torch.Tensor:
        """``[B, C_out/B, D]``: the weight's gradient in the factor's row order, the bias's as the last column."""
        w = layer.weight.grad
        groups = 1 if isinstance(layer, nn.Linear) else layer.groups
        if isinstance(layer, _TRANSPOSED):  # [C_in, C_out/G, *K] → [G, C_out/G, C_in/G·∏K] (unfold_transpose's rows)
            c_in, c_out_g = w.shape[:2]
            m = w.reshape(groups, c_in // groups, c_out_g, -1).permute(0, 2, 1, 3).reshape(groups, c_out_g, -1)
        else:
            m = w.reshape(groups, w.shape[0] // groups, -1)
        if layer.bias is not None:
            b = layer.bias.grad
            b = torch.zeros(layer.bias.shape, dtype=w.dtype, device=w.device) if b is None else b
            m = torch.cat([m, b.reshape(groups, -1, 1).to(m.dtype)], 2)
        blocks = self._blocks(layer)
        return m.reshape(blocks, -1, m.shape[2])

    def _write_grad(self, layer: nn.Module, new: torch.Tensor) -> None:
        w = layer.weight.grad
        groups = 1 if isinstance(layer, nn.Linear) else layer.groups
        new = new.reshape(groups, -1, new.shape[2])
        if layer.bias is not None:
            new, b = new[..., :-1], new[..., -1]
            if layer.bias.grad is None:
                layer.bias.grad = b.reshape(layer.bias.shape).to(layer.bias.dtype).clone()
            else:
                layer.bias.grad.copy_(b.reshape(layer.bias.shape))
        if isinstance(layer, _TRANSPOSED):
            c_in, c_out_g = w.shape[:2]
            new = new.reshape(groups, c_out_g, c_in // groups, -1).permute(0, 2, 1, 3)
        w.copy_(new.reshape(w.shape))
