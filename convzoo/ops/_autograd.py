"""How a convzoo op call is differentiated, under every transform.

Each op is a ``torch.library.custom_op`` with ``register_autograd`` (reverse mode) and
``register_vmap``: that is what ``torch.compile`` sees, one opaque node whose backward is other
convzoo ops. ``register_autograd`` covers reverse mode only, and its generated ``autograd.Function``
has no ``setup_context``, so ``torch.func.grad``/``vjp``/``jacrev`` refuse it and forward-mode AD
would silently drop the tangent. So in eager mode a call that needs differentiating goes through a
second, complete ``autograd.Function`` over the same custom ops (``setup_context``, ``backward``,
``jvp``, and a vmap rule generated from the ops' own ``register_vmap``); Dynamo refuses an
``autograd.Function`` with a ``jvp``, so under ``torch.compile`` the call is the custom op itself.

A direct ``torch.ops.convzoo.*`` call carrying a forward-mode tangent raises: the tangent would
otherwise be dropped without a word.

An eager call on plain tensors, with nothing above the dispatcher that could see or change it (no mode,
no transform, no tracing), skips the dispatcher's round trip to a Python kernel (tens of µs, most of a
small call) and runs the op's implementation directly: what the dispatcher would have run, on the same
arguments. :func:`plain_eager` says when; in every other case the call is the custom op, as before.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from convzoo import _compat

_LIB = torch.library.Library("convzoo", "FRAGMENT")
plain_eager = _compat.plain_eager


def needs_function(tensors) -> bool:
    """Whether an eager call must go through the full ``autograd.Function``: a ``torch.func``
    transform is active, a forward-AD level is open, or an input requires grad."""
    if _compat.differentiating():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Static:
    """The non-tensor arguments of one call as one opaque object, not a pytree: the vmap rules
    ``torch.func`` generates for an ``autograd.Function`` then see only its tensors."""

    __slots__ = ("values",)

    def __init__(self, values: tuple):
        self.values = values


def differentiable(op, impl, num_tensors: int, setup_context, backward, jvp):
    """Register ``backward``/``setup_context`` as ``op``'s reverse-mode rule and return its entry point.

    ``op`` is a custom op whose first ``num_tensors`` arguments are tensors (or None), the rest
    static. ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` (one gradient per
    argument) serve both the custom op and the eager ``autograd.Function``; ``jvp(ctx, *tangents)``
    gets one tangent (or None) per tensor argument. They call the entry points of other ops, never
    the custom ops, so every derivative is differentiable again.

    The entry point runs ``op`` itself under ``torch.compile`` and when nothing differentiates the
    call (no Python-level autograd cost), else the ``autograd.Function``; either runs ``impl``, the
    function ``op`` was made from, directly when :func:`plain_eager` allows.
    """
    op.register_autograd(backward, setup_context=setup_context)

    def forward(*args):  # (below autograd: the inputs' requires_grad no longer matters)
        tensors = args[:-1]
        return (impl if plain_eager(tensors) else op)(*tensors, *args[-1].values)

    def fn_setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # an absent tangent or gradient stays None: no GEMM of zeros
        setup_context(ctx, (*inputs[:-1], *inputs[-1].values), output)

    def fn_backward(ctx, *grads):
        if all(g is None for g in grads):  # (grads are not materialised: an unused output's is None)
            return (None,) * (num_tensors + 1)
        return (*backward(ctx, *grads)[:num_tensors], None)  # None for the _Static

    def fn_jvp(ctx, *tangents):
        return jvp(ctx, *tangents[:num_tensors])

    name = _compat.op_name(op)
    function = type(f"_{name}_function", (torch.autograd.Function,), {
        "generate_vmap_rule": True, "forward": staticmethod(forward),
        "setup_context": staticmethod(fn_setup_context), "backward": staticmethod(fn_backward),
        "jvp": staticmethod(fn_jvp)})
    _forbid_forward_ad(op, name)

    def entry(*args):
        tensors = args[:num_tensors]
        if torch.compiler.is_compiling():
            return op(*args)
        if not needs_function(tensors):
            return (impl if plain_eager(tensors) else op)(*args)
        return apply(function, tensors, *tensors, _Static(args[num_tensors:]))

    return entry


def apply(function, tensors, *args):
    """``function.apply(*args)``, straight into its C++ ``apply`` when :func:`plain_eager` holds for
    ``tensors`` (:func:`convzoo._compat.function_apply`)."""
    return _compat.function_apply(function, plain_eager(tensors), *args)


_TRANSFORMS_HINT = (
    "Forward-mode AD and the torch.func transforms (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap) work on "
    "convzoo's entry points, convzoo.functional and the layers, in eager mode; inside torch.compile, reverse "
    "mode and vmap do: apply the other transforms outside the compiled function.")


def nondifferentiable(op, impl, num_tensors: int):
    """The entry point of custom op ``op`` (made from ``impl``; its first ``num_tensors`` arguments are
    tensors), one with no derivative (a statistic): a call carrying a forward-mode tangent, under
    ``torch.func.jvp`` too, raises instead of returning a result without one, and so does a backward through
    it (torch's own error: no autograd formula was registered). An eager call on plain tensors that nothing
    differentiates runs ``impl`` directly (:func:`plain_eager`: no dispatcher round trip); any other call,
    and every call under ``torch.compile``, is the custom op."""
    _forbid_forward_ad(op, _compat.op_name(op), "It has no derivative (a statistic): differentiate around it, "
                       "or pass its input detached.")

    def entry(*args):
        tensors = args[:num_tensors]
        if not torch.compiler.is_compiling() and not needs_function(tensors) and plain_eager(tensors):
            return impl(*args)
        return op(*args)

    return entry


def _forbid_forward_ad(op, name: str, hint: str = _TRANSFORMS_HINT) -> None:
    """Make a direct ``torch.ops.convzoo.<name>`` call raise when an input carries a forward-mode
    tangent (the custom op's autograd kernel would drop it without a word): the custom op's own
    autograd kernel, behind a check (where the running torch allows: :mod:`convzoo._compat`)."""

    def make_guard(autograd_impl):
        def guarded(keyset, *args):
            if _compat.differentiating():
                for a in args:
                    if isinstance(a, Tensor) and fwAD.unpack_dual(a).tangent is not None:
                        raise RuntimeError(f"torch.ops.convzoo.{name} got a forward-mode AD tangent, which the custom "
                                           f"op cannot carry. {hint}")
            try:
                return autograd_impl(keyset, *args)
            except RuntimeError as e:  # torch.func.grad & co. refuse the custom op's own autograd.Function
                if "setup_context" not in str(e):
                    raise
                raise RuntimeError(f"torch.ops.convzoo.{name} cannot run under a torch.func transform by itself. "
                                   f"{_TRANSFORMS_HINT}") from e

        return guarded

    _compat.override_autograd_kernel(_LIB, op, name, make_guard)


# ---------------------------------------------------------------------------------------------- jvp glue
# Inside an autograd.Function's jvp, plain torch ops on the tangents do not carry an outer forward-mode
# level's tangent (jvp of jvp, jacfwd of jacfwd would silently get zeros); Function.apply calls do. So a
# jvp rule is made only of entry points and of these two linear Functions, each its own tangent.
class _Add(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(a, b):
        return a + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, grad

    @staticmethod
    def jvp(ctx, a_t, b_t):
        return add(a_t, b_t)


def add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a + b`` for tangents (None is zero), differentiable in forward mode at every level."""
    if a is None or b is None:
        return b if a is None else a
    return _Add.apply(a, b)


class _Broadcast(torch.autograd.Function):
    """``t.reshape(view).expand(shape)`` (materialised), its adjoint the sum back to ``t``'s shape."""

    generate_vmap_rule = True

    @staticmethod
    def forward(t, shapes):
        view, shape = shapes.values
        return t.reshape(view).expand(shape).contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output):
        t, shapes = inputs
        ctx.t_shape, ctx.shapes = t.shape, shapes
        ctx.sum_dims = tuple(i for i, (v, s) in enumerate(zip(*shapes.values)) if v == 1 and s != 1)

    @staticmethod
    def backward(ctx, grad):
        if ctx.sum_dims:  # (sum over () would sum over every dim)
            grad = grad.sum(ctx.sum_dims, keepdim=True)
        return grad.reshape(ctx.t_shape), None

    @staticmethod
    def jvp(ctx, t_t, _):
        return broadcast(t_t, *ctx.shapes.values)


def broadcast(t: Tensor, view, shape) -> Tensor:
    """``t`` reshaped to ``view`` and expanded to ``shape`` (``view`` has ``shape``'s rank), differentiable in
    forward mode at every level."""
    return _Broadcast.apply(t, _Static((tuple(view), tuple(shape))))


def move_bdim(t: Tensor | None, bdim: int | None, batch_size: int) -> Tensor | None:
    """A vmapped argument with its batch dim first (expanded where it was not batched)."""
    if t is None:
        return None
    if bdim is None:
        return t.expand(batch_size, *t.shape)
    return t.movedim(bdim, 0)


def loop_vmap(op, batch_size: int, in_dims, args):
    """The vmap rule of last resort: ``op`` once per batch entry, results stacked on dim 0. For the
    cases no single call can batch (e.g. a per-sample weight gradient: both operands batched)."""
    moved = [move_bdim(a, d, batch_size) if isinstance(a, Tensor) and d is not None else a
             for a, d in zip(args, in_dims)]
    outs = [op(*(m[i] if isinstance(m, Tensor) and d is not None else m for m, d in zip(moved, in_dims)))
            for i in range(batch_size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


def join(op, batch_size: int, args, in_dims, index: int = 0, dim: int = 0, out_dims=0, same_size: bool = True):
    """A vmap rule's one call: the vmapped dim of ``args[index]`` (at ``in_dims[index]``) joins its dim ``dim``, one
    the op batches over (the batch dim N, a channel dim), and each output is split back at its dim in ``out_dims``
    (an int, or one per output, None for an output that does not depend on that argument). Returns
    ``(output, out_dims)``. ``same_size``: each output's split dim has the joined dim's size (N joins N), so an
    empty vmap (batch size 0) splits too; else it is inferred (``(batch_size, -1)``)."""
    t = args[index].movedim(in_dims[index], dim)
    out = op(*args[:index], t.flatten(dim, dim + 1), *args[index + 1:])
    split = (batch_size, t.shape[dim + 1]) if same_size else (batch_size, -1)
    if isinstance(out, tuple):
        return tuple(o if d is None else o.unflatten(d, split) for o, d in zip(out, out_dims)), out_dims
    return out.unflatten(out_dims, split), out_dims
