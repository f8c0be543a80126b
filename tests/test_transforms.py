"""Every op under every autograd transform a user applies, on both paths, against the same transform of
an independent oracle (F.pad + F.unfold / unfoldNd / F.fold, and hypnettorch's einsum formula), in float64:
forward-mode AD (``torch.autograd.forward_ad`` and ``torch.func.jvp``), ``torch.func.grad``, ``vjp``,
``jacrev``, ``jacfwd``, ``vmap`` (over every argument, alone and together), ``vmap(grad)`` (per-sample
gradients), ``hessian`` and forward-over-reverse. A direct ``torch.ops.convzoo.*`` call with a tangent
raises instead of dropping it."""

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from problems import Case, flat_padding, oracle_unfold
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import convzoo
import convzoo.functional as cf
import convzoo.kernels.local_conv  # decorate the kernels while TRITON_INTERPRET is set)
from convzoo.ops import local_conv as lc_ops

D = torch.float64
CASES = [
    Case(2, 2, (5, 6), (3, 2), (2, 1), 1, (1, 2)),  # 2-d, stride, dilation, padding
    Case(2, 2, (7,), (3,), (2,), 2, None, "reflect"),  # 1-d, reflect
    Case(1, 1, (2, 3, 3), (2, 2, 2), None, ((1, 0), (0, 1), (1, 1)), None, "circular"),  # 3-d
]
IDS = [c.id for c in CASES]


def _cases(cases, slow):
    """``cases`` as parameters, the one of id ``slow`` marked slow_interpreted (the longest under the interpreter:
    CI's torch 2.11 run and a CUDA run take it)."""
    return [pytest.param(c, id=c.id, marks=pytest.mark.slow_interpreted if c.id == slow else ()) for c in cases]
C_OUT = 3


def _close(a, b):
    for p, q in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)


def _x(case, device, n=None):
    return torch.randn(case.n if n is None else n, case.c, *case.size, dtype=D, device=device)


def oracle_fold(cols, case):
    """The oracle's fold as the vector-Jacobian product of its unfold, through torch.func so that it
    composes with the transforms under test (problems.oracle_fold uses torch.autograd.grad, which does not)."""
    size = (cols.shape[0], cols.shape[1] // math.prod(case.kernel), *case.size)
    zeros = torch.zeros(size, dtype=cols.dtype, device=cols.device)
    return vjp(lambda x: oracle_unfold(x, case), zeros)[1](cols)[0]


def _unfold(case):
    return lambda x: cf.unfold(x, **case.kwargs())


def _fold(case):
    return lambda c: cf.fold(c, case.size, **case.kwargs())


def _num_blocks(case):
    return oracle_unfold(torch.zeros(1, 1, *case.size, dtype=D), case).shape[-1]


def _out_size(case, x=None):
    """The output grid, restated independently of convzoo._shapes."""
    flat = flat_padding(case)
    dil, st = case.dilation or (1,) * case.ndim, case.stride or (1,) * case.ndim
    return tuple((n + flat[2 * i] + flat[2 * i + 1] - d * (k - 1) - 1) // s + 1
                 for i, (n, k, d, s) in enumerate(zip(case.size, case.kernel, dil, st)))


def _local(case):
    kw = {k: v for k, v in case.kwargs().items() if k != "kernel_size"}
    return lambda x, w, b: cf.local_conv(x, w, b, kernel_size=case.kernel, **kw)


def _oracle_local(case, out_size):
    def f(x, w, b):
        y = torch.einsum("nrl,orl->nol", oracle_unfold(x, case), w)
        y = y + (b if b.dim() == 2 else b[:, None])
        return y.reshape(x.shape[0], w.shape[0], *out_size)
    return f


def _params(case, device, bias="pixel"):
    r, l = case.c * math.prod(case.kernel), _num_blocks(case)
    w = torch.randn(C_OUT, r, l, dtype=D, device=device)
    b = torch.randn(C_OUT, l, dtype=D, device=device) if bias == "pixel" else torch.randn(C_OUT, dtype=D,
                                                                                          device=device)
    return w, b


def _forward_ad(f, primals, tangents):
    with fwAD.dual_level():
        out = f(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        return fwAD.unpack_dual(out).tangent


# ---------------------------------------------------------------------------------------------- unfold / fold
@pytest.mark.parametrize("case", _cases(CASES, slow=IDS[2]))
def test_unfold_fold_forward_mode(case, path):
    x, t = _x(case, path), _x(case, path)
    ref = oracle_unfold(t, case)  # unfold is linear: its tangent is the unfold of the tangent
    assert ref.abs().sum() > 0
    _close(jvp(_unfold(case), (x,), (t,))[1], ref)
    _close(_forward_ad(_unfold(case), (x,), (t,)), ref)
    cols, cols_t = oracle_unfold(x, case), oracle_unfold(t, case)
    _close(jvp(_fold(case), (cols,), (cols_t,))[1], oracle_fold(cols_t, case))
    _close(_forward_ad(_fold(case), (cols,), (cols_t,)), oracle_fold(cols_t, case))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unfold_fold_reverse_transforms(case, path):
    x = _x(case, path)
    ours, ref = _unfold(case), (lambda x: oracle_unfold(x, case))
    _close(grad(lambda x: ours(x).pow(3).sum())(x), grad(lambda x: ref(x).pow(3).sum())(x))
    cot = torch.randn_like(ref(x))
    _close(vjp(ours, x)[1](cot), vjp(ref, x)[1](cot))
    xs = x[:1, :1]
    _close(jacrev(ours)(xs), jacrev(ref)(xs))
    _close(jacfwd(ours)(xs), jacrev(ref)(xs))
    cols = ref(x)
    fo, rfo = _fold(case), (lambda c: oracle_fold(c, case))
    _close(grad(lambda c: fo(c).pow(3).sum())(cols), grad(lambda c: rfo(c).pow(3).sum())(cols))


@pytest.mark.parametrize("case", CASES[:2], ids=IDS[:2])
def test_unfold_fold_vmap_and_per_sample_grad(case, path):
    x = _x(case, path, n=3)
    ours, ref = _unfold(case), (lambda x: oracle_unfold(x, case))
    xb = torch.stack([x, 2 * x + 1])  # vmapped dim in front of N, then elsewhere
    _close(vmap(ours)(xb), vmap(ref)(xb))
    _close(vmap(ours, in_dims=2, out_dims=1)(xb.movedim(0, 2)), vmap(ref)(xb).movedim(0, 1))
    per_sample = vmap(grad(lambda xi: ours(xi[None]).pow(3).sum()))(x)
    _close(per_sample, vmap(grad(lambda xi: ref(xi[None]).pow(3).sum()))(x))
    cols = ref(x)
    _close(vmap(grad(lambda c: _fold(case)(c[None]).pow(3).sum()))(cols),
           vmap(grad(lambda c: oracle_fold(c[None], case).pow(3).sum()))(cols))


@pytest.mark.parametrize("case", CASES[:2], ids=IDS[:2])
def test_unfold_second_order(case, path):
    xs = _x(case, path)[:1, :1]
    ours, ref = _unfold(case), (lambda x: oracle_unfold(x, case))
    _close(hessian(lambda x: ours(x).pow(3).sum())(xs), hessian(lambda x: ref(x).pow(3).sum())(xs))
    t = torch.randn_like(xs)
    _close(jvp(grad(lambda x: ours(x).pow(3).sum()), (xs,), (t,))[1],
           jvp(grad(lambda x: ref(x).pow(3).sum()), (xs,), (t,))[1])


# ---------------------------------------------------------------------------------------------- local conv
@pytest.mark.parametrize("bias", ["pixel", "channel"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_local_conv_forward_mode(case, bias, path):
    x = _x(case, path)
    w, b = _params(case, path, bias)
    ours, ref = _local(case), _oracle_local(case, _out_size(case, x))
    tangents = (torch.randn_like(x), torch.randn_like(w), torch.randn_like(b))
    expected = jvp(ref, (x, w, b), tangents)[1]
    _close(jvp(ours, (x, w, b), tangents)[1], expected)
    _close(_forward_ad(ours, (x, w, b), tangents), expected)
    for i in range(3):  # one tangent at a time: the others are absent, not zero tensors
        def one(p, i=i):
            args = [x, w, b]
            args[i] = p
            return args
        got = jvp(lambda p: ours(*one(p)), ((x, w, b)[i],), (tangents[i],))[1]
        _close(got, jvp(lambda p: ref(*one(p)), ((x, w, b)[i],), (tangents[i],))[1])


@pytest.mark.parametrize("case", _cases(CASES, slow=IDS[2]))
def test_local_conv_reverse_transforms(case, path):
    x = _x(case, path)
    w, b = _params(case, path)
    ours, ref = _local(case), _oracle_local(case, _out_size(case, x))

    def loss(f):
        return lambda x, w, b: f(x, w, b).pow(2).sum()

    _close(grad(loss(ours), argnums=(0, 1, 2))(x, w, b), grad(loss(ref), argnums=(0, 1, 2))(x, w, b))
    cot = torch.randn_like(ref(x, w, b))
    _close(vjp(ours, x, w, b)[1](cot), vjp(ref, x, w, b)[1](cot))
    xs = x[:1]
    _close(jacrev(ours, argnums=(0, 2))(xs, w, b), jacrev(ref, argnums=(0, 2))(xs, w, b))
    _close(jacfwd(ours, argnums=(0, 2))(xs, w, b), jacrev(ref, argnums=(0, 2))(xs, w, b))


@pytest.mark.parametrize("case", CASES[:2], ids=IDS[:2])
def test_local_conv_per_sample_gradients(case, path):
    """vmap(grad): what Opacus / BackPACK-style code computes, through the module and functional_call."""
    x = _x(case, path, n=3)
    w, b = _params(case, path)
    ours, ref = _local(case), _oracle_local(case, _out_size(case, x))

    def per_sample(f):
        return vmap(grad(lambda w, b, xi: f(xi[None], w, b).pow(2).sum(), argnums=(0, 1)),
                    in_dims=(None, None, 0))(w, b, x)

    expected = per_sample(ref)
    _close(per_sample(ours), expected)
    assert not torch.allclose(expected[0][0], expected[0][1])  # really per sample
    if case.ndim == 2:  # the module through functional_call, against one backward per sample
        layer = convzoo.LocalConv2d(case.c, C_OUT, case.size, case.kernel, stride=case.stride,
                                    padding=case.padding, dilation=case.dilation, dtype=D).to(path)
        params = {k: v.detach() for k, v in layer.named_parameters()}
        got = vmap(grad(lambda p, xi: functional_call(layer, p, (xi[None],)).pow(2).sum()),
                   in_dims=(None, 0))(params, x)
        for i in range(x.shape[0]):
            layer.zero_grad()
            layer(x[i:i + 1]).pow(2).sum().backward()
            for name, p in layer.named_parameters():
                _close(got[name][i], p.grad)


@pytest.mark.parametrize("case", CASES[:2], ids=IDS[:2])
def test_local_conv_vmap_every_argument(case, path):
    """vmap over the input, the weight (a hypernetwork's batch of filters), the bias, and two at once."""
    x = _x(case, path)
    w, b = _params(case, path)
    ours, ref = _local(case), _oracle_local(case, _out_size(case, x))
    xs, ws, bs = (torch.stack([t, torch.randn_like(t)]) for t in (x, w, b))
    for in_dims, args in [((0, None, None), (xs, w, b)), ((None, 0, None), (x, ws, b)),
                          ((None, None, 0), (x, w, bs)), ((None, 0, 0), (x, ws, bs)),
                          ((0, 0, None), (xs, ws, b)), ((0, 0, 0), (xs, ws, bs))]:
        _close(vmap(ours, in_dims=in_dims)(*args), vmap(ref, in_dims=in_dims)(*args))
    _close(vmap(ours, in_dims=(2, None, None))(xs.movedim(0, 2), w, b), vmap(ref)(xs, w.expand(2, *w.shape),
                                                                                    b.expand(2, *b.shape)))


@pytest.mark.parametrize("case", CASES[:2], ids=IDS[:2])
def test_local_conv_second_order(case, path):
    x = _x(case, path)[:1]
    w, b = _params(case, path)
    ours, ref = _local(case), _oracle_local(case, _out_size(case, x))
    _close(hessian(lambda x: ours(x, w, b).pow(3).sum())(x), hessian(lambda x: ref(x, w, b).pow(3).sum())(x))
    wt = torch.randn_like(w)
    _close(jvp(grad(lambda w: ours(x, w, b).pow(3).sum()), (w,), (wt,))[1],
           jvp(grad(lambda w: ref(x, w, b).pow(3).sum()), (w,), (wt,))[1])


@pytest.mark.parametrize("case", _cases(CASES[:2], slow=IDS[0]))
def test_local_conv_backward_ops_transforms(case, path):
    """The backward ops are entry points too (double backward, KFAC-style code): jvp, vjp, vmap."""
    x = _x(case, path)
    w, _ = _params(case, path)
    size = _out_size(case, x)
    geom = _resolved(case)
    gy = torch.randn(x.shape[0], C_OUT, *size, dtype=D, device=path)
    ref = _oracle_local(case, size)
    zero_b = torch.zeros(C_OUT, w.shape[-1], dtype=D, device=path)

    def ref_gi(g, w):
        return vjp(lambda x: ref(x, w, zero_b), x)[1](g)[0]

    def ref_gw(g, x):
        return vjp(lambda w, b: ref(x, w, b), w, zero_b)[1](g)

    def gi(g, w):
        return lc_ops.local_conv_grad_input(g, w, list(case.size), *geom)

    def gw(g, x):
        return lc_ops.local_conv_grad_weight(g, x, *geom)

    tangents = (torch.randn_like(gy), torch.randn_like(w))
    _close(jvp(gi, (gy, w), tangents)[1], jvp(ref_gi, (gy, w), tangents)[1])
    tangents = (torch.randn_like(gy), torch.randn_like(x))
    _close(jvp(gw, (gy, x), tangents)[1], jvp(ref_gw, (gy, x), tangents)[1])
    _close(jvp(lambda g: gw(g, x), (gy,), tangents[:1])[1], jvp(lambda g: ref_gw(g, x), (gy,), tangents[:1])[1])
    gys, ws, xs = (torch.stack([t, torch.randn_like(t)]) for t in (gy, w, x))
    for in_dims in [(0, None), (None, 0), (0, 0)]:
        g_arg = gys if in_dims[0] == 0 else gy
        _close(vmap(gi, in_dims=in_dims)(g_arg, ws if in_dims[1] == 0 else w),
               vmap(ref_gi, in_dims=in_dims)(g_arg, ws if in_dims[1] == 0 else w))
        _close(vmap(gw, in_dims=in_dims)(g_arg, xs if in_dims[1] == 0 else x),
               vmap(ref_gw, in_dims=in_dims)(g_arg, xs if in_dims[1] == 0 else x))


def _resolved(case):
    """The ops' resolved arguments for a case (kernel_size, dilation, flat padding, stride, padding_mode)."""
    nd = case.ndim
    return [list(case.kernel), list(case.dilation or (1,) * nd), flat_padding(case), list(case.stride or (1,) * nd),
            case.mode]


# ---------------------------------------------------------------------------------------------- raw ops
def test_raw_op_with_tangent_raises_instead_of_dropping_it(path):
    case = CASES[0]
    x = _x(case, path)
    w, b = _params(case, path)
    geom = _resolved(case)
    y = cf.local_conv(x, w, b, kernel_size=case.kernel, stride=case.stride, padding=case.padding,
                      dilation=case.dilation)
    calls = {
        "unfold": (lambda x: torch.ops.convzoo.unfold(x, *geom), x),
        "fold": (lambda c: torch.ops.convzoo.fold(c, list(case.size), *geom), oracle_unfold(x, case)),
        "local_conv": (lambda x: torch.ops.convzoo.local_conv(x, w, b, *geom), x),
        "local_conv_grad_input": (lambda g: torch.ops.convzoo.local_conv_grad_input(g, w, list(case.size), *geom),
                                  y),
        "local_conv_grad_weight": (lambda g: torch.ops.convzoo.local_conv_grad_weight(g, x, *geom)[0], y),
    }
    for name, (f, primal) in calls.items():
        with pytest.raises(RuntimeError, match=rf"torch\.ops\.convzoo\.{name} got a forward-mode AD tangent"):
            jvp(f, (primal,), (torch.ones_like(primal),))
        with pytest.raises(RuntimeError, match=r"forward-mode AD tangent, which the custom op cannot carry"):
            _forward_ad(f, (primal,), (torch.ones_like(primal),))
        f(primal)  # without a tangent the raw op works


def test_eager_call_without_autograd_skips_the_function(path, function_applies):
    """No autograd.Function on the plain inference path (host overhead), and the numbers are the same."""
    case = CASES[0]
    x = _x(case, path)
    applied = function_applies
    y = cf.unfold(x, **case.kwargs())
    assert applied == []
    y2 = cf.unfold(x.requires_grad_(), **case.kwargs())
    # with autograd, the Function (plain tensors enter its C++ apply directly: no Function.apply call)
    assert applied == [] and type(y2.grad_fn).__name__ == "_unfold_functionBackward"
    torch.testing.assert_close(y, y2.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES[:2], ids=IDS[:2])
def test_forward_over_forward(case, path):
    """jvp of jvp and jacfwd of jacfwd: the jvp rules are made of differentiable calls only, so an outer
    forward level sees the inner tangent's own tangent (plain ops in a jvp rule would drop it: zeros)."""
    x = _x(case, path)[:1]
    w, b = _params(case, path)
    ours, ref = _local(case), _oracle_local(case, _out_size(case, x))
    t, wt, bt = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    got = jvp(lambda w, b: jvp(lambda x: ours(x, w, b), (x,), (t,))[1], (w, b), (wt, bt))[1]
    _close(got, ref(t, wt, torch.zeros_like(b)))  # bilinear: the mixed second derivative is f(t, t_w)
    assert got.abs().sum() > 0
    got = jvp(lambda b: jvp(lambda w: ours(x, w, b), (w,), (wt,))[1], (b,), (bt,))[1]
    _close(got, torch.zeros_like(got))

    def loss(f):
        return lambda x, w: f(x, w, b).pow(3).sum()

    if case.ndim == 1:  # the full forward-over-forward Hessian: thousands of interpreted launches in 2-d
        _close(jacfwd(jacfwd(loss(ours), argnums=(0, 1)), argnums=(0, 1))(x, w),
               jacfwd(jacfwd(loss(ref), argnums=(0, 1)), argnums=(0, 1))(x, w))
    geom = _resolved(case)
    gy = torch.randn_like(ref(x, w, b))
    gyt = torch.randn_like(gy)

    def gw(g, x):
        return lc_ops.local_conv_grad_weight(g, x, *geom)[0]

    got = jvp(lambda x: jvp(lambda g: gw(g, x), (gy,), (gyt,))[1], (x,), (t,))[1]
    _close(got, gw(gyt, t))


def test_compile_around_a_differentiating_transform_is_a_clear_error(kernel_device):
    """Inside torch.compile only reverse mode and vmap of our ops trace: grad/jvp around them inside the
    compiled function raise our explanation, never a wrong number; vmap inside compile works."""
    torch._dynamo.reset()
    x = torch.randn(2, 1, 4, 4, dtype=D, device=kernel_device)
    with pytest.raises(Exception, match=r"cannot run under a torch\.func transform by itself"):
        torch.compile(grad(lambda x: cf.unfold(x, (2, 2)).pow(2).sum()), backend="aot_eager", fullgraph=True)(x)
    with pytest.raises(Exception, match="got a forward-mode AD tangent"):
        torch.compile(lambda x, t: jvp(lambda x: cf.unfold(x, (2, 2)), (x,), (t,))[1], backend="aot_eager",
                      fullgraph=True)(x, x)
    got = torch.compile(vmap(lambda x: cf.unfold(x, (2, 2))), backend="aot_eager", fullgraph=True)(x[:, None])
    _close(got, vmap(lambda x: oracle_unfold(x, Case(1, 1, (4, 4), (2, 2))))(x[:, None]))
    torch._dynamo.reset()


def test_absent_tangents_cost_nothing(path, monkeypatch):
    """A jvp over the input alone runs one extra op call (the tangent's), not a second one on zero
    weight/bias tangents; reverse mode over such a jvp works, N = 1 included (a per-sample slice)."""
    case = CASES[0]
    x = _x(case, path)
    w, b = _params(case, path)
    ours, ref = _local(case), _oracle_local(case, _out_size(case, x))
    calls = []
    orig = lc_ops.local_conv

    def spy(*args):
        calls.append(args[1].shape)
        return orig(*args)

    monkeypatch.setattr(lc_ops, "local_conv", spy)
    t = torch.randn_like(x)
    _close(jvp(lambda x: ours(x, w, b), (x,), (t,))[1], jvp(lambda x: ref(x, w, b), (x,), (t,))[1])
    assert len(calls) == 2
    x1, bt = x[:1], torch.randn_like(b)
    for f in (ours, ref):  # reverse over forward through the bias tangent's broadcast, N = 1
        g = grad(lambda bt, f=f: jvp(lambda b: f(x1, w, b), (b,), (bt,))[1].pow(2).sum())(bt)
        calls.append(g)
    _close(calls[-2], calls[-1])
    _close(calls[-1], 2 * bt)
