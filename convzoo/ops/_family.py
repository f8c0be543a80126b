"""The two shapes a differentiable op family takes here, each written once: every rule of every order (backward,
double backward, forward-mode tangent, vmap) comes from these, over the family's own custom ops.

- :func:`linear_pair`: two linear ops that are each other's adjoint, ``y = A(x, *geom)`` and
  ``Aᵀ(y, input_size, *geom)`` (unfold and fold, unfold_transpose and its backward, extract_patches and its
  backward). Each is the other's backward and, being linear, its own forward-mode derivative; a vmapped input
  joins the batch dim N (one launch for the whole vmap).
- :class:`Bilinear`: ``y = conv(x, w, *consts) + bias``, linear in ``x`` and in ``(w, bias)``, with its two
  gradient ops ``grad_input(grad, w, *consts, input_size)`` (linear in both) and
  ``grad_weight(grad, x, *consts[, weight_size])`` (bilinear). The adjoints close the family:

  - ``grad_input``: d/d(grad) is ``conv(·, w)``, d/dw is ``grad_weight(grad, ·)``;
  - ``grad_weight``: d/d(grad) is ``conv(x, ·)``, d/dx is ``grad_input(grad, ·)``;

  so gradients of any order stay on the family's ops (its kernels), and so do forward-mode tangents: each op
  being bilinear, its tangent is the sum of the op with one argument replaced by its tangent. ``consts`` are
  constant tensors (masked_conv's mask): no gradient, their tangent ignored. A family (local_conv, masked_conv
  and MaskedLinear on it) is a subclass saying how its entry points are called and its bias is reduced and
  broadcast, plus the vmap cases it can join into one call beyond the batch dim; :meth:`Bilinear.build` makes
  the three entry points (:func:`convzoo.ops._autograd.differentiable`) and registers the vmap rules.

Rules call the family's entry points, never the custom ops, so every derivative is differentiable again.
"""

from __future__ import annotations

import inspect

from convzoo.ops import _autograd


def _arity(impl) -> int:
    """How many arguments a custom op made from ``impl`` takes (a backward returns one gradient per argument)."""
    return len(inspect.signature(impl).parameters)


def _register_join_batch(op) -> None:
    """``op``'s vmap rule: the vmapped dim of its one tensor argument joins the batch dim N."""

    @op.register_vmap
    def _(info, in_dims, *args):
        return _autograd.join(op, info.batch_size, args, in_dims)


# ---------------------------------------------------------------------------------------------- linear pair
def allocating_fake(geometry, out_shape):
    """A data-movement op's fake, allocating as its launcher does: ``t.new_empty(out_shape(t, geometry(t, *args)))``
    for the op's call ``(t, *args)`` (the geometry's checks included)."""

    def fake(t, *args):
        return t.new_empty(out_shape(t, geometry(t, *args)))

    return fake


def linear_pair(forward, adjoint):
    """The entry points ``(A, Aᵀ)`` of two linear custom ops, each the other's adjoint. ``forward`` and
    ``adjoint`` are ``(custom op, the function it was made from)``: ``A(x, *geom)`` and
    ``Aᵀ(y, input_size, *geom)``, ``input_size`` the spatial size of ``A``'s input and ``geom`` the same static
    arguments for both. ``Aᵀ`` is ``A``'s backward and ``A`` is ``Aᵀ``'s; each is its own tangent."""
    (a_op, a_impl), (t_op, t_impl) = forward, adjoint
    n_geom = _arity(a_impl) - 1
    entries = []  # (A, Aᵀ), filled below: each one's rules call the other

    def a_setup(ctx, inputs, output):
        x, *geom = inputs
        ctx.input_size, ctx.geom = list(x.shape[2:]), geom

    def a_backward(ctx, grad):
        return entries[1](grad, ctx.input_size, *ctx.geom), *(None,) * n_geom

    def a_jvp(ctx, x_t):
        return entries[0](x_t, *ctx.geom)

    def t_setup(ctx, inputs, output):
        ctx.input_size, ctx.geom = inputs[1], inputs[2:]

    def t_backward(ctx, grad):
        return entries[0](grad, *ctx.geom), *(None,) * (n_geom + 1)

    def t_jvp(ctx, y_t):
        return entries[1](y_t, ctx.input_size, *ctx.geom)

    entries += [_autograd.differentiable(a_op, a_impl, 1, a_setup, a_backward, a_jvp),
                _autograd.differentiable(t_op, t_impl, 1, t_setup, t_backward, t_jvp)]
    # Rules call the custom ops themselves: functorch runs them below the vmap level, where no
    # autograd.Function may be applied.
    _register_join_batch(a_op)
    _register_join_batch(t_op)
    return tuple(entries)


# ---------------------------------------------------------------------------------------------- bilinear
class Bilinear:
    """One bilinear op family: a subclass sets the class attributes and the three calls, then :meth:`build`.

    Argument layouts of the three custom ops (``geom`` the same static arguments in all three):
    ``conv(x, w, *consts, bias, *geom)``, ``grad_input(grad, w, *consts, input_size, *geom)``,
    ``grad_weight(grad, x, *consts, weight_size, *geom)`` (``weight_size`` only where :attr:`weight_grad_sized`).
    """

    consts: int = 0  # constant tensor arguments after the two operands (masked_conv's mask)
    weight_grad_sized: bool = True  # grad_weight takes the weight's size after the constants
    weight_grad_has_bias: bool = False  # grad_weight returns (dW, the per-position bias gradient) (local_conv)

    # -- the family's entry points, in its own argument order (each calls the module's entry point by name,
    # so a rule calls what the module holds)
    def conv(self, x, w, consts, bias, geom):
        raise NotImplementedError

    def grad_input(self, grad, w, consts, input_size, geom):
        raise NotImplementedError

    def grad_weight(self, grad, x, consts, weight_size, geom):
        raise NotImplementedError

    # -- the bias
    def bias_as_output(self, bias, shape):
        """``bias`` broadcast to the output shape ``shape``, differentiable in forward mode at every level
        (:func:`convzoo.ops._autograd.broadcast`)."""
        raise NotImplementedError

    def bias_grad(self, grad, bias_dim: int, from_weight_grad):
        """The bias gradient (a ``bias_dim``-d bias) from the output gradient ``grad``, or from the weight
        gradient op's own bias output ``from_weight_grad`` where it ran (:attr:`weight_grad_has_bias`)."""
        raise NotImplementedError

    def zero_bias_grad(self, grad):
        """The bias output of ``grad_weight``'s tangent when only ``x`` has one (:attr:`weight_grad_has_bias`)."""
        raise NotImplementedError

    # -- optional
    def fused_backward(self, ctx, grad, x, w, consts, want_bias):
        """``(dx, dW, db)`` in one call where the family has one for a first-order backward wanting both
        gradients, else None (then: grad_input and grad_weight)."""
        return None

    def vmap_conv(self, op, batch_size, in_dims, args, batched):
        """One call for a vmap of ``conv`` other than over ``x`` alone (which joins N), or None: a call per entry.
        ``batched``: whether each tensor argument is batched."""
        return None

    def vmap_grad_input(self, op, batch_size, in_dims, args, batched):
        """As :meth:`vmap_conv` for ``grad_input`` (over ``grad`` alone joins N)."""
        return None

    def vmap_grad_weight(self, op, batch_size, in_dims, args, batched):
        """As :meth:`vmap_conv` for ``grad_weight`` (a contraction over N: no batch dim to join)."""
        return None

    # -- the rules
    def build(self, conv, grad_input, grad_weight):
        """The entry points ``(conv, grad_input, grad_weight)`` of the family's three custom ops, each given as
        ``(custom op, the function it was made from)``, differentiable under every transform; their vmap rules
        registered."""
        spec, nc = self, self.consts
        (conv_op, conv_impl), (gi_op, gi_impl), (gw_op, gw_impl) = conv, grad_input, grad_weight
        n_conv, n_gi, n_gw = _arity(conv_impl), _arity(gi_impl), _arity(gw_impl)
        has_bias, sized = self.weight_grad_has_bias, self.weight_grad_sized

        def weight_part(out):
            return out[0] if has_bias else out

        # ------------------------------------------------------------------ conv
        def conv_setup(ctx, inputs, output):
            x, w, *rest = inputs
            ctx.save_for_backward(x, w, *rest[:nc])
            ctx.save_for_forward(x, w, *rest[:nc])
            ctx.bias_dim = None if rest[nc] is None else rest[nc].dim()
            ctx.out_shape = output.shape
            ctx.geom = rest[nc + 1:]

        def conv_backward(ctx, grad):
            x, w, *consts = ctx.saved_tensors
            want_x, want_w = ctx.needs_input_grad[:2]
            want_b = ctx.bias_dim is not None and ctx.needs_input_grad[2 + nc]
            fused = spec.fused_backward(ctx, grad, x, w, consts, want_b) if want_x and want_w else None
            if fused is not None:
                dx, dw, db = fused
            else:
                dx = dw = db = from_w = None
                if want_x:
                    dx = spec.grad_input(grad, w, consts, list(x.shape[2:]), ctx.geom)
                if want_w:  # (local_conv's weight-gradient kernel yields the per-position bias gradient too)
                    dw = spec.grad_weight(grad, x, consts, list(w.shape), ctx.geom)
                    if has_bias:
                        dw, from_w = dw
                if want_b:
                    db = spec.bias_grad(grad, ctx.bias_dim, from_w)
            return dx, dw, *(None,) * nc, db, *(None,) * (n_conv - 3 - nc)

        def conv_jvp(ctx, x_t, w_t, *rest):
            x, w, *consts = ctx.saved_tensors
            b_t = rest[nc]
            y_t = None if x_t is None else spec.conv(x_t, w, consts, None, ctx.geom)
            if w_t is not None:
                return _autograd.add(y_t, spec.conv(x, w_t, consts, b_t, ctx.geom))
            return _autograd.add(y_t, None if b_t is None else spec.bias_as_output(b_t, ctx.out_shape))

        # ------------------------------------------------------------------ grad_input
        def gi_setup(ctx, inputs, output):
            grad, w, *rest = inputs
            ctx.save_for_backward(grad, w, *rest[:nc])
            ctx.save_for_forward(grad, w, *rest[:nc])
            ctx.input_size = rest[nc]
            ctx.geom = rest[nc + 1:]

        def gi_backward(ctx, u):
            grad, w, *consts = ctx.saved_tensors
            d_grad = d_w = None
            if ctx.needs_input_grad[0]:
                d_grad = spec.conv(u, w, consts, None, ctx.geom)
            if ctx.needs_input_grad[1]:
                d_w = weight_part(spec.grad_weight(grad, u, consts, list(w.shape), ctx.geom))
            return d_grad, d_w, *(None,) * (n_gi - 2)

        def gi_jvp(ctx, grad_t, w_t, *consts_t):
            grad, w, *consts = ctx.saved_tensors
            out = None if grad_t is None else spec.grad_input(grad_t, w, consts, ctx.input_size, ctx.geom)
            return _autograd.add(out, None if w_t is None else spec.grad_input(grad, w_t, consts, ctx.input_size,
                                                                               ctx.geom))

        # ------------------------------------------------------------------ grad_weight
        def gw_setup(ctx, inputs, output):
            grad, x, *rest = inputs
            ctx.save_for_backward(grad, x, *rest[:nc])
            ctx.save_for_forward(grad, x, *rest[:nc])
            ctx.weight_size = rest[nc] if sized else None
            ctx.geom = rest[nc + int(sized):]

        def gw_backward(ctx, u_weight, u_bias=None):
            grad, x, *consts = ctx.saved_tensors
            d_grad = d_x = None
            if ctx.needs_input_grad[0]:
                if u_weight is not None:
                    d_grad = spec.conv(x, u_weight, consts, u_bias, ctx.geom)
                elif u_bias is not None:
                    d_grad = spec.bias_as_output(u_bias, grad.shape)
            if ctx.needs_input_grad[1] and u_weight is not None:
                d_x = spec.grad_input(grad, u_weight, consts, list(x.shape[2:]), ctx.geom)
            return d_grad, d_x, *(None,) * (n_gw - 2)

        def gw_jvp(ctx, grad_t, x_t, *consts_t):
            grad, x, *consts = ctx.saved_tensors
            out = None if grad_t is None else spec.grad_weight(grad_t, x, consts, ctx.weight_size, ctx.geom)
            if has_bias:
                out, db_t = (None, spec.zero_bias_grad(grad)) if out is None else out
            if x_t is not None:
                out = _autograd.add(out, weight_part(spec.grad_weight(grad, x_t, consts, ctx.weight_size, ctx.geom)))
            return (out, db_t) if has_bias else out

        entries = (_autograd.differentiable(conv_op, conv_impl, 3 + nc, conv_setup, conv_backward, conv_jvp),
                   _autograd.differentiable(gi_op, gi_impl, 2 + nc, gi_setup, gi_backward, gi_jvp),
                   _autograd.differentiable(gw_op, gw_impl, 2 + nc, gw_setup, gw_backward, gw_jvp))

        # ------------------------------------------------------------------ vmap
        # Rules call the custom ops themselves (below the vmap level no autograd.Function may be applied). A
        # vmapped data operand alone (x, grad) joins the batch dim N: one call for the whole vmap; the family
        # joins what else it can; anything else runs once per entry.
        def vmap_rule(op, n_tensors, join_batch, hook):
            def rule(info, in_dims, *args):
                batched = tuple(d is not None for d in in_dims[:n_tensors])
                if join_batch and batched[0] and not any(batched[1:]):
                    return _autograd.join(op, info.batch_size, args, in_dims)
                out = hook(op, info.batch_size, in_dims, args, batched)
                return _autograd.loop_vmap(op, info.batch_size, in_dims, args) if out is None else out

            op.register_vmap(rule)

        vmap_rule(conv_op, 3 + nc, True, self.vmap_conv)
        vmap_rule(gi_op, 2 + nc, True, self.vmap_grad_input)
        vmap_rule(gw_op, 2 + nc, False, self.vmap_grad_weight)
        return entries
