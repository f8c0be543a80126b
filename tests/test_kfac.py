"""K-FAC gradient factors (KFACFactors(gradients=True)) and the convzoo.KFAC preconditioner.

References: curvlinops 3.0.1's KFACLinearOperator / KFACInverseLinearOperator (Linear and Conv2d, fp64 to 1e-10),
and for every other layer (Conv1d/3d, ConvTranspose, groups, dilation, padding modes) brute force in fp64:
patches from unfoldNd, output gradients known by construction (the loss is ``Σ out·R``, so the gradient is R),
the gradient matrix as the sum of the per-sample ``Σ_l g_{n,l} p_{n,l}ᵀ``, the preconditioned gradient by
``torch.linalg.solve``."""

import math

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from test_curvature import LAYERS, _conv_patches, _train
from torch import nn

import convzoo
from convzoo.curvature import KFACFactors

try:  # the curvlinops comparisons only; the brute-force references need nothing
    import curvlinops
except ImportError:
    curvlinops = None
needs_curvlinops = pytest.mark.skipif(curvlinops is None, reason="curvlinops is not installed")
F64 = dict(atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------- brute force
def _rows(layer, x, out, grad, mode, output_size=None):
    """fp64 ``(p [B, R, D], g [B, R, C'], N, L)``: per group ``B``, the rows (samples × positions for expand,
    samples for reduce) of the patches (a 1 appended for the bias) and of the output gradient ``grad``."""
    x, grad = x.double(), grad.double()
    n = x.shape[0]
    if isinstance(layer, nn.Linear):
        p = x.reshape(n, -1, layer.in_features)[:, None]            # [N, 1, T, in]
        g = grad.reshape(n, -1, layer.out_features)[:, None]        # [N, 1, T, out]
        groups = 1
    else:
        groups = layer.groups
        pt = _conv_patches(layer, x, output_size)                   # [N, C·K, L]
        p = pt.view(n, groups, -1, pt.shape[-1]).transpose(2, 3)   # [N, G, L, D]
        g = grad.reshape(n, groups, -1, pt.shape[-1]).transpose(2, 3)
    positions = p.shape[2]
    if layer.bias is not None:
        p = torch.cat([p, p.new_ones(*p.shape[:-1], 1)], -1)
    if mode == "reduce":
        p, g = p.mean(2, keepdim=True), g.sum(2, keepdim=True)
    p = p.transpose(0, 1).reshape(groups, -1, p.shape[-1])
    g = g.transpose(0, 1).reshape(groups, -1, g.shape[-1])
    return p, g, n, positions


def _reference(layer, x, out, grad, mode, output_size=None):
    """Curvlinops-scaled ``A [B, D, D]``, ``G [B, C', C']`` and the gradient matrix ``M [B, C', D]`` (the sum
    over samples of ``Σ_l g pᵀ``, i.e. of the per-sample gradients, expand's rows either way)."""
    p, g, n, positions = _rows(layer, x, out, grad, mode, output_size)
    a = p.transpose(1, 2) @ p / (n * (positions if mode == "expand" else 1))
    gg = n * g.transpose(1, 2) @ g
    pe, ge, _, _ = _rows(layer, x, out, grad, "expand", output_size)
    return a, gg, ge.transpose(1, 2) @ pe


def _run(layer, shape, kwargs, n=3, seed=0):
    """One forward and a backward of ``Σ out·R``: (x, out, R)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    out = layer(x, **kwargs)
    r = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * r).sum().backward()
    return x, out, r


@pytest.mark.parametrize("mode", ["expand", "reduce"])
@pytest.mark.parametrize("case", LAYERS, ids=[c[0] for c in LAYERS])
def test_factors_match_brute_force(case, mode):
    """A (curvlinops scale) and G of one batch, then their EMA after a second batch, in fp64."""
    _, make, shape, kwargs = case
    torch.manual_seed(0)
    layer = make().double()
    kfac = KFACFactors(nn.Sequential(layer), mode=mode, beta=0.5, gradients=True, scale="curvlinops")
    batches = [_run(layer, shape, kwargs, n, seed) for n, seed in ((3, 0), (2, 1))]
    refs = [_reference(layer, *b, mode, kwargs.get("output_size")) for b in batches]
    a_exp = 0.5 * refs[0][0] + 0.5 * refs[1][0]
    g_exp = 0.5 * refs[0][1] + 0.5 * refs[1][1]
    a, g = kfac.input_factors["0"], kfac.gradient_factors["0"]
    torch.testing.assert_close(a if a.dim() == 3 else a[None], a_exp, **F64)
    torch.testing.assert_close(g if g.dim() == 3 else g[None], g_exp, **F64)


@pytest.mark.parametrize("case", LAYERS, ids=[c[0] for c in LAYERS])
def test_gradient_matrix_is_the_sum_of_per_sample_gradients(case):
    """The layout KFAC reads ``weight.grad`` / ``bias.grad`` in (``[B, C_out/G, D]``, bias last) is the
    factors' row order: it equals ``Σ_n Σ_l g_{n,l} p_{n,l}ᵀ`` built from unfoldNd patches."""
    _, make, shape, kwargs = case
    layer = make().double()
    kfac = convzoo.KFAC(nn.Sequential(layer))
    batch = _run(layer, shape, kwargs)
    _, _, m = _reference(layer, *batch, "expand", kwargs.get("output_size"))
    torch.testing.assert_close(kfac._grad_matrix(layer), m, **F64)


@pytest.mark.parametrize("mode", ["expand", "reduce"])
@pytest.mark.parametrize("case", LAYERS, ids=[c[0] for c in LAYERS])
def test_step_is_the_damped_kronecker_solve(case, mode):
    """``step()`` leaves ``(G + λ_G I)⁻¹ M (A + λ_A I)⁻¹`` per group in ``weight.grad`` / ``bias.grad``."""
    _, make, shape, kwargs = case
    layer = make().double()
    lam_a, lam_g = 0.3, 0.02
    kfac = convzoo.KFAC(nn.Sequential(layer), damping=(lam_a, lam_g), damping_split="none", beta=0.0, mode=mode)
    batch = _run(layer, shape, kwargs)
    a, g, m = _reference(layer, *batch, mode, kwargs.get("output_size"))
    eye_a, eye_g = torch.eye(a.shape[-1], dtype=a.dtype), torch.eye(g.shape[-1], dtype=g.dtype)
    expected = torch.linalg.solve(g + lam_g * eye_g, m) @ torch.linalg.inv(a + lam_a * eye_a)
    kfac.step()
    torch.testing.assert_close(kfac._grad_matrix(layer), expected, **F64)


# ---------------------------------------------------------------------------------------------- curvlinops
def _cl_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=2), nn.ReLU(),
                         nn.Conv2d(4, 5, 2, dilation=2, bias=False), nn.Flatten(), nn.Linear(20, 6), nn.Tanh(),
                         nn.Linear(6, 3)).double()


def _cl_data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(7, 3, 7, 7, generator=gen, dtype=torch.float64), torch.randint(0, 3, (7,), generator=gen)


def _cl_operator(model, x, y, approx, fisher="empirical"):
    return curvlinops.KFACLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)],
                                         fisher_type=fisher, kfac_approx=approx, separate_weight_and_bias=False,
                                         check_deterministic=False)


@needs_curvlinops
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_factors_match_curvlinops(approx):
    """Each factor equals curvlinops' ``input_covariances`` / ``gradient_covariances`` (fp64, 1e-10), hence
    ``G ⊗ A`` its KFAC block, for Linear and Conv2d (mean-reduced cross entropy, one batch, beta=0)."""
    model = _cl_model()
    x, y = _cl_data()
    kfac = KFACFactors(model, beta=0.0, gradients=True, scale="curvlinops", mode=approx)
    F.cross_entropy(model(x), y).backward()
    kfac.remove()
    op = _cl_operator(model, x, y, approx)
    op.compute_kronecker_factors()
    assert set(kfac.factors) == set(op._input_covariances) == {"0", "2", "4", "6"}
    for name in kfac.factors:
        a, g = kfac.input_factors[name].squeeze(0), kfac.gradient_factors[name].squeeze(0)
        torch.testing.assert_close(a, op._input_covariances[name], **F64)
        torch.testing.assert_close(g, op._gradient_covariances[name], **F64)
        torch.testing.assert_close(torch.kron(g, a), torch.kron(op._gradient_covariances[name],
                                                                op._input_covariances[name]), **F64)


@needs_curvlinops
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("damping, split, heuristic", [((1e-2, 3e-3), "none", False), (1e-2, "none", False),
                                                       (1e-2, "pi", True)], ids=["pair", "scalar", "pi"])
def test_step_matches_curvlinops_inverse(approx, damping, split, heuristic):
    """``step()`` = curvlinops' ``KFACInverseLinearOperator(KFACLinearOperator(...), damping)`` applied to the
    gradient (``use_heuristic_damping`` for the π split), fp64."""
    model = _cl_model()
    x, y = _cl_data()
    params = list(model.parameters())
    kfac = convzoo.KFAC(model, beta=0.0, damping=damping, damping_split=split, mode=approx)
    F.cross_entropy(model(x), y).backward()
    kfac.remove()
    grads = [p.grad.clone() for p in params]
    kfac.step()
    inverse = curvlinops.KFACInverseLinearOperator(_cl_operator(model, x, y, approx), damping=damping,
                                                   use_heuristic_damping=heuristic)
    for p, expected in zip(params, inverse @ grads):
        torch.testing.assert_close(p.grad, expected, **F64)


@needs_curvlinops
def test_mc_fisher_matches_curvlinops_with_the_same_generator():
    """``fisher='mc'``: labels drawn as curvlinops draws them (its seed, its ``multinomial``), so ``G`` is
    curvlinops' MC ``gradient_covariances`` exactly; the training backward leaves G alone."""
    model = _cl_model()
    x, y = _cl_data()
    gen = torch.Generator().manual_seed(2147483647)  # curvlinops' default seed
    kfac = convzoo.KFAC(model, beta=0.0, fisher="mc", generator=gen)
    out = model(x)
    kfac.mc_backward(out)
    assert all(p.grad is None for p in model.parameters())  # the MC backward leaves .grad alone
    g_mc = {k: v.clone() for k, v in kfac.factors.gradient_factors.items()}
    F.cross_entropy(out, y).backward()
    kfac.remove()
    op = _cl_operator(model, x, y, "expand", fisher="mc")
    op.compute_kronecker_factors()
    for name, g in kfac.factors.gradient_factors.items():
        assert torch.equal(g, g_mc[name])
        torch.testing.assert_close(g.squeeze(0), op._gradient_covariances[name], **F64)
    kfac.step()  # runs on the MC factors


def test_mc_fisher_step_without_mc_backward_raises():
    model = nn.Sequential(nn.Linear(3, 2))
    kfac = convzoo.KFAC(model, fisher="mc")
    F.cross_entropy(model(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1])).backward()
    with pytest.raises(RuntimeError, match="mc_backward"):
        kfac.step()


def test_mc_fisher_mse_is_the_gaussian_sample():
    """``loss='mse'``: ``y = out + N(0, ½)`` drawn with the generator, loss ``mse·√C``: G is N·Σ g gᵀ of that
    loss's output gradient, recomputed here by hand with the same draw."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    kfac = convzoo.KFAC(model, beta=0.0, fisher="mc", loss="mse", generator=torch.Generator().manual_seed(3))
    out = model(x)
    kfac.mc_backward(out)
    noise = math.sqrt(0.5) * torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    grad = 2 * (-noise) / out.numel() * math.sqrt(4)  # d/d out of mean((out - y)²)·√C with y = out + noise
    torch.testing.assert_close(kfac.factors.gradient_factors["0"], 5 * grad.T @ grad, **F64)


# ---------------------------------------------------------------------------------------------- behaviour
def test_inverse_every_reuses_the_eigendecomposition():
    """Between refreshes step() uses the old eigendecompositions (not the moved factors); at the refresh
    the new ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    kfac = convzoo.KFAC(model, inverse_every=2, beta=0.0, damping=(0.1, 0.1), damping_split="none")
    xs = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    results = []
    for x in xs:
        model.zero_grad()
        model(x).square().sum().backward()
        kfac.step()
        results.append(model[0].weight.grad.clone())
    for i, x in enumerate(xs):  # the same steps with a fresh KFAC each time: the step's own factors
        fresh_model = nn.Sequential(nn.Linear(3, 2)).double()
        fresh_model.load_state_dict(model.state_dict())
        fresh = convzoo.KFAC(fresh_model, beta=0.0, damping=(0.1, 0.1), damping_split="none")
        fresh_model(x).square().sum().backward()
        fresh.step()
        if i != 1:  # steps 0 and 2 refresh
            torch.testing.assert_close(results[i], fresh_model[0].weight.grad, **F64)
        else:
            assert not torch.allclose(results[i], fresh_model[0].weight.grad)
    assert kfac.steps == 3


def test_kl_clip_scales_as_kfac_pytorch():
    """``ν = min(1, sqrt(c / |Σ v·g·lr²|))`` over all layers' preconditioned ``v`` and raw ``g``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(9, 2)).double()
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    plain = convzoo.KFAC(model, beta=0.0)
    model(x).square().sum().backward()
    raw = [p.grad.clone() for p in model.parameters()]
    plain.step()
    v = [p.grad.clone() for p in model.parameters()]
    plain.remove()
    vg = sum((a * b).sum() for a, b in zip(v, raw)) * 0.1 ** 2
    for clip in (vg.item() / 4, vg.item() * 4):
        kfac = convzoo.KFAC(model, beta=0.0, kl_clip=clip, lr=0.1)
        model.zero_grad()
        model(x).square().sum().backward()
        kfac.step()
        kfac.remove()
        nu = min(1.0, math.sqrt(clip / abs(vg.item())))
        for p, expected in zip(model.parameters(), v):
            torch.testing.assert_close(p.grad, nu * expected, **F64)


@pytest.mark.parametrize("ekfac", [False, True], ids=["kfac", "ekfac"])
def test_state_dict_round_trip_resumes_identically(tmp_path, ekfac):
    def run(steps, kfac=None, model=None):
        for i in steps:
            gen = torch.Generator().manual_seed(i)
            model.zero_grad()
            F.cross_entropy(model(torch.randn(4, 2, 5, 5, generator=gen)), torch.randint(0, 3, (4,),
                                                                                         generator=gen)).backward()
            kfac.step()
        return [p.grad.clone() for p in model.parameters()]

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, groups=1), nn.Flatten(), nn.Linear(27, 3))
        return model, convzoo.KFAC(model, inverse_every=3, beta=0.5, ekfac=ekfac)

    model, kfac = make()
    whole = run(range(5), kfac, model)
    model2, kfac2 = make()
    run(range(4), kfac2, model2)
    torch.save(kfac2.state_dict(), tmp_path / "k.pt")
    model3, kfac3 = make()
    model3.load_state_dict(model2.state_dict())
    kfac3.load_state_dict(torch.load(tmp_path / "k.pt"))
    resumed = run([4], kfac3, model3)
    for a, b in zip(whole, resumed):
        torch.testing.assert_close(a, b)
    assert set(kfac3.corrected_eigenvalues) == ({"0", "2"} if ekfac else set())
    with pytest.raises(ValueError, match=r"KFAC\.state_dict"):
        kfac3.load_state_dict({"factors": {}})


def test_empty_batch_leaves_every_factor_unchanged():
    """N = 0 (it used to shrink A by beta) — A and G of conv, transposed conv and linear layers."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ConvTranspose2d(3, 2, 2), nn.Flatten(),
                          nn.Linear(2 * 6 * 6, 2))
    kfac = KFACFactors(model, beta=0.5, gradients=True)
    model(torch.randn(2, 2, 5, 5)).sum().backward()
    before = {k: v.clone() for d in (kfac.input_factors, kfac.gradient_factors) for k, v in
              [(f"{id(d)}{n}", t) for n, t in d.items()]}
    model(torch.randn(0, 2, 5, 5)).sum().backward()
    after = {k: v for d in (kfac.input_factors, kfac.gradient_factors) for k, v in
             [(f"{id(d)}{n}", t) for n, t in d.items()]}
    for k in before:
        assert torch.equal(before[k], after[k]), k
    fresh = KFACFactors(model, beta=0.5, gradients=True)
    model(torch.randn(0, 2, 5, 5)).sum().backward()
    assert not any(fresh.started(n) for n in fresh.factors)  # an empty batch does not start the average


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations_give_fp32_factors(dtype):
    """bf16 / fp16 layers: fp32 factors, close to the fp64 brute force of the same (rounded) tensors."""
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 4, 3, padding=1, groups=2).to(dtype)
    kfac = KFACFactors(nn.Sequential(layer), beta=0.0, gradients=True, scale="curvlinops")
    x = torch.randn(3, 2, 5, 5).to(dtype)
    out = layer(x)
    r = torch.randn(out.shape).to(dtype)
    (out * r).sum().backward()
    a, g, _ = _reference(layer, x, out, r, "expand")
    assert kfac.input_factors["0"].dtype == kfac.gradient_factors["0"].dtype == torch.float32
    torch.testing.assert_close(kfac.input_factors["0"].double(), a, atol=2e-2, rtol=2e-2)  # bf16 products summed
    torch.testing.assert_close(kfac.gradient_factors["0"].double(), g, atol=2e-2, rtol=2e-2)


def test_channels_last_input_that_requires_grad():
    """A channels-last input that requires grad (an adversarial example's backward, a layer inside a model):
    the same factors as a contiguous detached input, and the input's gradient unchanged by the hooks."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1, stride=2).double()
    ref = KFACFactors(layer, beta=0.0, gradients=True)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    r = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    (layer(x) * r).sum().backward()
    ref.remove()
    a0, g0 = ref[""].clone(), ref.gradient_factors[""].clone()
    kfac = KFACFactors(layer, beta=0.0, gradients=True)
    xc = x.to(memory_format=torch.channels_last).requires_grad_()
    (layer(xc) * r.to(memory_format=torch.channels_last)).sum().backward()
    torch.testing.assert_close(kfac[""], a0, **F64)
    torch.testing.assert_close(kfac.gradient_factors[""], g0, **F64)
    expected = torch.nn.grad.conv2d_input(x.shape, layer.weight, r, stride=2, padding=1)
    torch.testing.assert_close(xc.grad, expected, **F64)


def test_inplace_activation_after_the_layer():
    """``ReLU(inplace=True)`` right after a conv: G is the gradient of the conv's output (before the ReLU)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(inplace=True)).double()
    kfac = KFACFactors(model, beta=0.0, gradients=True)
    x = torch.randn(2, 2, 6, dtype=torch.float64)
    out = model(x)
    r = torch.randn(out.shape, dtype=torch.float64)
    (out * r).sum().backward()
    g = r * (out > 0)
    expected = 2 * torch.einsum("nil,njl->ij", g, g)
    torch.testing.assert_close(kfac.gradient_factors["0"][0], expected, **F64)


def test_unbatched_and_no_grad_forwards():
    """An unbatched forward is one sample (G = 1·Σ g gᵀ); a forward under no_grad updates A only."""
    layer = nn.Linear(3, 2).double()
    kfac = KFACFactors(layer, beta=0.0, gradients=True)
    x = torch.randn(3, dtype=torch.float64)
    r = torch.randn(2, dtype=torch.float64)
    (layer(x) * r).sum().backward()
    torch.testing.assert_close(kfac.gradient_factors[""], torch.outer(r, r), **F64)
    g_before = kfac.gradient_factors[""].clone()
    with torch.no_grad():
        layer(2 * torch.randn(4, 3, dtype=torch.float64))
    assert torch.equal(kfac.gradient_factors[""], g_before)


# autograd.grad inside the compiled step needs trace_autograd_ops; H != W, and no duck sizing either
@torch._dynamo.config.patch(trace_autograd_ops=True)
@torch.fx.experimental._config.patch(use_duck_shape=False)
@pytest.mark.slow  # ~10 s: two compiles
def test_compiled_training_step_with_gradient_factors():
    """A fullgraph, dynamic compiled step (forward with A hooks, backward with G hooks, SGD update) over two
    batch sizes: the eager run's A and G, with the one recompile of the first update. torch 2.11's Dynamo fails
    on the output's tensor hook with dynamic shapes ("autograd_function_apply referenced nonexistent value"): there
    the step compiles static (one more graph for the new batch size)."""
    dynamic = torch.__version__ >= "2.12"
    eager, eager_losses, _ = _train((2, 2, 3), compiled=False, gradients=True, dynamic=dynamic)
    comp, comp_losses, frames = _train((2, 2, 3), compiled=True, gradients=True, dynamic=dynamic)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.stack(comp_losses), torch.stack(eager_losses))
    for name in eager.factors:
        assert comp.gradient_factors[name].abs().sum() > 0
        torch.testing.assert_close(comp.gradient_factors[name], eager.gradient_factors[name], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(comp.input_factors[name], eager.input_factors[name], atol=1e-5, rtol=1e-5)
    assert frames == (2 if dynamic else 3)


def test_kfac_trains_with_any_optimizer():
    """Smoke of the documented loop with Adam after KFAC: finite loss that goes down on a fixed batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    kfac = convzoo.KFAC(model, inverse_every=2)
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        kfac.step()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"damping": 0.0}, ValueError, "damping must be > 0"),
    ({"damping": -1.0}, ValueError, "damping must be > 0"),
    ({"damping": "1"}, TypeError, "damping must be a real number"),
    ({"damping": (1e-3, 1e-3)}, ValueError, "needs damping_split='none'"),
    ({"damping": (1e-3,), "damping_split": "none"}, ValueError, "damping must be a number or a pair"),
    ({"damping": (1e-3, -1.0), "damping_split": "none"}, ValueError, r"damping\[1\] must be ≥ 0"),
    ({"damping_split": "sqrt"}, ValueError, "damping_split must be one of"),
    ({"inverse_every": 0}, ValueError, "inverse_every must be ≥ 1"),
    ({"inverse_every": 2.0}, TypeError, "inverse_every must be an int"),
    ({"kl_clip": 1e-3}, ValueError, "kl_clip needs lr"),
    ({"kl_clip": -1.0, "lr": 0.1}, ValueError, "kl_clip must be > 0"),
    ({"fisher": "type2"}, ValueError, "fisher must be one of"),
    ({"loss": "nll"}, ValueError, "loss must be one of"),
    ({"mode": "diag"}, ValueError, "mode must be one of"),
    ({"beta": 2.0}, ValueError, "beta must be in"),
    ({"inverse_dtype": torch.float16}, TypeError, "inverse_dtype must be"),
    ({"generator": 3}, TypeError, "generator must be a torch.Generator"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        convzoo.KFAC(nn.Sequential(nn.Linear(2, 2)), **kwargs)


def test_factors_bad_arguments():
    with pytest.raises(ValueError, match="scale must be one of"):
        KFACFactors(nn.Linear(2, 2), scale="einconv")
    with pytest.raises(TypeError, match="gradients must be a bool"):
        KFACFactors(nn.Linear(2, 2), gradients=1)
    kfac = convzoo.KFAC(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(RuntimeError, match="fisher='mc'"):
        kfac.mc_backward(torch.randn(2, 2, requires_grad=True))
    mc = convzoo.KFAC(nn.Sequential(nn.Linear(2, 2)), fisher="mc")
    with pytest.raises(ValueError, match="output must be"):
        mc.mc_backward(torch.randn(2, 2))


# ---------------------------------------------------------------------------------------------- A's CPU GEMM
@pytest.mark.parametrize("d", [5, 600], ids=["one_block", "triangle"])
@pytest.mark.parametrize("bias", [False, True])
def test_gram_into_is_the_blend_of_the_gram_matrix(d, bias):
    """``reference.gram_into`` (A's CPU GEMM: the bias row from row sums, the upper block-triangle from
    ``_TRIANGLE_ROWS`` rows on, mirrored) over 2 chunks: ``alpha·out + coef·[[PPᵀ, P1], [1ᵀPᵀ, m]]`` in fp64;
    ``alpha = 0`` ignores a NaN ``out``."""
    from convzoo import reference

    gen = torch.Generator().manual_seed(0)
    p = torch.randn(2, d, 7, generator=gen, dtype=torch.float64)
    full = torch.cat([p, p.new_ones(2, 1, 7)], 1) if bias else p
    gram = full @ full.transpose(1, 2)
    prior = torch.randn(gram.shape, generator=gen, dtype=torch.float64)
    out = reference.gram_into(prior.clone(), [p[..., :4], p[..., 4:]], bias, 0.25, 0.5)
    torch.testing.assert_close(out, 0.25 * prior + 0.5 * gram, **F64)
    nan = torch.full(gram.shape, float("nan"), dtype=torch.float64)
    torch.testing.assert_close(reference.gram_into(nan, [p], bias, 0.0, 2.0), 2 * gram, **F64)


def test_patch_covariance_with_many_rows_matches_unfold():
    """A layer with ``C·k² ≥ _TRIANGLE_ROWS`` through the public op (chunked CPU path and its mirror), bias."""
    from test_curvature import _factor

    torch.manual_seed(0)
    layer = nn.Conv2d(64, 2, 3, padding=1).double()
    kfac = KFACFactors(layer, beta=0.0)
    x = torch.randn(2, 64, 4, 5, dtype=torch.float64)
    layer(x)
    torch.testing.assert_close(kfac[""], _factor(layer, x, "expand", True), **F64)


# ---------------------------------------------------------------------------------------------- EKFAC
@needs_curvlinops
def test_ekfac_matches_curvlinops():
    """``ekfac=True``: the first step (no corrected eigenvalues yet) computes the eigenbases; the backward after it
    (the same batch, weights unchanged) collects ``s``, which equals curvlinops' ``EKFACLinearOperator``
    corrected eigenvalues, and the second step equals ``KFACInverseLinearOperator(EKFACLinearOperator, damping)``
    applied to the gradient (fp64; Linear and Conv2d)."""
    model = _cl_model()
    x, y = _cl_data()
    params = list(model.parameters())
    kfac = convzoo.KFAC(model, beta=0.0, damping=1e-2, ekfac=True, inverse_every=100)
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in params]
        kfac.step()
    kfac.remove()
    op = curvlinops.EKFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type="empirical",
                                        separate_weight_and_bias=False, check_deterministic=False)
    op.compute_eigenvalue_correction()
    assert set(kfac.corrected_eigenvalues) == set(op._corrected_eigenvalues)
    for name, s in kfac.corrected_eigenvalues.items():
        want = op._corrected_eigenvalues[name]
        if isinstance(want, dict):  # a layer without bias: one entry per parameter, the weight's alone
            (want,) = want.values()
        torch.testing.assert_close(s.squeeze(0), want, **F64)
    inverse = curvlinops.KFACInverseLinearOperator(op, damping=1e-2, use_exact_damping=True)  # EKFAC: (s + λ)⁻¹
    for p, expected in zip(params, inverse @ grads):
        torch.testing.assert_close(p.grad, expected, **F64)


@pytest.mark.parametrize("case", LAYERS, ids=[c[0] for c in LAYERS])
def test_ekfac_step_is_the_corrected_solve(case):
    """Every layer kind: after an eigendecomposition, ``s = Σ_n (Q_Gᵀ dW_n Q_A)² · N`` from brute-force
    per-sample gradients (unfoldNd patches), and ``step()`` = ``Q_G [(Q_Gᵀ M Q_A) / (s + λ)] Q_Aᵀ``."""
    _, make, shape, kwargs = case
    layer = make().double()
    kfac = convzoo.KFAC(nn.Sequential(layer), beta=0.0, damping=0.1, ekfac=True, inverse_every=100)
    _run(layer, shape, kwargs)
    kfac.step()
    layer.zero_grad()
    batch = _run(layer, shape, kwargs)
    q_a, _, q_g, _ = kfac._eigen["0"]
    pe, ge, n, _ = _rows(layer, *batch, "expand", kwargs.get("output_size"))
    positions = pe.shape[1] // n
    pn = pe.view(pe.shape[0], n, positions, -1)
    gn = ge.view(ge.shape[0], n, positions, -1)
    per_sample = torch.einsum("gnli,gnlj->gnij", gn, pn)  # [G, N, C', D]
    s = n * (q_g.transpose(1, 2)[:, None] @ per_sample @ q_a[:, None]).square().sum(1)
    torch.testing.assert_close(kfac.corrected_eigenvalues["0"].reshape(s.shape), s, **F64)
    _, _, m = _reference(layer, *batch, "expand", kwargs.get("output_size"))
    expected = q_g @ ((q_g.transpose(1, 2) @ m @ q_a) / (s + 0.1)) @ q_a.transpose(1, 2)
    kfac.step()
    torch.testing.assert_close(kfac._grad_matrix(layer), expected, **F64)


@pytest.mark.parametrize("kwargs, match", [
    ({"damping": (1e-3, 1e-3), "damping_split": "none"}, "ekfac=True takes one damping"),
    ({"inverse_every": 1}, "inverse_every ≥ 2"),
    ({"group_reduction": "mean"}, "group_reduction='blocks'"),
])
def test_ekfac_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        convzoo.KFAC(nn.Sequential(nn.Linear(2, 2)), ekfac=True, **kwargs)
    with pytest.raises(TypeError, match="ekfac must be a bool"):
        convzoo.KFAC(nn.Sequential(nn.Linear(2, 2)), ekfac=1)
