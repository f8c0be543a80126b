"""patch_covariance (the KFAC / KFC input factor): against the ground-truth formula built from an
independent unfold (unfoldNd, F.pad for the padding modes, unfoldNd's unfold_transposeNd) in float64, against
einconv's KFC and KFAC-reduce expressions, on both paths; the kernel's tiles and splits, the EMA/accumulate
path, opcheck, torch.compile, transforms, bad input, empty inputs and the memory of the CPU path."""

import math

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from einconv.expressions import convNd_kfac_reduce, convNd_kfc
from problems import TOL
from unfoldNd import unfold_transposeNd, unfoldNd

import convzoo.functional as cf
from convzoo import autotune, reference
from convzoo.kernels import patch_covariance as kernels
from convzoo.tools.bench.memory import peak_bytes

# id: (input shape, kernel_size, stride, padding, dilation, groups, padding_mode)
CASES = {
    "1d_K3_S2_P1": ((3, 4, 9), 3, 2, 1, 1, 1, "zeros"),
    "1d_K5_S3_D2_G2_lohi": ((2, 4, 17), 5, 3, [(2, 1)], 2, 2, "zeros"),
    "2d_K3_P1_G2": ((2, 4, 6, 7), 3, 1, 1, 1, 2, "zeros"),
    "2d_K2x3_S2x1_depthwise": ((2, 3, 7, 6), (2, 3), (2, 1), (1, 0), 1, 3, "zeros"),
    "2d_K3_same_reflect": ((2, 3, 5, 6), 3, 1, "same", 1, 1, "reflect"),
    "2d_K3_S2_P2_circular": ((1, 2, 5, 5), 3, 2, 2, 1, 1, "circular"),
    "2d_K1_S3_replicate": ((2, 2, 7, 4), 1, 3, 1, 1, 2, "replicate"),
    "2d_K3_S1_D2_valid": ((2, 2, 7, 7), 3, 1, "valid", 2, 1, "zeros"),
    "3d_K3_S2_P1_G2": ((2, 4, 5, 4, 5), 3, 2, 1, 1, 2, "zeros"),
    "3d_K2x1x3_replicate": ((1, 2, 3, 4, 5), (2, 1, 3), 1, (1, 0, 1), 1, 1, "replicate"),
}
SMALL = ["1d_K3_S2_P1", "2d_K3_P1_G2", "3d_K3_S2_P1_G2"]


def _case(key, device, dtype=torch.float32):
    shape, k, s, p, d, g, mode = CASES[key]
    return torch.randn(shape, device=device, dtype=dtype), {"kernel_size": k, "stride": s, "padding": p,
                                                           "dilation": d, "groups": g, "padding_mode": mode}


def _patches(x, kernel_size, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """[N, G, D, L] patches from unfoldNd of the padded input (float64): independent of convzoo."""
    nd = x.dim() - 2
    x = x.double()
    ks = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * nd
    dil = dilation if isinstance(dilation, tuple) else (dilation,) * nd
    if padding == "same":
        pairs = []
        for k, dd in zip(ks, dil):
            total = dd * (k - 1)
            pairs.append((total // 2, total - total // 2))
    elif padding == "valid":
        pairs = [(0, 0)] * nd
    elif isinstance(padding, list):
        pairs = padding
    else:
        pairs = [(p, p) for p in (padding if isinstance(padding, tuple) else (padding,) * nd)]
    flat = [v for lo, hi in reversed(pairs) for v in (lo, hi)]
    x = F.pad(x, flat, mode="constant" if padding_mode == "zeros" else padding_mode)
    p = unfoldNd(x, kernel_size, dilation=dilation, stride=stride)
    return p.unflatten(1, (groups, -1))


def _formula(p, mode="expand", bias=False, scale=None, mean=False):
    """The factor from [N, G, D, L] patches: einsum('ngil,ngjl->gij') / N (reduce: of the position means)."""
    n = p.shape[0]
    if mean:
        p = p.mean(1, keepdim=True)
    if bias:
        p = torch.cat([p, p.new_ones(*p.shape[:2], 1, p.shape[3])], 2)
    if mode == "reduce":
        p = p.mean(3, keepdim=True)
    f = torch.einsum("ngil,ngjl->gij", p, p) * (1 / n if scale is None else scale)
    return f[0] if mean else f


def _close(got, want, dtype):
    rtol, atol = TOL[dtype]
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * max(1.0, scale))


# ---------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("key", list(CASES))
@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_matches_the_formula(key, mode, path):
    dtype = torch.float32 if path != "cpu" or autotune.interpret_mode() else torch.float64
    x, geom = _case(key, path, dtype)
    got = cf.patch_covariance(x, **geom, mode=mode)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _close(got.cpu(), _formula(_patches(x.cpu(), **geom), mode), dtype)


@pytest.mark.parametrize("key", SMALL)
@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_bias_mean_and_scale(key, mode, path):
    x, geom = _case(key, path)
    p = _patches(x.cpu(), **geom)
    got = cf.patch_covariance(x, **geom, mode=mode, bias=True, group_reduction="mean", scale=0.3)
    _close(got.cpu(), _formula(p, mode, bias=True, scale=0.3, mean=True), torch.float32)
    assert got.shape == (p.shape[2] + 1,) * 2
    blocks = cf.patch_covariance(x, **geom, mode=mode, bias=True)
    _close(blocks.cpu(), _formula(p, mode, bias=True), torch.float32)
    # the bias corner: scale·N·L (expand), scale·N (reduce)
    corner = 1.0 if mode == "reduce" else p.shape[3]
    assert blocks[0, -1, -1].item() == pytest.approx(corner)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(dtype, path):
    """fp16/bf16 patches, fp32 factor: products of halves are exact in fp32, so only the summation order
    differs from the float64 formula of the same (rounded) input."""
    x, geom = _case("2d_K3_P1_G2", path, dtype)
    got = cf.patch_covariance(x, **geom, bias=True)
    assert got.dtype == torch.float32
    _close(got.cpu(), _formula(_patches(x.cpu(), **geom), bias=True), torch.float32)


@pytest.mark.parametrize("key", SMALL)
@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_equals_einconv(key, mode, path):
    """scale=None is einconv's normalisation of its KFC and KFAC-reduce factors (1/N)."""
    x, geom = _case(key, path)
    if isinstance(geom["padding"], list):
        pytest.skip("einconv takes symmetric padding only")
    expr = (convNd_kfc if mode == "expand" else convNd_kfac_reduce).einsum_expression
    args = {k: v for k, v in geom.items() if k != "padding_mode"}
    eq, ops, shape = expr(x.cpu().double(), **args)
    want = torch.einsum(eq, *ops).reshape(shape)
    _close(cf.patch_covariance(x, **geom, mode=mode).cpu(), want, torch.float32)


# id: (input shape, kernel_size, stride, padding, output_padding, dilation, groups)
TRANSPOSED = {
    "1d_K3_S2_P1_OP1": ((2, 4, 5), 3, 2, 1, 1, 1, 2),
    "2d_K2x3_S2x1_D1x2": ((2, 3, 4, 3), (2, 3), (2, 1), (0, 1), (1, 0), (1, 2), 1),
    "3d_K3_S2_P1_OP1_G2": ((1, 4, 3, 2, 3), 3, 2, 1, 1, 1, 2),
}


@pytest.mark.parametrize("key", list(TRANSPOSED))
@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_transposed_matches_the_formula(key, mode, path):
    shape, k, s, p, op, d, g = TRANSPOSED[key]
    x = torch.randn(shape, device=path)
    patches = unfold_transposeNd(x.cpu().double(), k, stride=s, padding=p, output_padding=op, dilation=d)
    patches = patches.unflatten(1, (g, -1))
    got = cf.patch_covariance(x, k, s, p, d, g, mode=mode, transposed=True, output_padding=op, bias=True)
    _close(got.cpu(), _formula(patches, mode, bias=True), torch.float32)


def test_every_tile_and_split_of_the_kernel(kernel_device):
    """Partial tiles (D = 18 + 1 over BLOCK_D 16: two tile rows), the mirrored store, and the split-M
    workspace (a share of the columns may be empty) all give the factor."""
    x, geom = _case("2d_K3_P1_G2", kernel_device)
    want = _formula(_patches(x.cpu(), **geom), bias=True)
    for split in (1, 2, 4):  # 6 column steps of 16: SPLIT 4 leaves the last share empty
        cfg = autotune.Config({"BLOCK_D": 16, "BLOCK_M": 16, "SPLIT": split}, num_warps=4, num_stages=1)
        with autotune.force_config("patch_covariance", cfg):
            _close(cf.patch_covariance(x, **geom, bias=True).cpu(), want, torch.float32)


# ---------------------------------------------------------------------------------------------- out= and beta=
@pytest.mark.parametrize("mode", ["expand", "reduce"])
@pytest.mark.parametrize("split", [1, 2])
def test_accumulate_and_moving_average_in_place(mode, split, path):
    x, geom = _case("2d_K3_P1_G2", path)
    new = _formula(_patches(x.cpu(), **geom), mode, bias=True).float()
    start = torch.randn(new.shape)
    cfg = autotune.Config({"BLOCK_D": 16, "BLOCK_M": 16, "SPLIT": split}, num_warps=4, num_stages=1)
    with autotune.force_config("patch_covariance", cfg):
        out = start.clone().to(path)
        assert cf.patch_covariance(x, **geom, mode=mode, bias=True, out=out) is out
        _close(out.cpu(), start.double() + new.double(), torch.float32)
        out = start.clone().to(path)
        cf.patch_covariance(x, **geom, mode=mode, bias=True, out=out, beta=0.9)
        _close(out.cpu(), 0.9 * start.double() + 0.1 * new.double(), torch.float32)
        out = torch.full(new.shape, float("nan"), device=path)  # beta = 0 overwrites without reading
        cf.patch_covariance(x, **geom, mode=mode, bias=True, out=out, beta=0)
        _close(out.cpu(), new.double(), torch.float32)
        # a strided buffer (a transposed view) and the [D, D] buffer of group_reduction='mean'
        out = start.clone().transpose(1, 2).to(path)
        cf.patch_covariance(x, **geom, mode=mode, bias=True, out=out, beta=0.5)
        _close(out.cpu(), 0.5 * start.transpose(1, 2).double() + 0.5 * new.double(), torch.float32)
        mean = _formula(_patches(x.cpu(), **geom), mode, bias=True, mean=True)
        out = torch.zeros(mean.shape, device=path)
        cf.patch_covariance(x, **geom, mode=mode, bias=True, group_reduction="mean", out=out)
        _close(out.cpu(), mean, torch.float32)


# ---------------------------------------------------------------------------------------------- the op
@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_opcheck(mode, path):
    x, _ = _case("2d_K3_P1_G2", path)
    args = (x, [3, 3], [1, 1], [1, 1, 1, 1], [0, 0], [1, 1], "zeros", 2, False, mode == "reduce", True, False, True)
    torch.library.opcheck(torch.ops.convzoo.patch_covariance, (*args, 0.5))
    out = torch.randn(2, 19, 19, device=path)
    torch.library.opcheck(torch.ops.convzoo.patch_covariance_, (out, *args, 0.9, 0.1))
    targs = (x, [3, 3], [2, 2], [1, 1], [1, 1], [1, 1], "zeros", 2, True, mode == "reduce", False, True, False)
    torch.library.opcheck(torch.ops.convzoo.patch_covariance, (*targs, 1.0))


@torch.fx.experimental._config.patch(use_duck_shape=False)
@torch._dynamo.config.patch(error_on_recompile=True)
def test_compile_dynamic_ema_no_recompile(kernel_device):
    """A moving average kept in a buffer under torch.compile(fullgraph=True, dynamic=True): one graph for
    every batch and image size."""
    torch._dynamo.reset()

    def f(x, buf):
        cf.patch_covariance(x, 3, padding=1, groups=2, bias=True, out=buf, beta=0.75)
        return buf * 2

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    for shape in [(2, 4, 6, 7), (3, 4, 5, 9)]:
        x = torch.randn(shape, device=kernel_device)
        start = torch.randn(2, 19, 19, device=kernel_device)
        a, b = start.clone(), start.clone()
        torch.testing.assert_close(compiled(x, a), f(x, b))
        torch.testing.assert_close(a, b)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_not_differentiable_and_says_so(kernel_device):
    x = torch.randn(2, 3, 5, 5, device=kernel_device)
    with pytest.raises(ValueError, match="detach"):
        cf.patch_covariance(x.requires_grad_(), 3)
    with pytest.raises(ValueError, match="detach"):
        torch.func.grad(lambda t: cf.patch_covariance(t, 3).sum())(x.detach())
    with pytest.raises(RuntimeError, match="tangent"):
        torch.func.jvp(lambda t: cf.patch_covariance(t, 3), (x.detach(),), (torch.ones_like(x),))
    with torch.no_grad():
        assert cf.patch_covariance(x, 3).shape == (1, 27, 27)
    stacked = torch.stack([x.detach(), 2 * x.detach()])  # vmap: one factor per stacked batch
    torch.testing.assert_close(torch.func.vmap(lambda t: cf.patch_covariance(t, 3))(stacked)[1],
                               4 * cf.patch_covariance(x.detach(), 3))


# ---------------------------------------------------------------------------------------------- odd inputs
def test_empty_inputs_and_meta(path):
    empty_batch = cf.patch_covariance(torch.randn(0, 2, 5, 5, device=path), 3, bias=True)
    assert empty_batch.shape == (1, 19, 19) and not empty_batch.any()
    no_channels = cf.patch_covariance(torch.randn(2, 0, 5, 5, device=path), 3, bias=True)
    assert no_channels.shape == (1, 1, 1) and no_channels.item() == pytest.approx(9.0)  # scale·N·L = ½·2·9
    out = torch.ones(2, 18, 18, device=path)
    cf.patch_covariance(torch.randn(0, 4, 5, 5, device=path), 3, groups=2, out=out, beta=0.5, scale=1.0)
    assert (out == 0.5).all()
    meta = cf.patch_covariance(torch.empty(2, 4, 6, 6, device="meta", dtype=torch.float16), 3, groups=2,
                               bias=True)
    assert meta.shape == (2, 19, 19) and meta.dtype == torch.float32 and meta.is_meta


def test_unbatched_is_a_batch_of_one(path):
    x = torch.randn(2, 5, 6, device=path)
    torch.testing.assert_close(cf.patch_covariance(x, (3, 3), padding=1),
                               cf.patch_covariance(x[None], (3, 3), padding=1))


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"groups": 3}, ValueError, "groups"),
    ({"groups": 0}, ValueError, "groups"),
    ({"groups": True}, TypeError, "groups"),
    ({"mode": "full"}, ValueError, "mode"),
    ({"group_reduction": "sum"}, ValueError, "group_reduction"),
    ({"bias": 1}, TypeError, "bias"),
    ({"transposed": "yes"}, TypeError, "transposed"),
    ({"scale": "1"}, TypeError, "scale"),
    ({"scale": float("inf")}, ValueError, "scale"),
    ({"beta": 0.5}, ValueError, "beta needs out"),
    ({"out": torch.zeros(2, 19, 19), "beta": 1.5}, ValueError, "beta"),
    ({"out": torch.zeros(2, 19, 19), "beta": True}, TypeError, "beta"),
    ({"out": torch.zeros(2, 18, 18)}, ValueError, "out must have shape"),
    ({"out": torch.zeros(2, 19, 19, dtype=torch.float64)}, TypeError, "out must be torch.float32"),
    ({"out": torch.zeros(2, 19, 19, device="meta")}, ValueError, "device"),
    ({"out": [[0.0]]}, TypeError, "out must be a tensor"),
    ({"output_padding": 1}, ValueError, "output_padding"),
    ({"transposed": True, "padding_mode": "reflect"}, ValueError, "padding_mode"),
    ({"transposed": True, "padding": "same"}, ValueError, "padding"),
    ({"transposed": True, "output_padding": 1}, ValueError, "output_padding"),
    ({"padding_mode": "wrap"}, ValueError, "padding_mode"),
    ({"kernel_size": 0}, ValueError, "kernel_size"),
    ({"stride": (1, 2, 3, 4)}, ValueError, "stride"),
])
def test_bad_input_names_the_argument(kwargs, exc, match):
    kwargs = {"kernel_size": 3, "groups": 2, "bias": True, **kwargs}
    with pytest.raises(exc, match=match):
        cf.patch_covariance(torch.randn(2, 4, 6, 6), **kwargs)


def test_bad_tensors():
    with pytest.raises(TypeError, match="input"):
        cf.patch_covariance(torch.ones(2, 4, 6, 6, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="input"):
        cf.patch_covariance(torch.randn(2, 4), 3)


# ---------------------------------------------------------------------------------------------- memory
@pytest.mark.slow
@pytest.mark.parametrize("kernel_size", [5, (5, 6, 7)])
def test_einconv_3d_shapes_need_far_less_than_the_patch_matrix(kernel_size, monkeypatch):
    """einconv's own 3-d KFC test shapes: the CPU path holds one chunk of the patch matrix, not all of it
    (the profiler-replayed allocation peak, as the local-conv memory test measures it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 3, 50, 40, 30)
    k = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * 3
    out = [n - kk + 1 for n, kk in zip(x.shape[2:], k)]
    patch_bytes = x.shape[0] * x.shape[1] * math.prod(k) * math.prod(out) * 4
    result = {}
    peak = peak_bytes(lambda: result.setdefault("f", cf.patch_covariance(x, kernel_size)))
    assert peak < patch_bytes / 3, (peak, patch_bytes)
    assert torch.isfinite(result["f"]).all() and result["f"].shape == (1, 3 * math.prod(k), 3 * math.prod(k))


def test_cpu_path_chunks_give_the_same_factor(monkeypatch):
    """Tiny chunks (one output row of one sample) sum to the same factor as one big chunk."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, geom = _case("3d_K3_S2_P1_G2", "cpu", torch.float64)
    want = cf.patch_covariance(x, **geom, bias=True)
    monkeypatch.setattr(reference, "_CHUNK_BYTES", 1)
    torch.testing.assert_close(cf.patch_covariance(x, **geom, bias=True), want, rtol=1e-12, atol=1e-12)


def test_kernel_module_is_registered():
    assert autotune.get_spec("patch_covariance").kernel is kernels.patch_covariance_kernel


# ---- attacks
def _forced(split):
    cfg = autotune.Config({"BLOCK_D": 16, "BLOCK_M": 16, "SPLIT": split}, num_warps=4, num_stages=1)
    return autotune.force_config("patch_covariance", cfg)


@pytest.mark.parametrize("split", [1, 2])
def test_attack_out_sharing_memory_is_refused(split, path):
    """An out whose elements share memory (an expanded buffer) or that overlaps the input: the kernel
    writes a tile while other programs still gather the input (and the mirrored stores collide), so
    the factor was silently wrong on the kernel path. Both are refused, on every path."""
    x = torch.randn(2, 4, 6, 7, device=path)
    with _forced(split):
        with pytest.raises(ValueError, match="out has elements that share"):
            cf.patch_covariance(x, 3, padding=1, groups=2, bias=True, out=torch.zeros(1, 1, 1, device=path)
                                .expand(2, 19, 19))
        buf = torch.randn(2 * 4 * 6 * 7 + 2 * 19 * 19, device=path)
        inp = buf[:2 * 4 * 6 * 7].view(2, 4, 6, 7)
        with pytest.raises(ValueError, match="out shares memory with input"):
            cf.patch_covariance(inp, 3, padding=1, groups=2, bias=True, out=buf[50:50 + 2 * 19 * 19].view(2, 19, 19),
                                beta=0)
        # disjoint parts of one buffer are fine
        out = buf[2 * 4 * 6 * 7:].view(2, 19, 19)
        cf.patch_covariance(inp, 3, padding=1, groups=2, bias=True, out=out, beta=0)
        _close(out.cpu(), _formula(_patches(inp.cpu(), 3, 1, 1, 1, 2), bias=True), torch.float32)


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_attack_zero_coefficient_does_not_read_the_factor(split, mode, path):
    """beta=1 keeps out as it is and scale=0 gives zeros even when the input holds Inf/NaN, as BLAS
    treats alpha = 0 (the new factor is not read) and as beta=0 ignores out. The kernel multiplied
    Inf by 0 (NaN everywhere) while the torch path's baddbmm skipped the product: the paths disagreed."""
    x = torch.randn(2, 4, 6, 7, device=path)
    x[0, 1, 2, 3] = float("inf")
    x[1, 0, 0, 0] = float("nan")
    start = torch.randn(2, 19, 19, device=path)
    with _forced(split):
        out = start.clone()
        cf.patch_covariance(x, 3, padding=1, groups=2, bias=True, mode=mode, out=out, beta=1)
        torch.testing.assert_close(out, start, atol=0, rtol=0)
        zero = cf.patch_covariance(x, 3, padding=1, groups=2, bias=True, mode=mode, scale=0)
        torch.testing.assert_close(zero, torch.zeros_like(start), atol=0, rtol=0)
        # with a non-zero coefficient the NaN stays where the math puts it
        got = cf.patch_covariance(x, 3, padding=1, groups=2, bias=True, mode=mode, scale=1e-30)
        assert got.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attack_group_mean_of_half_input_is_not_rounded(dtype, path):
    """group_reduction='mean' averages the channel groups in the accumulator dtype: the mean rounded
    back to fp16/bf16 before the fp32 factor was a silent 2^-9..2^-12 relative error."""
    x, geom = _case("2d_K3_P1_G2", path, dtype)
    got = cf.patch_covariance(x, **geom, bias=True, group_reduction="mean")
    _close(got.cpu(), _formula(_patches(x.cpu(), **geom), bias=True, mean=True), torch.float32)


def test_attack_out_that_requires_grad_is_refused(path):
    """Blending into a buffer that requires grad changes it behind autograd's back (torch refuses the
    in-place op on such a leaf): refused like an input that requires grad."""
    out = torch.zeros(1, 18, 18, device=path, requires_grad=True)
    with pytest.raises(ValueError, match="out requires grad"):
        cf.patch_covariance(torch.randn(2, 2, 6, 7, device=path), 3, padding=1, out=out)
    with torch.no_grad():
        cf.patch_covariance(torch.randn(2, 2, 6, 7, device=path), 3, padding=1, out=out)
    assert out.abs().sum() > 0


def test_attack_more_groups_than_a_cuda_grid_dim(monkeypatch):
    """Grid dims 1 and 2 are limited to 65535 on CUDA: a depthwise layer with more channels (groups on
    grid dim 1) failed to launch. The launcher splits the groups into launches of at most 65535; the
    launches here are recorded, not run (the interpreter has no such limit and 65537 programs are slow)."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda out, x, *args, **kwargs: launches.append((grid, out, x))

    monkeypatch.setattr(kernels, "patch_covariance_kernel", Recorder())
    groups = 65535 + 2
    x = torch.randn(1, groups, 3)
    out = kernels.patch_covariance(x, [1], [1], [0, 0], [0], [1], "zeros", groups, False, False,
                                   config=autotune.Config({"BLOCK_D": 16, "BLOCK_M": 16, "SPLIT": 2}))
    assert out.shape == (groups, 1, 1)
    assert all(grid[1] <= 65535 and grid[2] <= 65535 for grid, _, _ in launches)
    g0 = 0
    for grid, target, xs in launches:  # consecutive group ranges of x and of the workspace
        assert target.shape[1] == xs.shape[1] == grid[1]
        assert xs.data_ptr() == x[:, g0:].data_ptr()
        g0 += grid[1]
    assert g0 == groups


def test_zero_output_padding_in_any_form_is_no_output_padding():
    x = torch.randn(2, 4, 6, 6)
    want = cf.patch_covariance(x, 3, groups=2)
    for op in ((0, 0), [0, 0], 0):
        torch.testing.assert_close(cf.patch_covariance(x, 3, groups=2, output_padding=op), want)
    for op in ((0, 1), (False, 0)):
        with pytest.raises(ValueError, match="output_padding"):
            cf.patch_covariance(x, 3, groups=2, output_padding=op)


def test_compile_with_beta_and_scale_read_from_attributes():
    """Dynamo turns float attributes into symbolic floats: the argument checks must trace (no math.isfinite)."""

    class Stat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.beta, self.scale = 0.9, 0.5
            self.register_buffer("buf", torch.zeros(1, 27, 27))

        def forward(self, x):
            cf.patch_covariance(x, 3, out=self.buf, beta=self.beta, scale=self.scale)
            return self.buf.sum()

    torch._dynamo.reset()
    eager, compiled = Stat(), Stat()
    step = torch.compile(compiled, fullgraph=True, dynamic=True, backend="aot_eager")
    for beta in (0.9, 0.5):
        x = torch.randn(2, 3, 6, 6)
        eager.beta = compiled.beta = beta
        torch.testing.assert_close(step(x), eager(x))
    torch.testing.assert_close(compiled.buf, eager.buf)
    torch._dynamo.reset()


@pytest.mark.parametrize("key", ["1d_K3_S2_P1", "2d_K3_P1_G2", "2d_K2x3_S2x1_depthwise"])
def test_small_cpu_calls_take_im2col_and_agree_with_the_chunked_path(key):
    """Small 1-/2-d zero-padded calls take one im2col (ops._native) instead of the chunked reference: the same
    factor up to the summation order, with out/alpha/coef and the bias row."""
    from convzoo.ops import _native

    x, geom = _case(key, "cpu", torch.float64)
    shape, k, s, p, d, g, mode = CASES[key]
    nd = len(shape) - 2
    args = ([k] * nd if isinstance(k, int) else list(k), [s] * nd if isinstance(s, int) else list(s),
            [v for q in ([p] * nd if isinstance(p, int) else p) for v in (q, q)],
            [d] * nd if isinstance(d, int) else list(d))
    start = torch.randn(cf.patch_covariance(x, **geom, bias=True).shape, dtype=torch.float64)
    got = _native.patch_covariance(x, *args[:3], args[3], mode, g, True, start.clone(), 0.5, 0.25)
    want = reference.patch_covariance(x, args[0], args[1], args[2], [0] * nd, args[3], mode, g, False, True,
                                      out=start.clone(), alpha=0.5, coef=0.25)
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
