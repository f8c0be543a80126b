"""The dynamic-sparse layers under the transforms and tracers users run them through, against plain torch.

- ``DynamicSparseLinear(regrow='gradient')`` (RigL): the dense gradient tapped at the masked entries is autograd's
  gradient of ``F.linear`` on ``weight·mask``, on both paths (the kernels' 1-tap view under the interpreter and the
  plain-torch ``F.linear``), eager and compiled; regrowth picks its top-k by hand.
- ``torch.func.grad`` / ``jvp`` / ``vmap`` through ``DynamicSparseConv2d`` / ``DynamicSparseLinear`` in ``train()``:
  the gradients and tangents of the same computation with ``nn.Conv2d`` / ``F.linear`` on ``weight·mask``; no
  statistics, no counter step under the transform (documented).
- ``torch.fx.symbolic_trace`` of every masked layer (as the root and as a submodule): the GraphModule's outputs are
  the layer's.
"""

import pytest
import torch
import torch._dynamo.testing
import torch.fx
import torch.nn.functional as F
from _families import check_rigl_period, cubic_loss
from torch import nn

import convzoo
from convzoo.layers.dynamic_sparse import PruneRegrowSchedule


def _linear_dense_grad(layer, x):
    w = (layer.weight.detach() * layer.mask).requires_grad_()
    cubic_loss(F.linear(x, w, layer.bias)).backward()
    return w.grad


# ---------------------------------------------------------------------------------------------- RigL on Linear
def test_linear_gradient_regrowth_matches_the_brute_force_dense_gradient(path):
    torch.manual_seed(1)
    layer = convzoo.DynamicSparseLinear(12, 10, density=0.4, score="magnitude", regrow="gradient", update_every=3,
                                        device=path)
    assert layer.regrow_init == "zeros"
    xs = [torch.randn(2, 3, 12, device=path, requires_grad=True) for _ in range(4)]  # leading dims: samples
    check_rigl_period(layer, xs, _linear_dense_grad)


def test_linear_gradient_tap_unbatched_off_in_eval_and_no_grad():
    torch.manual_seed(2)
    layer = convzoo.DynamicSparseLinear(8, 6, density=0.5, regrow="gradient", score="magnitude")
    x = torch.randn(8)
    with torch.no_grad():
        layer(x)
    layer.eval()
    cubic_loss(layer(x)).backward()
    assert layer.dense_grad is None and int(layer.calls) == 1
    layer.train()
    cubic_loss(layer(x)).backward()  # a 1-d input: one sample
    torch.testing.assert_close(layer.dense_grad, _linear_dense_grad(layer, x) * ~layer.mask, rtol=1e-5, atol=1e-6)


def test_linear_gradient_tap_compiled_without_recompiles(path):
    torch.manual_seed(3)
    kwargs = dict(density=0.5, regrow="gradient", score="magnitude", update_every=2, device=path)
    layer, eager = convzoo.DynamicSparseLinear(8, 6, **kwargs), convzoo.DynamicSparseLinear(8, 6, **kwargs)
    eager.load_state_dict(layer.state_dict())
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    xs = [torch.randn(5, 8, device=path) for _ in range(4)]
    want = torch.zeros(6, 8, device=path)
    for i, x in enumerate(xs):
        if i % 2:  # steps 2 and 4 tap: the sum of their dense gradients at the masked entries
            want += _linear_dense_grad(eager, x) * ~eager.mask
        cubic_loss(compiled(x)).backward()
        cubic_loss(eager(x)).backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(eager.dense_grad, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.dense_grad, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, eager.weight.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- torch.func
def _conv_and_reference():
    layer = convzoo.DynamicSparseConv2d(3, 4, 3, padding=1, density=0.5, score="count", regrow="coactivation")
    x = torch.randn(2, 3, 5, 5)

    def ref(params, x):
        return F.conv2d(x, params["weight"] * layer.mask, params["bias"], padding=1)
    return layer, x, ref


def _linear_and_reference():
    layer = convzoo.DynamicSparseLinear(6, 5, density=0.5, regrow="gradient", score="magnitude")
    x = torch.randn(3, 6)

    def ref(params, x):
        return F.linear(x, params["weight"] * layer.mask, params["bias"])
    return layer, x, ref


@pytest.mark.parametrize("make", [_conv_and_reference, _linear_and_reference], ids=["conv2d", "linear"])
def test_torch_func_grad_jvp_vmap_in_train_mode(make):
    torch.manual_seed(4)
    layer, x, ref = make()
    layer.train()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    buffers = dict(layer.named_buffers())
    stats, calls = layer.coactivation.clone(), int(layer.calls)

    def f(p, x):
        return torch.func.functional_call(layer, (p, buffers), (x,))

    got = torch.func.grad(lambda p: cubic_loss(f(p, x)))(params)
    want = torch.func.grad(lambda p: cubic_loss(ref(p, x)))(params)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    tangent = {k: torch.randn_like(v) for k, v in params.items()}
    y, dy = torch.func.jvp(lambda p: f(p, x), (params,), (tangent,))
    y_ref, dy_ref = torch.func.jvp(lambda p: ref(p, x), (params,), (tangent,))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dy, dy_ref, rtol=1e-5, atol=1e-6)
    # per-sample gradients (vmap of grad)
    got = torch.func.vmap(torch.func.grad(lambda p, xi: cubic_loss(f(p, xi[None]))), (None, 0))(params, x)
    want = torch.func.vmap(torch.func.grad(lambda p, xi: cubic_loss(ref(p, xi[None]))), (None, 0))(params, x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    # under a transform the layer is a pure function: no statistics, no counter step, no gradient tap
    assert torch.equal(layer.coactivation, stats) and int(layer.calls) == calls == layer._calls
    assert layer.dense_grad is None
    # outside a transform it counts again
    layer(x)
    assert int(layer.calls) == calls + 1


# ---------------------------------------------------------------------------------------------- torch.fx
LAYERS = [
    (lambda: convzoo.MaskedConv1d(3, 4, 3, density=0.5), (2, 3, 7)),
    (lambda: convzoo.MaskedConv2d(3, 4, 3, padding=1, density=0.5), (2, 3, 5, 5)),
    (lambda: convzoo.MaskedConv3d(3, 4, 3, density=0.5), (1, 3, 4, 4, 4)),
    (lambda: convzoo.MaskedLinear(6, 4, density=0.5), (2, 3, 6)),
    (lambda: convzoo.DynamicSparseConv2d(3, 4, 3, density=0.5), (2, 3, 5, 5)),
    (lambda: convzoo.DynamicSparseLinear(6, 4, density=0.5), (3, 6)),
    (lambda: convzoo.DynamicSparseLinear(6, 4, density=0.5, regrow="gradient"), (3, 6)),
]


@pytest.mark.parametrize("make, shape", LAYERS, ids=["m1d", "m2d", "m3d", "mlin", "d2d", "dlin", "dlin_rigl"])
def test_fx_symbolic_trace_computes_the_same(make, shape):
    torch.manual_seed(5)
    layer = make()
    x = torch.randn(shape)
    traced = torch.fx.symbolic_trace(layer)  # the layer as the root
    torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=0)
    model = nn.Sequential(nn.Identity(), make(), nn.ReLU())  # as a submodule: one call_module node
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    if isinstance(model[1], convzoo.DynamicSparseLinear | convzoo.DynamicSparseConv2d):
        before = int(model[1].calls)
        traced(x)  # the traced module runs the layer itself: its statistics and counters too
        assert int(model[1].calls) == before + 1
    # the layer's checks still run on real tensors
    with pytest.raises((TypeError, ValueError), match="input"):
        traced(torch.ones(shape, dtype=torch.int64))


def test_schedule_error_names_the_linear_layers():
    with pytest.raises(ValueError, match="DynamicSparseLinear"):
        PruneRegrowSchedule(nn.Sequential(nn.Linear(2, 2)))
