"""convzoo.curvature.KFACFactors: each hooked layer's factor is the EMA of its input's KFAC factor (checked
against an independent unfold / unfoldNd formula in float64, EMA computed by hand), the hooks skip eval mode
and unsupported modules, remove()/reset() work, bad arguments are refused, and a whole training step with the
hooks runs under torch.compile(fullgraph=True, dynamic=True) with the eager factors."""

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
import unfoldNd
from problems import TOL
from torch import nn

import convzoo
from convzoo.curvature import KFACFactors

BETA = 0.75


# ---------------------------------------------------------------------------------------------- the formula
def _conv_patches(layer: nn.Module, x: torch.Tensor, output_size=None) -> torch.Tensor:
    """``[N, C·∏K, L]``: the patches ``layer`` sees, from unfoldNd / F.pad (not from convzoo)."""
    ks, st, dil = layer.kernel_size, layer.stride, layer.dilation
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        op = layer._output_padding(x, output_size, st, layer.padding, ks, len(ks), dil)
        return unfoldNd.unfold_transposeNd(x, ks, stride=st, padding=layer.padding, output_padding=tuple(op),
                                           dilation=dil)
    if layer.padding == "same":  # odd effective kernels in these cases: (d·(k-1))/2 on both sides
        pad = [p for d, k in zip(reversed(dil), reversed(ks)) for p in 2 * [d * (k - 1) // 2]]
    else:
        pad = [p for p in reversed(layer.padding) for _ in range(2)]
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return unfoldNd.unfoldNd(F.pad(x, pad, mode=mode), ks, stride=st, dilation=dil)


def _factor(layer: nn.Module, x: torch.Tensor, mode: str, bias: bool, output_size=None) -> torch.Tensor:
    """The layer's KFAC input factor of one batch in float64: ``Σ_{n,l} p pᵀ / N`` per group (expand) or
    ``Σ_n p̄ p̄ᵀ / N`` (reduce), a 1 appended to each patch for the bias column."""
    x = x.double()
    n = x.shape[0]
    if isinstance(layer, nn.Linear):
        a = x.reshape(n, -1, layer.in_features)
        a = a.mean(1) if mode == "reduce" else a.reshape(-1, layer.in_features)
        if bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        return a.T @ a / n
    p = _conv_patches(layer, x, output_size)
    g = layer.groups
    p = p.view(n, g, p.shape[1] // g, p.shape[2])
    if mode == "reduce":
        p = p.mean(3, keepdim=True)
    if bias:
        p = torch.cat([p, p.new_ones(n, g, 1, p.shape[3])], 2)
    return torch.einsum("ngil,ngjl->gij", p, p) / n


# (id, layer factory, input shape without N, forward kwargs)
LAYERS = [
    ("conv1d_s2_d2", lambda: nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=1), (3, 11), {}),
    ("conv2d_g2_s2_nobias", lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), groups=2, bias=False),
     (4, 7, 6), {}),
    ("conv2d_same_reflect", lambda: nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"), (2, 6, 5), {}),
    ("conv2d_circular", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 5, 6), {}),
    ("conv3d", lambda: nn.Conv3d(2, 3, 2, padding=1), (2, 4, 3, 5), {}),
    ("convT1d_s2_op1", lambda: nn.ConvTranspose1d(3, 2, 3, stride=2, padding=1, output_padding=1), (3, 6), {}),
    ("convT2d_g2_output_size", lambda: nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, groups=2), (4, 4, 5),
     {"output_size": (8, 10)}),
    ("convT3d", lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), (2, 3, 2, 3), {}),
    ("linear", lambda: nn.Linear(5, 3), (5,), {}),
    ("linear_seq_nobias", lambda: nn.Linear(4, 3, bias=False), (3, 4), {}),
]


@pytest.mark.parametrize("mode", ["expand", "reduce"])
@pytest.mark.parametrize("case", LAYERS, ids=[c[0] for c in LAYERS])
def test_factor_is_the_ema_of_the_input_factor(case, mode, path):
    """After 1 step the factor is the first batch's (beta = 0 at the first update); after 3 it is
    ``β(β F1 + (1-β) F2) + (1-β) F3``, each F the formula on the input that step's forward got."""
    _, make, shape, kwargs = case
    layer = make().to(path)
    kfac = KFACFactors(nn.Sequential(layer), mode=mode, beta=BETA)
    assert list(kfac.factors) == ["0"]
    bias = layer.bias is not None
    expected = None
    for step, n in enumerate((2, 3, 2)):
        x = torch.randn(n, *shape, device=path)
        layer(x, **kwargs)
        f = _factor(layer, x, mode, bias, kwargs.get("output_size"))
        expected = f if expected is None else BETA * expected + (1 - BETA) * f
        if step in (0, 2):
            got = kfac["0"]
            assert got.dtype == torch.float32 and got.shape == f.shape
            torch.testing.assert_close(got.double(), expected, atol=10 * TOL[torch.float32][0],
                                       rtol=10 * TOL[torch.float32][1])  # x3 EMA steps over fp32 sums


def test_unbatched_input_is_one_sample():
    conv = nn.Conv2d(4, 2, 3, groups=2)
    kfac = KFACFactors(conv, beta=0.0, bias=False)
    x = torch.randn(4, 5, 5)
    conv(x)
    p = unfoldNd.unfoldNd(x.double()[None], 3)[0].view(2, 18, 9)
    torch.testing.assert_close(kfac[""].double(), p @ p.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_group_reduction_mean_averages_the_groups_first():
    """curvlinops' convention: the factor of the group-averaged input, ``[C/G·∏K, C/G·∏K]``."""
    conv = nn.Conv2d(6, 2, 3, groups=2, bias=False)
    kfac = KFACFactors(conv, group_reduction="mean", beta=0.0)
    x = torch.randn(2, 6, 5, 5)
    conv(x)
    p = unfoldNd.unfoldNd(x.double().view(2, 2, 3, 5, 5).mean(1), 3)
    expected = torch.einsum("nil,njl->ij", p, p) / 2
    torch.testing.assert_close(kfac[""].double(), expected, atol=1e-5, rtol=1e-5)


def test_hooks_skip_eval_mode():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 3 * 3, 2))
    kfac = KFACFactors(model)
    model.eval()
    model(torch.randn(2, 2, 5, 5))
    assert all(not f.any() for f in kfac.factors.values())
    model.train()
    model(torch.randn(2, 2, 5, 5))
    assert all(f.any() for f in kfac.factors.values())


def test_only_conv_transposed_conv_and_linear_layers_are_hooked():
    model = nn.Sequential(convzoo.LocalConv2d(2, 2, (6, 6), 3, padding=1), nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3),
                          nn.ConvTranspose2d(3, 2, 2), nn.Flatten(), nn.Linear(2 * 5 * 5, 3), nn.Bilinear(3, 3, 2))
    kfac = KFACFactors(model)
    assert list(kfac.factors) == ["2", "3", "5"]
    assert {n: tuple(f.shape) for n, f in kfac.factors.items()} == {"2": (1, 19, 19), "3": (1, 13, 13),
                                                                      "5": (51, 51)}
    assert sum(len(m._forward_hooks) for m in model) == 3  # LocalConv2d, BatchNorm, Bilinear: no hook at all
    sub = KFACFactors(model, modules=["5", model[2]])
    assert list(sub.factors) == ["5", "2"]


def test_remove_context_manager_and_reset():
    model = nn.Sequential(nn.Conv1d(2, 2, 3), nn.Flatten(), nn.Linear(6, 2))
    x = torch.randn(2, 2, 5)
    with KFACFactors(model, beta=0.5) as kfac:
        model(x)
        first = {k: v.clone() for k, v in kfac.factors.items()}
    assert all(not m._forward_hooks for m in model)  # exit removed the hooks
    model(torch.randn(2, 2, 5))
    for k, v in kfac.factors.items():
        assert torch.equal(v, first[k])  # no update after exit
    kfac = KFACFactors(model, beta=0.5)
    model(x)
    kfac.remove()
    model(2 * x)
    for k, v in kfac.factors.items():
        assert torch.equal(v, first[k])  # no update after remove()
    kfac = KFACFactors(model, beta=0.5)
    model(2 * x)
    kfac.reset()
    assert all(not f.any() for f in kfac.factors.values())
    model(x)  # after reset the average starts afresh: the factor is this batch's, not 0.5 of it
    for k, v in kfac.factors.items():
        torch.testing.assert_close(v, first[k])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"beta": -0.1}, ValueError, "beta must be in"),
    ({"beta": 1.5}, ValueError, "beta must be in"),
    ({"beta": float("nan")}, ValueError, "beta must be in"),
    ({"beta": "0.9"}, TypeError, "beta must be a real number"),
    ({"mode": "diag"}, ValueError, "mode must be one of"),
    ({"group_reduction": "sum"}, ValueError, "group_reduction must be one of"),
    ({"bias": 1}, TypeError, "bias must be a bool"),
    ({"modules": ["nope"]}, ValueError, "modules: no module named 'nope'"),
    ({"modules": ["1"]}, TypeError, "modules: '1' is a ReLU"),
    ({"modules": [nn.Linear(2, 2)]}, ValueError, "modules: Linear is not a module of model"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        KFACFactors(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU()), **kwargs)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        KFACFactors([nn.Conv2d(1, 1, 1)])


# ---------------------------------------------------------------------------------------------- torch.compile
def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(3, 2, 2, stride=2),
                         nn.Flatten(), nn.Linear(2 * 10 * 12, 4))


def _train(batch_sizes, compiled: bool, gradients: bool = False, dynamic: bool = True):
    """SGD steps of ``_cnn`` with KFACFactors hooked (and its gradient factors with ``gradients``), one per batch
    size, the step compiled (fullgraph, ``dynamic``) or eager: (the KFACFactors, losses, compiled frames)."""
    model = _cnn()
    kfac = KFACFactors(model, beta=BETA, gradients=gradients)
    params = list(model.parameters())

    def step(x, y):
        loss = F.mse_loss(model(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(0.1 * g)
        return loss.detach()

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    if compiled:
        torch._dynamo.reset()
        step = torch.compile(step, fullgraph=True, dynamic=dynamic, backend=counter)
    g = torch.Generator().manual_seed(1)
    losses = []
    for n in batch_sizes:  # N = 1 would get its own graph (0/1 specialisation)
        losses.append(step(torch.randn(n, 2, 5, 6, generator=g), torch.randn(n, 4, generator=g)))
    return kfac, losses, counter.frame_count


# autograd.grad inside the compiled step needs trace_autograd_ops; H != W, and no duck sizing either
@torch._dynamo.config.patch(trace_autograd_ops=True)
@torch.fx.experimental._config.patch(use_duck_shape=False)
def test_compiled_training_step_accumulates_the_eager_factors():
    """Forward (hooks updating Conv2d / ConvTranspose2d / Linear factors), loss, backward and the SGD step,
    all in one fullgraph dynamic compiled step, for 3 steps over 2 batch sizes: the eager run's factors."""
    sizes = (2, 2, 3)
    eager, eager_losses, _ = _train(sizes, compiled=False)
    comp, comp_losses, frames = _train(sizes, compiled=True)
    assert list(comp.factors) == ["0", "2", "4"]
    for name in eager.factors:
        torch.testing.assert_close(comp.factors[name], eager.factors[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(comp_losses), torch.stack(eager_losses))
    # one graph for the first update (beta = 0), one for the later ones; the batch size is dynamic
    assert frames == 2
    torch._dynamo.reset()


@torch._dynamo.config.patch(trace_autograd_ops=True)
@torch.fx.experimental._config.patch(use_duck_shape=False)
def test_compiled_training_step_recompiles_only_for_the_first_update():
    """The target: the second graph (beta switching from 0 to its value) is the only recompile; a new batch
    size is dynamic and needs none."""
    _, _, frames = _train((2, 2, 3), compiled=True)
    torch._dynamo.reset()
    assert frames == 2


# ---------------------------------------------------------------------------------------------- attacks
@pytest.mark.parametrize("before, after", [(torch.float32, torch.float64), (torch.float64, torch.float32)],
                         ids=["float_to_double", "double_to_float"])
def test_factors_follow_a_dtype_change_of_the_model(before, after):
    """``model.double()`` / ``.float()`` after construction: the factors follow the layer's new dtype (fp64
    for fp64, else fp32) as they follow a device move, and keep their average; it used to raise a
    TypeError inside the hook (``out must be torch.float64``)."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).to(before)
    kfac = KFACFactors(model, beta=0.5)
    x1, x2 = torch.randn(2, 2, 5, 5), torch.randn(3, 2, 5, 5)
    model(x1.to(before))
    model.to(after)
    model(x2.to(after))
    model.eval()  # the expected Linear inputs below come from forwards that must not update the factors
    for name, layer in (("0", model[0]), ("2", model[2])):
        inputs = (x1, x2) if name == "0" else (model[0](x1.to(after)).flatten(1), model[0](x2.to(after)).flatten(1))
        assert kfac[name].dtype == (torch.float64 if after == torch.float64 else torch.float32)
        expected = 0.5 * _factor(layer, inputs[0], "expand", True) + 0.5 * _factor(layer, inputs[1], "expand", True)
        torch.testing.assert_close(kfac[name].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_activation_checkpointing_recompute_does_not_update_again(reentrant):
    """``torch.utils.checkpoint`` reruns the forward (hooks included) during backward: that rerun sees the
    same input again and must not count as a second update (it used to: ``β²A + (1-β²)F`` per step, the
    decay silently squared), so the factor is the EMA of the real forwards."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    kfac = KFACFactors(model, beta=BETA)
    xs = [torch.randn(n, 3) for n in (2, 3)]
    for x in xs:
        torch.utils.checkpoint.checkpoint(model, x.requires_grad_(), use_reentrant=reentrant).sum().backward()
    model.eval()  # the expected inputs below come from forwards that must not update the factors
    for name, inputs in (("0", xs), ("2", [model[1](model[0](x)).detach() for x in xs])):
        expected = BETA * _factor(model[int(name)], inputs[0], "expand", True)
        expected += (1 - BETA) * _factor(model[int(name)], inputs[1], "expand", True)
        torch.testing.assert_close(kfac[name].double(), expected, atol=1e-5, rtol=1e-5)


def test_a_copy_of_the_hooked_model_does_not_update_the_factors():
    """``copy.deepcopy(model)`` (an EMA / SWA copy, ``swa_utils.AveragedModel``) and ``torch.save(model)``
    while hooked: the copy has its own weights, so its forwards must not blend into the original's factors
    (a deepcopy's hooks used to, silently), and saving the whole model must work (the lambda hooks could
    not be pickled). The original keeps updating."""
    import copy
    import io

    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(2 * 3 * 3, 2))
    kfac = KFACFactors(model, beta=BETA)
    x = torch.randn(2, 2, 5, 5)
    model(x)
    first = {k: v.clone() for k, v in kfac.factors.items()}
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        twin(torch.randn(3, 2, 5, 5))
        for k, v in kfac.factors.items():
            assert torch.equal(v, first[k]), k
    model(2 * x)
    assert all(not torch.equal(v, first[k]) for k, v in kfac.factors.items())


def test_uninitialized_lazy_layers_are_refused_with_a_clear_error():
    """A ``LazyConv2d`` / ``LazyLinear`` before its first forward has no shapes to size the factor: refused at
    construction, naming the layer (the hook used to raise 'out must have shape (1, 19, 19), got (1, 1, 1)'
    in the first forward); after one forward it is an ordinary layer."""
    model = nn.Sequential(nn.LazyConv2d(3, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="model: '0' is a lazy layer"):
        KFACFactors(model)
    model(torch.randn(2, 2, 5, 5))
    kfac = KFACFactors(model)
    model(torch.randn(2, 2, 5, 5))
    assert {n: tuple(f.shape) for n, f in kfac.factors.items()} == {"0": (1, 19, 19), "2": (28, 28)}


def test_state_dict_round_trip_resumes_the_average(tmp_path):
    """A checkpoint of the factors and their started flags: a resumed run continues the same average."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 3 * 3, 2))

    xs = [torch.randn(2, 2, 5, 5) for _ in range(3)]
    whole, first = model(), model()
    k_whole, k_first = KFACFactors(whole, beta=0.5), KFACFactors(first, beta=0.5)
    for x in xs:
        whole(x)
    for x in xs[:2]:
        first(x)
    torch.save(k_first.state_dict(), tmp_path / "kfac.pt")
    resumed = model()
    k_resumed = KFACFactors(resumed, beta=0.5)
    k_resumed.load_state_dict(torch.load(tmp_path / "kfac.pt"))
    resumed(xs[2])
    for name in k_whole.factors:
        torch.testing.assert_close(k_resumed[name], k_whole[name])
    with pytest.raises(ValueError, match="layers"):
        k_resumed.load_state_dict({"factors": {"0": k_whole["0"]}, "started": {"0": True}})
    with pytest.raises(ValueError, match="shape"):
        k_resumed.load_state_dict({"factors": {**k_whole.factors, "0": torch.zeros(2, 2)},
                                   "started": dict.fromkeys(k_whole.factors, True)})
