"""``DynamicSparseConv1d/2d/3d``: masked convolutions whose mask is trained (prune and regrow), pruned by the
layer's own coactivation statistics (:func:`convzoo.functional.coactivation`) or by weight magnitude, regrown by
the statistics, the dense gradient (RigL, tapped from the backward that runs anyway) or at random (SET); and
:class:`PruneRegrowSchedule`, per layer or global."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from convzoo import _compat, sparsity
from convzoo import functional as cf
from convzoo.layers.masked_conv import MaskedConv1d, MaskedConv2d, MaskedConv3d, _fx_leaf

__all__ = ["DynamicSparseConv1d", "DynamicSparseConv2d", "DynamicSparseConv3d", "PruneRegrowSchedule"]

SCORES = ("count", "correlation", "magnitude")
REGROWS = ("coactivation", "random", "gradient")
REGROW_INITS = ("init", "zeros")
SCOPES = ("layer", "global")


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` (a full tensor) placed as ``ref`` is: sharded the same way when ``ref`` is a DTensor (FSDP)."""
    if isinstance(ref, DTensor):
        return distribute_tensor(t, ref.device_mesh, ref.placements)
    return t


class _DynamicSparseConvNd:
    """The statistics and the prune / regrow step shared by the three classes (mixed in before MaskedConvNd)."""

    def _init_dynamic(self, update_every, score, prune_fraction, regrow, prune_dims, ema, x_threshold,
                      y_threshold, regrow_init=None) -> None:
        _compat.warn_if_blind_to_recompute(type(self).__name__)
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive int, got {update_every!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if regrow not in REGROWS:
            raise ValueError(f"regrow must be one of {REGROWS}, got {regrow!r}")
        if regrow_init is None:
            regrow_init = "zeros" if regrow == "gradient" else "init"
        if regrow_init not in REGROW_INITS:
            raise ValueError(f"regrow_init must be None or one of {REGROW_INITS}, got {regrow_init!r}")
        self.regrow_init = regrow_init
        self.prune_fraction = sparsity._check_density(prune_fraction, "prune_fraction")
        self.ema = None if ema is None else sparsity._check_density(ema, "ema")
        self.x_threshold = cf._threshold(x_threshold, "x_threshold")
        self.y_threshold = cf._threshold(y_threshold, "y_threshold")
        if not isinstance(prune_dims, Sequence) or isinstance(prune_dims, str):
            raise TypeError(f"prune_dims must be a sequence of ints, got {prune_dims!r}")
        sparsity._check_dims(prune_dims, self.weight.dim())  # raises on a bad entry
        self.prune_dims = tuple(int(d) for d in prune_dims)
        structure = (f"block={self._mask_block}" if self._mask_block is not None
                     else f"nm={self._mask_nm}" if self._mask_nm is not None else None)
        if structure and sparsity._check_dims(prune_dims, self.weight.dim()) not in ((), (0,)):
            raise ValueError(f"prune_dims must be (0,) or () with {structure}, got {self.prune_dims}")
        self.update_every, self.score_mode, self.regrow_mode = update_every, score, regrow
        if self.prune_dims != (0,) and structure is None and self._mask_density != 1.0:
            with torch.no_grad():
                self.mask.copy_(self._draw_mask())
        self._zero_masked_weight()  # the stored weight is the sparse weight
        # what the statistics count: the score's own mode; 'magnitude' with coactivation regrowth counts
        self.statistic = "correlation" if score == "correlation" else "count"
        self.collects = score != "magnitude" or regrow == "coactivation"
        if self.statistic == "correlation" and (self.x_threshold != 0.0 or self.y_threshold != 0.0):
            # as the functional refuses it; the compiled path, which shifts by the thresholds, would not notice
            raise ValueError("score='correlation' takes no thresholds (a correlation is shift-invariant): leave "
                             "x_threshold and y_threshold at 0")
        if self.collects and self.padding_mode != "zeros":
            raise ValueError(f"coactivation statistics count padded positions as inactive, which only zero padding "
                             f"defines: padding_mode={self.padding_mode!r} needs score='magnitude' and "
                             f"regrow='random'")
        dtype = torch.float32 if self.statistic == "count" else self.weight.dtype
        # the statistics are per process until prune_regrow sums them: not a buffer, because DDP broadcasts the
        # buffers from rank 0 before every forward (which would overwrite the other ranks' counts); state_dict and
        # device moves still carry it (see _apply and the state-dict hooks)
        self._coactivation = torch.zeros(self.weight.shape, dtype=dtype, device=self.weight.device)
        # forward calls in training mode, as a tensor (the compiled schedule reads it without a recompile) and
        # as a Python int (eager reads it without a host sync)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64, device=self.weight.device))
        self._calls = 0
        # regrow='gradient': the dense-gradient tap, a weight-shaped leaf whose .grad the backward of an update
        # step fills with ∂L/∂W at the masked entries (its value is never read; not a parameter: no optimizer
        # steps it, zero_grad leaves it); prune_regrow reads and clears its gradient
        self._grad_tap = None
        if regrow == "gradient":
            self._grad_tap = torch.zeros(self.weight.shape, dtype=self.weight.dtype, device=self.weight.device,
                                         requires_grad=True)

    def _mask_dims(self) -> tuple[int, ...]:
        # the initial mask has prune_regrow's exact count per slice (while the base constructor draws it,
        # prune_dims is not set yet: _init_dynamic draws it again where the slices differ)
        return getattr(self, "prune_dims", (0,))

    @property
    def coactivation(self) -> torch.Tensor:
        """The statistics accumulated since the last :meth:`prune_regrow` (this process's only, under DDP)."""
        return self._coactivation

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        device = self.weight.device
        if self._coactivation.is_meta and device.type != "meta":
            # to_empty from 'meta': no values to move; zero statistics (reset_parameters zeroes them too)
            self._coactivation = torch.zeros_like(self._coactivation, device=device)
        else:
            self._coactivation = self._coactivation.to(device)  # the device only: counts stay fp32
        tap = self._grad_tap
        if tap is not None and (tap.device != device or tap.dtype != self.weight.dtype or tap.is_meta):
            # a fresh leaf on the new device / dtype (a gradient collected before the move is dropped)
            self._grad_tap = torch.zeros(self.weight.shape, dtype=self.weight.dtype, device=device,
                                         requires_grad=True)
        return out

    @property
    def dense_grad(self) -> torch.Tensor | None:
        """``regrow='gradient'``: the dense weight gradient ``∂L/∂W`` at the entries the mask drops, summed over
        the update steps since the last :meth:`prune_regrow` (zero where the mask keeps; None before any update
        step's backward, or for another ``regrow``)."""
        return None if self._grad_tap is None else self._grad_tap.grad

    def _taps_gradient(self, input: torch.Tensor) -> bool:
        """Whether this forward may tap the dense gradient: ``regrow='gradient'``, a training step that
        differentiates the weight (not under a ``torch.func`` transform, not a recomputed forward)."""
        return (self._grad_tap is not None and self.training and torch.is_grad_enabled()
                and self.weight.requires_grad and (torch.compiler.is_compiling() or not _compat.differentiating())
                and not _compat.recomputed_forward())

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self._taps_gradient(input):
            return super()._conv_forward(input, weight, bias)
        # an update step: the update_every-th training forward (calls counts the ones before this), as a tensor
        # under compile (no recompile per step), a Python int in eager (no host sync; off-steps take the plain op)
        if torch.compiler.is_compiling():
            run = (self.calls + 1) % self.update_every == 0
        elif (self._calls + 1) % self.update_every:
            return super()._conv_forward(input, weight, bias)
        else:
            run = torch.ones((), dtype=torch.bool, device=self.mask.device)
        from convzoo.ops import masked_conv as ops

        unbatched = input.dim() == self.weight.dim() - 1
        x = input[None] if unbatched else input
        args = cf._resolved(cf._masked_conv_args, cf._cached_masked_conv_args, x.shape, weight.shape, self.stride,
                            self.padding, self.dilation, self.groups, self.padding_mode)
        x, w, b = cf._autocast(x, weight, bias)
        block = None if self._mask_block is None else list(self._mask_block)
        y = ops.masked_conv_dense_grad(x, w, self._grad_tap, self.mask, run, b, *cf._as_lists(args), block)
        return y[0] if unbatched else y

    def reset_parameters(self) -> None:
        """The masked layer's re-initialisation (weight, bias, a new mask), and the statistics and both call
        counters back to zero (after ``to_empty`` they are uninitialised memory)."""
        super().reset_parameters()
        if "calls" in self._buffers:  # (the base constructors call this before the statistics exist)
            with torch.no_grad():
                self._coactivation.zero_()
                self.calls.zero_()
            self._calls = 0

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "coactivation"] = self._coactivation if keep_vars else self._coactivation.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "coactivation"
        if key in state_dict:
            value = state_dict[key]
            if value.shape != self._coactivation.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, the "
                                  f"shape in current model is {tuple(self._coactivation.shape)}.")
            else:
                with torch.no_grad():
                    if self._coactivation.is_meta or local_metadata.get("assign_to_params_buffers", False):
                        # (load_state_dict(assign=True), or a layer on 'meta', where a copy would keep no values)
                        self._coactivation = value.detach().to(self._coactivation.dtype)
                    else:
                        self._coactivation.copy_(value)
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        calls = prefix + "calls"
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self._coactivation.is_meta and not self.weight.is_meta:  # (assigned weights, no statistics loaded)
            self._coactivation = torch.zeros_like(self._coactivation, device=self.weight.device)
        if calls not in state_dict:
            # an older state_dict (or a MaskedConv's) without the counter: it loads, the counters stay as they are
            if calls in missing_keys:
                missing_keys.remove(calls)
        elif not self.calls.is_meta:
            # the eager schedule's Python counter follows the loaded tensor one (one host read, at load time)
            self._calls = int(self.calls)

    def _statistics(self, x: torch.Tensor, y: torch.Tensor, x_threshold: float, y_threshold: float) -> torch.Tensor:
        return cf.coactivation(x, y, tuple(self.weight.shape), self.stride, self.padding, self.dilation, self.groups,
                               x_threshold=x_threshold, y_threshold=y_threshold, mode=self.statistic)

    @staticmethod
    def _shift(t: torch.Tensor, threshold: float) -> torch.Tensor:
        """``t - threshold`` compared with 0 as ``t > threshold`` is (in fp32, fp64 for fp64; exact: two different
        floats never subtract to 0), so a compiled branch passes the op no Python float (torch.cond would lift one
        as a symbolic float, which a custom op's ``float`` argument refuses)."""
        t = t.detach()
        if threshold == 0.0:
            return t
        return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32) - threshold

    def _blend(self, acc: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        h = h.to(acc.dtype)
        return acc + h if self.ema is None else acc * self.ema + h * (1 - self.ema)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        leaf = _fx_leaf(self, input)  # torch.fx.symbolic_trace: the layer as one call_module node
        if leaf is not None:
            return leaf
        y = super().forward(input)
        if (not (self.training and (self.collects or self._grad_tap is not None)) or _compat.recomputed_forward()
                or (not torch.compiler.is_compiling() and _compat.functorch_transforming())):
            # (in backward: activation checkpointing recomputing a forward whose input was counted already; under
            # a torch.func transform (grad, jvp, vmap, ...): a pure function, no statistics, no counter step)
            return y
        x = input if input.dim() == self.weight.dim() else input[None]
        yb = y if input.dim() == self.weight.dim() else y[None]
        if not self.collects:  # regrow='gradient' with magnitude pruning: only the counters
            pass
        elif torch.compiler.is_compiling():
            # the schedule from the tensor counter through torch.cond (a Python counter would be a guard that
            # recompiles on every value); the blend outside the branch, taken only where the branch ran
            run = self.calls % self.update_every == 0
            shape, dtype = tuple(self.weight.shape), self._coactivation.dtype
            h = torch.cond(run, lambda a, b: self._statistics(a, b, 0.0, 0.0).to(dtype),
                           lambda a, b: a.new_zeros(shape, dtype=dtype),
                           (self._shift(x, self.x_threshold), self._shift(yb, self.y_threshold)))
            with torch.no_grad():
                self._coactivation.copy_(torch.where(run, self._blend(self._coactivation, h), self._coactivation))
        elif self._calls % self.update_every == 0:
            with torch.no_grad():
                h = self._statistics(x.detach(), yb.detach(), self.x_threshold, self.y_threshold)
                self._coactivation.copy_(self._blend(self._coactivation, h))
        if not torch.compiler.is_compiling():
            self._calls += 1
        with torch.no_grad():
            self.calls.add_(1)
        return y

    @torch.no_grad()
    def prune_regrow(self, optimizer: torch.optim.Optimizer | None = None, fraction: float | None = None,
                     generator: torch.Generator | None = None, process_group=None, *,
                     _pruned: torch.Tensor | None = None) -> sparsity.PruneRegrow:
        """One prune-and-regrow step of the mask (see :func:`convzoo.sparsity.prune_regrow`): per slice of
        ``prune_dims``, the weakest ``fraction`` (default ``prune_fraction``) of the kept connections are dropped
        and as many dropped ones kept instead, so every slice keeps its count. With ``block``, whole blocks are
        pruned and regrown (scores pooled per block: mean ``|weight|``, summed statistic), per row of blocks
        (``prune_dims=(0,)``) or over all of them (``()``): the fraction of tiles the kernels visit stays the
        density. With ``nm``, every group of M consecutive input channels of a tap keeps its N.

        Weakest: lowest ``|weight|`` (``score='magnitude'``) or lowest accumulated coactivation (``'count'``,
        ``'correlation'``). Regrown (never one pruned in this step): highest coactivation
        (``regrow='coactivation'``), highest ``|∂L/∂W|`` of the dense gradient (``'gradient'``, RigL: summed over
        the update steps since the last call, see :attr:`dense_grad`; ``|·|`` summed per block with ``block``),
        or uniformly at random among the dropped ones (``'random'``, SET, drawn from ``generator``); equal scores
        in a random order (from ``generator``), never by position. Regrown weights are zero
        (``regrow_init='zeros'``, RigL's; the default with ``'gradient'``) or re-initialised as ``nn.ConvNd``
        initialises (``'init'``: uniform in ``±1/√fan_in``, from ``generator``), and pruned ones zeroed;
        their entries of every weight-shaped optimizer state (Adam's moments, SGD's momentum) are zeroed.
        The statistics are reset afterwards.

        Under ``torch.distributed`` (initialised, more than one process in ``process_group``): the statistics are
        summed over the processes first (``all_reduce``, the dense gradient too), and the new mask and weight are
        broadcast from the group's first rank, so every rank keeps identical masks and weights whatever its generator.

        No host synchronisation: everything stays on the weight's device.

        Returns:
            The :class:`convzoo.sparsity.PruneRegrow` of this step (new mask, pruned, regrown).
        """
        fraction = self.prune_fraction if fraction is None else sparsity._check_density(fraction, "fraction")
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
        if distributed and self.collects:
            dist.all_reduce(self._coactivation, group=process_group)
        grad = self.dense_grad
        if self.regrow_mode == "gradient":
            grad = (torch.zeros(self.mask.shape, device=self.mask.device) if grad is None
                    else grad.detach().clone())
            if distributed:
                dist.all_reduce(grad, group=process_group)
        # under FSDP (fully_shard) the weight is a sharded DTensor: work on the full weight, write the shards back
        sharded = isinstance(self.weight, DTensor)
        current = self.weight.full_tensor() if sharded else self.weight
        stat = self._coactivation.to(current.dtype)
        prune_score = current.abs() if self.score_mode == "magnitude" else stat
        if self.regrow_mode == "random":
            regrow_score = torch.rand(self.weight.shape, generator=generator, device=self.weight.device)
        elif self.regrow_mode == "gradient":
            regrow_score = grad.abs()
        else:
            regrow_score = stat
        # ties (integer counts make many) broken at random: by position they would drift to low-index channels
        # with a block: whole blocks, mean |w| or a summed statistic per block, so every dropped block stays a
        # skipped tile
        pool = ("mean" if self.score_mode == "magnitude" else "sum", "mean" if self.regrow_mode == "random" else "sum")
        if _pruned is None:
            out = sparsity.prune_regrow(self.mask, prune_score.float(), regrow_score.float(), fraction,
                                        dims=self.prune_dims, ties="random", generator=generator,
                                        block=self._mask_block, groups=self.groups, pool=pool, nm=self._mask_nm)
        elif self._mask_block is None:
            # a global schedule chose which to prune: exactly those go, as many regrow over the whole layer
            out = sparsity.prune_regrow(self.mask, (~_pruned).float(), regrow_score.float(), 0.0, dims=(),
                                        ties="random", generator=generator, count=_pruned.sum())
        else:  # the same in whole tiles: the chosen tiles go (pooled score 0), as many tiles regrow
            tiles = sparsity._tiled(_pruned, self.groups, self._mask_block).any(dim=4).any(dim=2).sum()
            out = sparsity.prune_regrow(self.mask, (~_pruned).float(), regrow_score.float(), 0.0, dims=(),
                                        ties="random", generator=generator, block=self._mask_block,
                                        groups=self.groups, pool=("mean", pool[1]), count=tiles)
        if self.regrow_init == "zeros":
            fresh = torch.zeros_like(current)
        else:
            fan_in = self.weight.shape[1] * math.prod(self.weight.shape[2:])
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            fresh = torch.empty_like(current).uniform_(-bound, bound, generator=generator)
        weight = torch.where(out.regrown, fresh, torch.where(out.pruned, 0, current))
        mask = out.mask
        if distributed:
            src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
            dist.broadcast(mask, src, group=process_group)
            dist.broadcast(weight, src, group=process_group)
        self.weight.copy_(_like(weight, self.weight))
        self.mask.copy_(mask)
        if optimizer is not None:
            changed = out.pruned | out.regrown
            for state in (optimizer.state.get(self.weight) or {}).values():
                if isinstance(state, torch.Tensor) and state.shape == self.weight.shape:
                    state.masked_fill_(_like(changed, state), 0)
        self._coactivation.zero_()
        if self._grad_tap is not None:
            self._grad_tap.grad = None
        return out

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", score={self.score_mode!r}, regrow={self.regrow_mode!r}, "
                f"regrow_init={self.regrow_init!r}, "
                f"prune_fraction={self.prune_fraction}, update_every={self.update_every}")


_DOC = """A :class:`convzoo.MaskedConv{n}d` whose mask is trained: in training mode it accumulates, every
``update_every`` forward calls, the coactivation statistics of its own input and output
(:func:`convzoo.functional.coactivation`, thresholds ``x_threshold`` / ``y_threshold``; summed, or an EMA with
factor ``ema``) into the ``coactivation`` buffer, and :meth:`prune_regrow` replaces the weakest connections.

Args (besides ``nn.Conv{n}d``'s and ``MaskedConv{n}d``'s ``density`` — default 0.5 here —, ``block`` and ``nm``,
which :meth:`prune_regrow` keeps: whole blocks, N of every M):
    update_every: collect the statistics on every this-many training forward calls.
    score: ``'count'`` (coactivation counts), ``'correlation'`` (the seed's |Pearson| score) or ``'magnitude'``
        (``|weight|``; statistics are then collected only for ``regrow='coactivation'``, as counts).
    prune_fraction: the fraction of each slice's kept connections replaced per :meth:`prune_regrow`.
    regrow: ``'coactivation'`` (highest statistic first), ``'gradient'`` (RigL: highest ``|∂L/∂W|`` of the dense
        gradient, which the backward of every ``update_every``-th training forward also produces at the masked
        entries, no second backward; set ``update_every`` to the schedule's ``every`` for RigL's "gradient of the
        step before the update") or ``'random'`` (SET: uniform among the dropped connections). With
        ``score='magnitude'`` any of them prunes by ``|weight|`` (RigL, SET).
    prune_dims: the dims whose every index is one slice with its own exact count (in the initial mask too):
        ``(0,)`` per output channel, ``(0, 1)`` per filter (DSConv's), ``()`` the whole weight. With ``block``:
        ``(0,)`` per row of blocks, ``()`` all blocks; :meth:`prune_regrow` then keeps whole blocks.
    ema: None (sum the statistics between prune steps) or the EMA factor in [0, 1].
    x_threshold, y_threshold: an input / output value counts as active when it is above its threshold.
    regrow_init: how regrown weights start: ``'zeros'`` (RigL's) or ``'init'`` (``nn.Conv{n}d``'s uniform
        initialisation); None: ``'zeros'`` for ``regrow='gradient'``, else ``'init'``.

Under a ``torch.func`` transform (grad, jvp, vjp, vmap) the layer is a pure function: its gradients and tangents
are the masked convolution's, and it collects no statistics, steps no counter and taps no dense gradient.
``torch.fx.symbolic_trace`` keeps it as one ``call_module`` node.

Raises:
    TypeError, ValueError: ``nn.Conv{n}d``'s own errors, or an argument above of the wrong type or out of range.
"""


def _make(base, n):
    def __init__(self, *args, density: float | None = None, block=None, nm=None, update_every: int = 1,
                 score: str = "count",
                 prune_fraction: float = 0.1, regrow: str = "coactivation", prune_dims=(0,), ema=None,
                 x_threshold: float = 0.0, y_threshold: float = 0.0, regrow_init: str | None = None, **kwargs):
        base.__init__(self, *args, **kwargs)  # the mask below: the default density differs
        self._init_mask(density, block, nm, default_density=0.5, zero=False)
        self._init_dynamic(update_every, score, prune_fraction, regrow, prune_dims, ema, x_threshold, y_threshold,
                           regrow_init)

    return type(f"DynamicSparseConv{n}d", (_DynamicSparseConvNd, base),
                {"__init__": __init__, "__doc__": _DOC.format(n=n), "__module__": __name__})


DynamicSparseConv1d = _make(MaskedConv1d, 1)
DynamicSparseConv2d = _make(MaskedConv2d, 2)
DynamicSparseConv3d = _make(MaskedConv3d, 3)


class PruneRegrowSchedule:
    """Drives :meth:`prune_regrow` of every dynamic-sparse layer of ``model``: call :meth:`step` once per
    training step (after ``optimizer.step()``); every ``every`` steps, until step ``end``, each layer prunes and
    regrows the fraction ``f_t = f/2·(1 + cos(π·t/end))`` of its connections (RigL's cosine decay; ``f`` is
    ``fraction``, or each layer's own ``prune_fraction`` when None; with ``end=None`` the fraction stays ``f``).

    Args:
        model: the module whose :class:`DynamicSparseConv1d/2d/3d` and :class:`convzoo.DynamicSparseLinear`
            submodules are updated (found once, here).
        optimizer: passed to ``prune_regrow`` (its state of changed connections is zeroed), or None.
        every: steps between updates, a positive int.
        end: the step after which no update happens (and the cosine reaches 0), or None.
        fraction: the initial fraction in [0, 1], or None.
        generator: the ``torch.Generator`` for random regrowth and re-initialisation.
        process_group: the ``torch.distributed`` group (see ``prune_regrow``).
        scope: ``'layer'`` (each layer prunes its own fraction, per slice of its ``prune_dims``) or ``'global'``:
            the active connections of smallest ``|weight|`` across all layers go, ``round(f_t · A)`` of them
            (``A`` the total active count; equal magnitudes in a random order from ``generator``, NaN first), and
            each layer regrows, by its own ``regrow`` rule over its whole weight, as many as it lost, so every
            layer keeps its count and the total density is exact at every step. A ``block`` layer takes part
            with whole tiles: a tile is one unit scored by its mean ``|weight|`` and weighing its active weights;
            counted in weights, the longest prefix of the ranking holding at most ``round(f_t · A)`` active
            weights goes (so with tiles up to one tile fewer than that), and the layer regrows as many whole tiles
            as it lost (its tiles must be whole: ``BO`` dividing ``C_out/groups``, ``BK`` dividing the reduction
            length, else ValueError). An ``nm`` layer's density is fixed by its N:M structure: under ``'global'``
            it takes its own per-layer N:M step with ``f_t`` (the ranking across layers leaves it out).
            ``'global'`` needs ``score='magnitude'`` in every layer, and one fraction (``fraction``, or equal
            ``prune_fraction`` s).

    Raises:
        TypeError, ValueError: ``every`` not a positive int, ``end`` not None or a positive int, ``fraction`` not
            None or a real number in [0, 1], ``model`` without dynamic-sparse layers, an unknown ``scope``, or
            ``scope='global'`` with a layer it cannot take (named).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *, every: int = 100,
                 end: int | None = None, fraction: float | None = None, generator: torch.Generator | None = None,
                 process_group=None, scope: str = "layer"):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if end is not None and (isinstance(end, bool) or not isinstance(end, int) or end < 1):
            raise ValueError(f"end must be None or a positive int, got {end!r}")
        self.fraction = None if fraction is None else sparsity._check_density(fraction, "fraction")
        self.layers = [m for m in model.modules() if isinstance(m, _DynamicSparseConvNd)]
        if not self.layers:
            raise ValueError("model has no DynamicSparseConv1d/2d/3d or DynamicSparseLinear layer to update")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if scope == "global":
            for name, m in model.named_modules():
                if not isinstance(m, _DynamicSparseConvNd):
                    continue
                if m.score_mode != "magnitude":
                    raise ValueError(f"scope='global' prunes by |weight|: layer {name!r} has score={m.score_mode!r}")
                if m._mask_block is not None:
                    og, k = m.mask.shape[0] // m.groups, math.prod(m.mask.shape[1:])
                    if og % m._mask_block[0] or k % m._mask_block[1]:
                        raise ValueError(f"scope='global' with block needs whole tiles (every tile as many weights, "
                                         f"so a regrown tile replaces a pruned one exactly): layer {name!r} has "
                                         f"block={m._mask_block} and a [{og}, {k}] weight matrix per group")
            if self.fraction is None and len({m.prune_fraction for m in self.layers}) > 1:
                raise ValueError("scope='global' prunes one fraction across layers: pass fraction (the layers' "
                                 "prune_fraction differ)")
        self.optimizer, self.every, self.end = optimizer, every, end
        self.generator, self.process_group, self.scope = generator, process_group, scope
        self.steps = 0

    def decay(self, t: int) -> float:
        """The cosine factor at step ``t``: 1 at 0, 0 at ``end`` (1 throughout when ``end`` is None)."""
        return 1.0 if self.end is None else 0.5 * (1 + math.cos(math.pi * min(t, self.end) / self.end))

    def step(self) -> bool:
        """Count one training step; prune and regrow when the schedule says. Returns whether it did."""
        self.steps += 1
        if self.steps % self.every or (self.end is not None and self.steps >= self.end):
            return False
        if self.scope == "global":
            f = self.layers[0].prune_fraction if self.fraction is None else self.fraction
            self.global_prune_regrow(f * self.decay(self.steps))
            return True
        for layer in self.layers:
            f = layer.prune_fraction if self.fraction is None else self.fraction
            layer.prune_regrow(self.optimizer, f * self.decay(self.steps), self.generator, self.process_group)
        return True

    @torch.no_grad()
    def global_prune_regrow(self, fraction: float) -> list[sparsity.PruneRegrow]:
        """One global step (``scope='global'``, see the class): over the unstructured and ``block`` layers, the
        units (an entry, or a whole tile of a ``block`` layer, scored by its mean ``|weight|``) are ranked by score
        together, and the longest prefix of active units holding at most ``round(fraction · A)`` active weights
        goes (``A`` their total active weight count; counted in weights); each layer regrows as many units (entries,
        or whole tiles) as it lost, by its own ``regrow`` rule. ``nm`` layers take their own per-layer N:M step
        with ``fraction``. On the weights' device, no host synchronisation. Returns each layer's
        :class:`convzoo.sparsity.PruneRegrow`, in :attr:`layers`' order."""
        fraction = sparsity._check_density(fraction, "fraction")
        ranked = [m for m in self.layers if m._mask_nm is None]
        kept, mag, size = [], [], []
        for m in ranked:
            w = m.weight.full_tensor() if isinstance(m.weight, DTensor) else m.weight
            a = w.detach().abs().float()
            if m._mask_block is None:
                kept.append(m.mask.reshape(-1))
                mag.append(a.reshape(-1))
                size.append(m.mask.reshape(-1).long())
            else:  # whole tiles: kept where any entry is, mean |w| over the tile, its active weights
                count = sparsity._tiled(m.mask, m.groups, m._mask_block).sum(dim=(2, 4), dtype=torch.int64)
                kept.append(count.reshape(-1) > 0)
                mag.append(sparsity._pooled(a, m.groups, m._mask_block, "mean").reshape(-1))
                size.append(count.reshape(-1))
        out = {}
        if ranked:
            kept, mag, size = torch.cat(kept), torch.cat(mag), torch.cat(size)
            mag = torch.where(mag.isnan(), float("-inf"), mag)
            k = torch.round(size.sum().double() * fraction).long()
            shuffle = torch.rand(kept.shape, generator=self.generator, device=kept.device).argsort()[None]
            rank = sparsity._rank(kept[None], mag[None], False, shuffle)[0]
            # the active weights up to and including each unit, in rank order (active units rank first)
            upto = torch.zeros_like(size).scatter_(0, rank, size).cumsum(0).gather(0, rank)
            pruned, start = kept & (upto <= k), 0
            for m in ranked:
                if m._mask_block is None:
                    n = m.mask.numel()
                    mine = pruned[start:start + n].view(m.mask.shape)
                else:
                    (bo, bk), g = m._mask_block, m.groups
                    to, tk = -(-m.mask.shape[0] // g // bo), -(-math.prod(m.mask.shape[1:]) // bk)
                    n = g * to * tk
                    mine = m.mask & sparsity._untiled(pruned[start:start + n].view(g, to, tk), tuple(m.mask.shape),
                                                      g, m._mask_block)
                start += n
                out[id(m)] = m.prune_regrow(self.optimizer, generator=self.generator,
                                            process_group=self.process_group, _pruned=mine)
        for m in self.layers:
            if m._mask_nm is not None:
                out[id(m)] = m.prune_regrow(self.optimizer, fraction, self.generator, self.process_group)
        return [out[id(m)] for m in self.layers]

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
