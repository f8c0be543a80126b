"""ekfac_eigenvalues (EKFAC's eigenvalue correction): against a brute-force reference built from explicit per-sample
weight gradients (torch autograd of the layer, one sample at a time: independent of convzoo) for Conv1d/2d/3d,
ConvTranspose1d/2d/3d, groups, dilation, stride, padding and padding modes, bias on and off, and Linear; against
curvlinops' ``EKFACLinearOperator`` corrected eigenvalues (Linear, Conv2d, fp64, a mean-reduced loss); the
kernel's tiles and splits against the CPU path; opcheck, torch.compile, bad input, empty and odd inputs."""

import math

import pytest
import torch
import torch._dynamo.testing
from problems import TOL
from torch import nn

import convzoo.functional as cf
from convzoo import autotune, reference
from convzoo.kernels import ekfac as ekfac_kernels

# id: (layer constructor, input shape, functional geometry kwargs)
CONV_CASES = {
    "1d_K3_S2_P1_bias": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9), {}),
    "1d_K4_D2_G2_same_lohi_nobias": (lambda: nn.Conv1d(4, 4, 4, dilation=1, groups=2, padding="same", bias=False),
                                     (2, 4, 11), {}),
    "1d_K3_D2_valid": (lambda: nn.Conv1d(2, 3, 3, dilation=2), (2, 2, 11), {}),
    "2d_K3_S2_P1_G2": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 7, 6), {}),
    "2d_K2x3_D2x1_depthwise_nobias": (lambda: nn.Conv2d(3, 6, (2, 3), dilation=(2, 1), groups=3, bias=False),
                                      (2, 3, 6, 7), {}),
    "2d_K3_same_reflect": (lambda: nn.Conv2d(3, 5, 3, padding="same", padding_mode="reflect"), (2, 3, 5, 6), {}),
    "2d_K3_S2_P2_circular": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=2, padding_mode="circular"),
                             (1, 2, 5, 5), {}),
    "2d_K1_S3_replicate_G2": (lambda: nn.Conv2d(2, 4, 1, stride=3, padding=1, padding_mode="replicate", groups=2),
                              (2, 2, 7, 4), {}),
    "3d_K3_S2_P1_G2": (lambda: nn.Conv3d(4, 2, 3, stride=2, padding=1, groups=2), (2, 4, 5, 4, 5), {}),
    "3d_K2x1x3_nobias": (lambda: nn.Conv3d(2, 3, (2, 1, 3), padding=(1, 0, 1), bias=False), (1, 2, 3, 4, 5), {}),
}
SMALL = ["1d_K3_S2_P1_bias", "2d_K3_S2_P1_G2", "3d_K3_S2_P1_G2"]
TRANSPOSED_CASES = {
    "T1d_K3_S2_P1_OP1_G2": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
                            (2, 4, 5)),
    "T2d_K2x3_S2x1_D1x2_nobias": (lambda: nn.ConvTranspose2d(3, 4, (2, 3), stride=(2, 1), padding=(0, 1),
                                                             output_padding=(1, 0), dilation=(1, 2), bias=False),
                                  (2, 3, 4, 3)),
    "T3d_K3_S2_P1_G2": (lambda: nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1, groups=2), (1, 4, 3, 2, 3)),
}


def _bases(groups, dp, co, dtype, device="cpu"):
    """Random orthogonal Q_A [G, dp, dp] and Q_G [G, co, co] (any orthogonal basis is an eigenbasis of something)."""
    q_a = torch.linalg.qr(torch.randn(groups, dp, dp, dtype=torch.float64)).Q
    q_g = torch.linalg.qr(torch.randn(groups, co, co, dtype=torch.float64)).Q
    return q_a.to(device, dtype), q_g.to(device, dtype)


def _per_sample_blocks(layer, x, grad):
    """[N, G, C_out/G, D (+1)]: each sample's weight (and bias) gradient, from autograd of the layer itself, in
    KFACFactors' layout (a conv's weight [C_out, C_in/G, *K] per group; a transposed conv's [C_in, C_out/G, *K]
    as [C_out/G, C_in/G·∏K]; the bias as the last column)."""
    transposed = isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    groups = getattr(layer, "groups", 1)
    out = []
    for n in range(x.shape[0]):
        params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
        y = layer(x[n:n + 1])
        gw, *gb = torch.autograd.grad(y, params, grad[n:n + 1])
        if isinstance(layer, nn.Linear):
            blocks = gw[None]
        elif transposed:
            cig = gw.shape[0] // groups
            blocks = gw.unflatten(0, (groups, cig)).flatten(3).permute(0, 2, 1, 3).flatten(2)
        else:
            blocks = gw.reshape(groups, gw.shape[0] // groups, -1)
        if gb:
            blocks = torch.cat([blocks, gb[0].reshape(groups, -1, 1)], 2)
        out.append(blocks)
    return torch.stack(out)


def _brute(layer, x, grad, q_a, q_g, scale=1.0):
    """scale · Σ_n (Q_Gᵀ dW_n Q_A)², from the explicit per-sample gradients (float64)."""
    dw = _per_sample_blocks(layer, x, grad)
    rotated = q_g.transpose(1, 2)[None] @ dw @ q_a[None]
    return rotated.square().sum(0) * scale


def _close(got, want, dtype):
    rtol, atol = TOL[dtype]
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * max(1.0, scale))


def _dtype(path):
    """fp64 on the CPU path, fp32 on the kernel (the interpreter's fp64 is a broadcast-sum: slower)."""
    return torch.float32 if path != "cpu" or autotune.interpret_mode() else torch.float64


def _layer_case(make, shape, dtype):
    layer = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    grad = torch.randn_like(y)
    return layer, x, grad


# ---------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("key", list(CONV_CASES))
def test_conv_matches_per_sample_gradients(key, path):
    make, shape, extra = CONV_CASES[key]
    dtype = _dtype(path)
    layer, x, grad = _layer_case(make, shape, dtype)
    bias = layer.bias is not None
    dp = layer.in_channels // layer.groups * math.prod(layer.kernel_size) + bias
    q_a, q_g = _bases(layer.groups, dp, layer.out_channels // layer.groups, torch.float64)
    want = _brute(layer, x, grad, q_a, q_g, scale=0.5)
    padding = extra.get("padding", layer.padding if layer.padding != "same" else "same")
    got = cf.ekfac_eigenvalues(x.to(path, dtype), grad.to(path, dtype), q_a.to(path, dtype), q_g.to(path, dtype),
                               layer.kernel_size, layer.stride, padding, layer.dilation, layer.groups, bias=bias,
                               scale=0.5, padding_mode=layer.padding_mode)
    assert got.dtype == dtype and got.shape == want.shape
    _close(got.cpu(), want, dtype)


@pytest.mark.parametrize("key", list(TRANSPOSED_CASES))
def test_transposed_matches_per_sample_gradients(key, path):
    make, shape = TRANSPOSED_CASES[key]
    dtype = _dtype(path)
    layer, x, grad = _layer_case(make, shape, dtype)
    bias = layer.bias is not None
    dp = layer.in_channels // layer.groups * math.prod(layer.kernel_size) + bias
    q_a, q_g = _bases(layer.groups, dp, layer.out_channels // layer.groups, torch.float64)
    want = _brute(layer, x, grad, q_a, q_g)
    got = cf.ekfac_eigenvalues(x.to(path, dtype), grad.to(path, dtype), q_a.to(path, dtype), q_g.to(path, dtype),
                               layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups,
                               bias=bias, scale=1.0, transposed=True, output_padding=layer.output_padding)
    _close(got.cpu(), want, dtype)


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 5), (2, 2, 3, 5), (5,)], ids=["N3", "N2_T4", "N2_2x3", "unbatched"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_per_sample_gradients(shape, bias, path):
    dtype = _dtype(path)
    layer = nn.Linear(5, 4, bias=bias).double()
    x = torch.randn(shape, dtype=torch.float64)
    grad = torch.randn(*shape[:-1], 4, dtype=torch.float64)
    xb, gb = (x[None], grad[None]) if x.dim() == 1 else (x, grad)
    q_a, q_g = (q[0] for q in _bases(1, 5 + bias, 4, torch.float64))
    want = _brute(layer, xb, gb, q_a[None], q_g[None])[0]
    got = cf.ekfac_eigenvalues(x.to(path, dtype), grad.to(path, dtype), q_a.to(path, dtype), q_g.to(path, dtype),
                               bias=bias, scale=1.0)
    assert got.shape == (4, 5 + bias)
    _close(got.cpu(), want, dtype)


def test_default_scale_is_the_batch_size(path):
    make, shape, _ = CONV_CASES["2d_K3_S2_P1_G2"]
    _, x, grad = _layer_case(make, shape, torch.float32)
    x, grad = x.float().to(path), grad.float().to(path)
    q_a, q_g = _bases(2, 19, 3, torch.float32, path)
    args = (x, grad, q_a, q_g, 3, 2, 1, 1, 2)
    _close(cf.ekfac_eigenvalues(*args, bias=True).cpu(),
           (x.shape[0] * cf.ekfac_eigenvalues(*args, bias=True, scale=1.0)).cpu().double(), torch.float32)


# ---------------------------------------------------------------------------------------------- curvlinops
def _grads_of_layers(model, loss_func, X, y):
    acts, grads = {}, {}

    def hook(module, inputs, output, name):
        acts[name] = inputs[0].detach()
        output.register_hook(lambda g: grads.__setitem__(name, g.detach()))

    handles = [m.register_forward_hook(lambda mod, i, o, name=name: hook(mod, i, o, name))
               for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    loss_func(model(X), y).backward()
    for h in handles:
        h.remove()
    return acts, grads


def test_matches_curvlinops_ekfac_for_a_mean_reduced_loss(path):
    """curvlinops' EKFACLinearOperator (fisher_type='empirical', separate_weight_and_bias=False, one batch,
    CrossEntropyLoss(reduction='mean')) stores Σ_n (Q_Gᵀ g_n aᵀ Q_A)² · N²/N_data with g the mean loss's output
    gradients: with N_data = N that is scale=N, the default. Its eigenbases are passed in; fp64."""
    curvlinops = pytest.importorskip("curvlinops")
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 5)).double()
    X, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    loss_func = nn.CrossEntropyLoss(reduction="mean")
    op = curvlinops.EKFACLinearOperator(model, loss_func, list(model.parameters()), [(X, y)],
                                        fisher_type="empirical", separate_weight_and_bias=False,
                                        check_deterministic=False)
    op.compute_eigenvalue_correction()
    want, q_as, q_gs = op._corrected_eigenvalues, op._input_covariances_eigenvectors, \
        op._gradient_covariances_eigenvectors
    acts, grads = _grads_of_layers(model, loss_func, X, y)
    conv = cf.ekfac_eigenvalues(acts["0"].to(path), grads["0"].to(path), q_as["0"][None].to(path),
                                q_gs["0"][None].to(path), 3, 2, 1, bias=True)
    torch.testing.assert_close(conv[0].cpu(), want["0"], rtol=1e-10, atol=1e-12)
    linear = cf.ekfac_eigenvalues(acts["3"].to(path), grads["3"].to(path), q_as["3"].to(path), q_gs["3"].to(path),
                                  bias=True)
    torch.testing.assert_close(linear.cpu(), want["3"], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("channels, kernel, splits", [(2, [3, 3], (1, 2, 4)), (6, [3, 3], (4,)), (20, [1, 3], (2,))],
                         ids=["CG2", "CG6", "CG20"])
def test_every_tile_and_split_of_the_kernel(channels, kernel, splits, kernel_device):
    """Partial tiles on every side (CG = 2: D' = 19 over BLOCK_J / BLOCK_K 16, two tiles and two projection steps;
    C_out/G = 3 in BLOCK_O 16; L = 7·6 = 42 positions over BLOCK_L 16: three steps, the last partial), the split-N
    workspace (SPLIT 4 over 3 samples leaves a share empty), against the CPU path in fp64. The patch-row walk's
    three shapes: CG = 2 (8 taps of 2 channels per step), CG = 6 (two taps of 8 channels per step, 6 real, and
    the last step's second pair past the 9 taps), CG = 20 (a 1×3 kernel: one tap per step, its second channel
    block 4 of 16). Every split with the first walk, one with each other (each split runs the whole kernel)."""
    x = torch.randn(3, 2 * channels, 7, 12)
    grad = torch.randn(3, 6, 7, 6)
    q_a, q_g = _bases(2, math.prod(kernel) * channels + 1, 3, torch.float32)
    geom = (kernel, [1, 2], [kernel[0] // 2, kernel[0] // 2, 1, 1], [0, 0], [1, 1], "zeros", 2, False, True)
    want = reference.ekfac_eigenvalues(x.double(), grad.double(), q_a.double(), q_g.double(), *geom)
    for split in splits:
        cfg = autotune.Config({"BLOCK_J": 16, "BLOCK_O": 16, "BLOCK_L": 16, "BLOCK_K": 16, "SPLIT": split},
                              num_warps=4, num_stages=1)
        with autotune.force_config("ekfac", cfg):
            got = cf.ekfac_eigenvalues(x.to(kernel_device), grad.to(kernel_device), q_a.to(kernel_device),
                                       q_g.to(kernel_device), tuple(kernel), (1, 2), (kernel[0] // 2, 1), groups=2,
                                       bias=True, scale=1.0)
        _close(got.cpu(), want, torch.float32)


WALK_CASES = {
    # CG 16 in BLOCK_K 16: one tap per step, every channel block full (FULL_C: no channel mask)
    "one_tap_full_blocks": (16, [3, 3], [1, 1], "zeros"),
    # 25 taps of two channels per pair: the window walk with a tap per pair (8 pairs per step)
    "25_taps_pairs": (2, [5, 5], [2, 2], "zeros"),
    # 49 taps (> 31) and 'reflect': the per-step source computation instead
    "49_taps_computed": (2, [7, 7], [3, 3], "zeros"),
    "reflect_computed": (16, [3, 3], [1, 1], "reflect"),
}


@pytest.mark.parametrize("case", [pytest.param(k, marks=pytest.mark.slow_interpreted) if "computed" in k else k
                                  for k in sorted(WALK_CASES)])
def test_window_and_computed_walks(case, kernel_device):
    """Both patch-row walks of the kernel against the CPU path in fp64: the window walk (corners and tap bits per
    position step; one tap per step and several) and the per-step source computation; padding read by the border
    positions, two groups, 30 positions in two steps of 16 (the last partial)."""
    channels, kernel, padding, mode = WALK_CASES[case]
    x = torch.randn(2, 2 * channels, 5, 6)
    out = [n + 2 * p - k + 1 for n, p, k in zip((5, 6), padding, kernel)]
    grad = torch.randn(2, 6, *out)
    q_a, q_g = _bases(2, math.prod(kernel) * channels + 1, 3, torch.float32)
    flat = [v for p in padding for v in (p, p)]
    geom = (kernel, [1, 1], flat, [0, 0], [1, 1], mode, 2, False, True)
    want = reference.ekfac_eigenvalues(x.double(), grad.double(), q_a.double(), q_g.double(), *geom)
    assert ekfac_kernels._window_walk(0 if mode == "zeros" else 1, False, math.prod(kernel)) == (
        mode == "zeros" and math.prod(kernel) <= 31)
    cfg = autotune.Config({"BLOCK_J": 16, "BLOCK_O": 16, "BLOCK_L": 16, "BLOCK_K": 16, "SPLIT": 1}, num_warps=4,
                          num_stages=1)
    with autotune.force_config("ekfac", cfg):
        got = cf.ekfac_eigenvalues(x.to(kernel_device), grad.to(kernel_device), q_a.to(kernel_device),
                                   q_g.to(kernel_device), tuple(kernel), (1, 1), tuple(padding), padding_mode=mode,
                                   groups=2, bias=True, scale=1.0)
    _close(got.cpu(), want, torch.float32)


def test_walk_rows_reorders_q_a_for_the_walk():
    """The launcher's Q_A: row k·CG + c holds unfold row c·K + k, the bias row stays last, the columns are padded
    with zeros to whole BLOCK_J tiles."""
    cg, taps, bj = 3, 4, 16
    q_a = torch.randn(2, cg * taps + 1, cg * taps + 1)
    got = ekfac_kernels._walk_rows(q_a, cg, taps, bj, torch.float64)
    assert got.shape == (2, 13, 16) and (got[:, :, 13:] == 0).all()
    for k in range(taps):
        for c in range(cg):
            assert torch.equal(got[:, k * cg + c, :13], q_a[:, c * taps + k].double())
    assert torch.equal(got[:, 12, :13], q_a[:, 12].double())


def test_padded_positions():
    """The projected gradients' positions: a multiple of 16 where it adds at most 1/8 (196 -> 208, 30 -> 32, 784
    stays), else as they are (a Linear layer's 1, 49, 42)."""
    got = [ekfac_kernels._padded_positions(v) for v in (196, 30, 784, 1, 49, 42, 128)]
    assert got == [208, 32, 784, 1, 49, 42, 128]


def test_dot_configs_have_tiles_of_at_least_16():
    from convzoo.kernels import ekfac as kernels

    dims = {"O": 64, "D": 577, "L": 196, "N": 32, "G": 1}
    configs = [*kernels._candidates(dims, torch.float16), kernels._default(dims, torch.float16, False)]
    assert configs
    for cfg in configs:
        assert min(cfg.meta[k] for k in ("BLOCK_J", "BLOCK_O", "BLOCK_L", "BLOCK_K")) >= 16, cfg
        assert all(v & (v - 1) == 0 for v in cfg.meta.values()), cfg


def test_cpu_path_chunks_give_the_same_statistic(monkeypatch):
    make, shape, _ = CONV_CASES["2d_K3_S2_P1_G2"]
    layer, x, grad = _layer_case(make, (5, *shape[1:]), torch.float64)
    q_a, q_g = _bases(2, 19, 3, torch.float64)
    geom = ([3, 3], [2, 2], [1, 1, 1, 1], [0, 0], [1, 1], "zeros", 2, False, True)
    whole = reference.ekfac_eigenvalues(x, grad, q_a, q_g, *geom)
    monkeypatch.setattr(reference, "_CHUNK_BYTES", 1)  # one sample per chunk
    torch.testing.assert_close(reference.ekfac_eigenvalues(x, grad, q_a, q_g, *geom), whole)
    torch.testing.assert_close(whole, _brute(layer, x, grad, q_a, q_g))


# ---------------------------------------------------------------------------------------------- the op
def test_opcheck(path):
    x, grad = torch.randn(2, 4, 6, 5, device=path), torch.randn(2, 6, 3, 3, device=path)
    q_a, q_g = _bases(2, 19, 3, torch.float32, path)
    args = (x, grad, q_a, q_g, [3, 3], [2, 2], [1, 1, 1, 1], [0, 0], [1, 1], "zeros", 2, False, True, True, 0.5)
    torch.library.opcheck(torch.ops.convzoo.ekfac_eigenvalues, args)
    xt = torch.randn(2, 4, 3, 2, device=path)
    gt = torch.randn(2, 6, 5, 3, device=path)
    targs = (xt, gt, q_a, q_g, [3, 3], [2, 2], [1, 1], [0, 0], [1, 1], "zeros", 2, True, True, False, 1.0)
    torch.library.opcheck(torch.ops.convzoo.ekfac_eigenvalues, targs)


@torch.fx.experimental._config.patch(use_duck_shape=False)
@torch._dynamo.config.patch(error_on_recompile=True)
def test_compile_fullgraph_dynamic_no_recompile(kernel_device):
    """torch.compile(fullgraph=True, dynamic=True) of the functional call: one graph for every batch and image
    size (the default scale N is applied in the op, not baked into the graph)."""
    torch._dynamo.reset()
    q_a, q_g = _bases(2, 19, 3, torch.float32, kernel_device)
    ql_a, ql_g = (q[0] for q in _bases(1, 6, 4, torch.float32, kernel_device))

    def f(x, grad, xl, gl):  # a conv's and a Linear's statistic
        return (cf.ekfac_eigenvalues(x, grad, q_a, q_g, 3, 2, 1, groups=2, bias=True) * 2,
                cf.ekfac_eigenvalues(xl, gl, ql_a, ql_g, bias=True))

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    for shape, out, positions in [((2, 4, 6, 7), (3, 4), 3), ((3, 4, 5, 9), (3, 5), 2)]:
        x = torch.randn(shape, device=kernel_device)
        grad = torch.randn(shape[0], 6, *out, device=kernel_device)
        xl, gl = torch.randn(shape[0], positions, 5, device=kernel_device), torch.randn(shape[0], positions, 4,
                                                                                          device=kernel_device)
        torch.testing.assert_close(compiled(x, grad, xl, gl), f(x, grad, xl, gl))
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_not_differentiable_and_says_so(kernel_device):
    x, grad = torch.randn(2, 3, 5, 5, device=kernel_device), torch.randn(2, 2, 3, 3, device=kernel_device)
    q_a, q_g = _bases(1, 27, 2, torch.float32, kernel_device)
    for i, name in enumerate(("input", "grad_output", "q_a", "q_g")):
        args = [x, grad, q_a, q_g]
        args[i] = args[i].clone().requires_grad_()
        with pytest.raises(ValueError, match=f"{name} requires grad.*detach"):
            cf.ekfac_eigenvalues(*args, 3)
    with pytest.raises(RuntimeError, match="tangent"):
        torch.func.jvp(lambda t: cf.ekfac_eigenvalues(t, grad, q_a, q_g, 3), (x,), (torch.ones_like(x),))
    with torch.no_grad():
        assert cf.ekfac_eigenvalues(x.requires_grad_(), grad, q_a, q_g, 3).shape == (1, 2, 27)


# ---------------------------------------------------------------------------------------------- odd inputs
def test_empty_batch_and_empty_channels(path):
    q_a, q_g = _bases(2, 19, 3, torch.float32, path)
    empty = cf.ekfac_eigenvalues(torch.randn(0, 4, 5, 5, device=path), torch.randn(0, 6, 3, 3, device=path), q_a, q_g,
                                 3, groups=2, bias=True)
    assert empty.shape == (2, 3, 19) and not empty.any()
    linear = cf.ekfac_eigenvalues(torch.randn(0, 5, device=path), torch.randn(0, 4, device=path),
                                  *(q[0] for q in _bases(1, 5, 4, torch.float32, path)))
    assert linear.shape == (4, 5) and not linear.any()
    no_out = cf.ekfac_eigenvalues(torch.randn(2, 4, 5, 5, device=path), torch.randn(2, 0, 3, 3, device=path), q_a,
                                  q_g[:, :0, :0], 3, groups=2, bias=True)
    assert no_out.shape == (2, 0, 19)


def test_meta_tensors_give_the_shape_and_dtype():
    x = torch.empty(2, 4, 6, 6, device="meta", dtype=torch.float16)
    grad = torch.empty(2, 6, 4, 4, device="meta", dtype=torch.float16)
    q_a, q_g = torch.empty(2, 19, 19, device="meta"), torch.empty(2, 3, 3, device="meta")
    out = cf.ekfac_eigenvalues(x, grad, q_a, q_g, 3, groups=2, bias=True)
    assert out.shape == (2, 3, 19) and out.dtype == torch.float32 and out.is_meta


def test_unbatched_channels_last_and_strided_inputs(path):
    dtype = _dtype(path)
    x = torch.randn(2, 3, 6, 5, device=path, dtype=dtype)
    grad = torch.randn(2, 4, 6, 5, device=path, dtype=dtype)
    q_a, q_g = _bases(1, 28, 4, dtype, path)
    want = cf.ekfac_eigenvalues(x, grad, q_a, q_g, 3, padding=1, bias=True)
    strided_grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
    got = cf.ekfac_eigenvalues(x.to(memory_format=torch.channels_last), strided_grad,
                               q_a.transpose(1, 2).contiguous().transpose(1, 2), q_g, 3, padding=1, bias=True)
    _close(got.cpu(), want.cpu().double(), dtype)
    one = cf.ekfac_eigenvalues(x[0], grad[0], q_a, q_g, (3, 3), padding=1, bias=True)
    _close(one.cpu(), cf.ekfac_eigenvalues(x[:1], grad[:1], q_a, q_g, 3, padding=1, bias=True).cpu().double(), dtype)


def test_nan_and_inf_propagate(path):
    x, grad = torch.randn(2, 3, 5, 5, device=path), torch.randn(2, 2, 3, 3, device=path)
    q_a, q_g = _bases(1, 27, 2, torch.float32, path)
    x[1, 0, 2, 2] = float("nan")
    out = cf.ekfac_eigenvalues(x, grad, q_a, q_g, 3, scale=1.0)
    assert out.isnan().any()
    grad[0, 0, 0, 0] = float("inf")
    assert not cf.ekfac_eigenvalues(x[:1], grad[:1], q_a, q_g, 3, scale=1.0).isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype, path):
    """fp16/bf16 activations and gradients: an fp32 statistic. The CPU path upcasts; the kernel (CUDA only: the
    interpreter has no bf16 arithmetic) feeds 16-bit operands (Q_A and the projections rounded) to fp32 dots."""
    if autotune.interpret_mode():
        pytest.skip("16-bit kernel arithmetic runs on a GPU only")
    layer, x, grad = _layer_case(CONV_CASES["2d_K3_S2_P1_G2"][0], (2, 4, 7, 6), torch.float64)
    xl, gl = x.to(dtype), grad.to(dtype)
    q_a, q_g = _bases(2, 19, 3, torch.float64)
    got = cf.ekfac_eigenvalues(xl.to(path), gl.to(path), q_a.float().to(path), q_g.float().to(path), 3, 2, 1,
                               groups=2, bias=True, scale=1.0)
    assert got.dtype == torch.float32
    want = _brute(layer, xl.double(), gl.double(), q_a, q_g)
    # the CPU path is exact up to fp32 summation; the kernel rounds its operands to 16 bits
    _close(got.cpu(), want, dtype if torch.device(path).type == "cuda" else torch.float32)


def test_autocast_and_mixed_dtypes_keep_the_fp32_statistic(path):
    """Under autocast the op's matmuls are not lowered to bf16 (a custom op is not autocast-aware); an fp16
    grad_output with an fp32 input (what autocast's backward gives) is upcast, not the input downcast."""
    x, grad = torch.randn(2, 4, 7, 6, device=path), torch.randn(2, 6, 7, 6, device=path)
    q_a, q_g = _bases(2, 19, 3, torch.float32, path)
    args = (3, 1, 1, 1, 2)
    want = cf.ekfac_eigenvalues(x.double(), grad.double(), q_a.double(), q_g.double(), *args, bias=True)
    with torch.autocast(torch.device(path).type, dtype=torch.bfloat16):
        got = cf.ekfac_eigenvalues(x, grad, q_a, q_g, *args, bias=True)
    assert got.dtype == torch.float32
    _close(got.cpu(), want.cpu(), torch.float32)
    half = grad.half()
    want = cf.ekfac_eigenvalues(x.double(), half.double(), q_a.double(), q_g.double(), *args, bias=True)
    _close(cf.ekfac_eigenvalues(x, half, q_a, q_g, *args, bias=True).cpu(), want.cpu(), torch.float32)


_Q2 = torch.eye(19).expand(2, 19, 19)
_G2 = torch.eye(3).expand(2, 3, 3)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"input": torch.zeros(2, 4, 5, 5, dtype=torch.int64)}, TypeError, "input must have a floating dtype"),
    ({"grad_output": [1.0]}, TypeError, "grad_output must be a torch.Tensor"),
    ({"q_a": torch.eye(19, dtype=torch.int32)}, TypeError, "q_a must have a floating dtype"),
    ({"bias": 1}, TypeError, "bias must be a bool"),
    ({"scale": "1"}, TypeError, "scale must be a real number"),
    ({"scale": float("inf")}, ValueError, "scale must be finite"),
    ({"groups": 3}, ValueError, "groups=3 must divide the input channels"),
    ({"grad_output": torch.randn(2, 6, 4, 3)}, ValueError, r"grad_output must be \[N, C_out, \*out\]"),
    ({"grad_output": torch.randn(3, 6, 3, 3)}, ValueError, r"grad_output must be \[N, C_out, \*out\]"),
    ({"grad_output": torch.randn(2, 5, 3, 3)}, ValueError, "must divide the output channels C_out=5"),
    ({"q_a": torch.eye(18).expand(2, 18, 18)}, ValueError, r"q_a must be \[G, C_in/G\*prod\(kernel_size\)"),
    ({"q_a": torch.eye(19)}, ValueError, "q_a must be"),
    ({"q_g": torch.eye(6)}, ValueError, r"q_g must be \[G, C_out/G, C_out/G\]"),
    ({"kernel_size": 0}, ValueError, "kernel_size must be positive"),
    ({"padding_mode": "mirror"}, ValueError, "padding_mode must be one of"),
    ({"output_padding": 1}, ValueError, "output_padding=1 applies only with transposed=True"),
    ({"transposed": True, "padding_mode": "reflect"}, ValueError, "padding_mode must be 'zeros' with transposed"),
    ({"q_g": torch.eye(3, device="meta").expand(2, 3, 3)}, ValueError, "q_g must be on the input's device"),
])
def test_bad_input_names_the_argument(kwargs, exc, match):
    args = {"input": torch.randn(2, 4, 5, 5), "grad_output": torch.randn(2, 6, 3, 3), "q_a": _Q2, "q_g": _G2,
            "kernel_size": 3, "groups": 2, "bias": True}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        cf.ekfac_eigenvalues(**args)


@pytest.mark.parametrize("kwargs, match", [
    ({"stride": 2}, "stride=2 applies to a convolution only"),
    ({"groups": 2}, "groups=2 applies to a convolution only"),
    ({"transposed": True}, "transposed=True applies to a convolution only"),
    ({"grad_output": torch.randn(3, 2, 3)}, r"grad_output must be \[N, \*, out_features\]"),
    ({"grad_output": torch.randn(2, 5)}, r"grad_output must be \[N, \*, out_features\]"),
    ({"q_a": torch.eye(4)}, r"q_a must be \[in_features \(\+1 with bias\), same\] = \(5, 5\)"),
    ({"q_g": torch.eye(3)[None]}, r"q_g must be \[out_features, out_features\]"),
    ({"input": torch.randn(5), "grad_output": torch.randn(1, 3)}, r"grad_output must be \[out_features\]"),
    ({"input": torch.tensor(1.0)}, "got a scalar"),
])
def test_bad_linear_input_names_the_argument(kwargs, match):
    args = {"input": torch.randn(3, 5), "grad_output": torch.randn(3, 3), "q_a": torch.eye(5), "q_g": torch.eye(3)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cf.ekfac_eigenvalues(**args)


def test_kernel_module_is_registered():
    import convzoo.kernels
    from convzoo.ops._dispatch import _KERNEL_MARKERS
    from convzoo.tools import static_report

    assert "ekfac" in convzoo.kernels.MODULES and ("convzoo.kernels.ekfac", "ekfac_kernel") in _KERNEL_MARKERS
    assert "ekfac" in static_report.DOT_KERNELS
    convzoo.kernels.load_all()
    assert autotune.get_spec("ekfac").problem is not None


def test_fp32_bases_of_an_fp64_input_are_used_in_fp64():
    """fp32 bases for an fp64 input are used in fp64 (the accumulator dtype), not the other way round."""
    layer, x, grad = _layer_case(CONV_CASES["1d_K3_S2_P1_bias"][0], (2, 4, 9), torch.float64)
    q_a, q_g = _bases(1, 13, 6, torch.float64)
    got = cf.ekfac_eigenvalues(x, grad, q_a.float(), q_g.float(), 3, 2, 1, bias=True, scale=1.0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _brute(layer, x, grad, q_a.float().double(), q_g.float().double()))
