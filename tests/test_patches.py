"""extract_patches / extract_averaged_patches (the KFAC patch statistics' inputs) against curvlinops' own
functions on 2-d and an independent float64 formula (group mean, F.pad, unfold/unfoldNd) on 1-, 2- and 3-d
for every padding mode; the averaged transposed patches against unfoldNd; gradients, opcheck, torch.compile,
torch.func transforms, and clear errors for bad input. Both paths (the Triton kernel and plain torch)."""

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from compile_checks import assert_compiles_once
from curvlinops.kfac_utils import extract_averaged_patches as cl_extract_averaged_patches
from curvlinops.kfac_utils import extract_patches as cl_extract_patches
from problems import CASES, IDS, TOL, Case, flat_padding, make_input, oracle_unfold
from torch.func import grad, jvp, vmap
from unfoldNd import unfold_transposeNd

import convzoo.functional as cf
from convzoo import _shapes, reference
from convzoo.autotune import Config
from convzoo.kernels import patches as kernels


def _group_mean64(x, groups):
    """The independent group mean: float64, torch's own mean."""
    return x.double().unflatten(1, (groups, x.shape[1] // groups)).mean(1)


def oracle_patches(x, case, groups):
    """``[N, L, C/groups·∏K]`` from the float64 group mean, F.pad + unfold/unfoldNd, and a transpose."""
    return oracle_unfold(_group_mean64(x, groups), case).transpose(1, 2)


def _close(got, want, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.cpu().double(), want.cpu().double(), atol=atol, rtol=rtol)


def _args(case, groups):
    """The op's resolved arguments."""
    nd = case.ndim
    return ([*case.kernel], [*(case.dilation or (1,) * nd)], flat_padding(case), [*(case.stride or (1,) * nd)],
            case.mode, groups)


# ---------------------------------------------------------------------------------------------- curvlinops, 2-d
# id: (input shape, kernel_size, stride, padding, dilation, groups)
CURVLINOPS = {
    "K3_P1": ((2, 4, 7, 9), 3, 1, 1, 1, 1),
    "K2x3_S2_P1x0": ((2, 4, 8, 7), (2, 3), 2, (1, 0), 1, 1),
    "K3_S3_D2_P2": ((2, 3, 11, 10), 3, 3, 2, 2, 1),
    "K3_same_G2": ((2, 4, 7, 9), 3, 1, "same", 1, 2),
    "K5x3_same_D2_G2": ((1, 6, 9, 8), (5, 3), 1, "same", (1, 2), 2),
    "K3_S2_P1_G3": ((2, 6, 7, 6), 3, 2, 1, 1, 3),
    "K3_P1_depthwise": ((2, 5, 6, 7), 3, 1, 1, 1, 5),
    "K1_S2_G2": ((2, 4, 5, 5), 1, 2, 0, 1, 2),
}


@pytest.mark.parametrize("key", list(CURVLINOPS))
def test_matches_curvlinops_2d(key, path):
    """Both functions equal curvlinops' on 2-d; extract_patches bit for bit with groups=1 (a copy)."""
    shape, k, s, p, d, groups = CURVLINOPS[key]
    x = torch.randn(shape, device=path)
    got = cf.extract_patches(x, k, s, p, d, groups)
    want = cl_extract_patches(x, k, s, p, d, groups)
    assert got.is_contiguous() and got.shape == want.shape
    if groups == 1:
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    else:
        _close(got, want, torch.float32)
    got_mean = cf.extract_averaged_patches(x, k, s, p, d, groups)
    want_mean = cl_extract_averaged_patches(x, k, s, p, d, groups)
    assert got_mean.shape == want_mean.shape
    _close(got_mean, want_mean, torch.float32)


# ---------------------------------------------------------------------------------------------- the formula, 1-3 d
def _groups_of(case, grouped):
    return case.c if grouped and case.c > 1 else 1


@pytest.mark.parametrize("grouped", [False, True], ids=["G1", "Gmax"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_formula_every_mode(case, grouped, path):
    """float64: extract_patches is the formula (exactly when no group is averaged), and
    extract_averaged_patches its mean over positions, for every padding mode and (lo, hi) padding."""
    groups = _groups_of(case, grouped)
    x = make_input(case, torch.float64, path)
    want = oracle_patches(x.cpu(), case, groups)
    got = cf.extract_patches(x, groups=groups, **case.kwargs())
    if groups == 1:
        torch.testing.assert_close(got.cpu(), want, atol=0, rtol=0)
    else:
        _close(got, want, torch.float64)
    _close(cf.extract_averaged_patches(x, groups=groups, **case.kwargs()), want.mean(1), torch.float64)


SMALL = [c for c in CASES if c.id in ("N2_C3_H7W9_K3x3_S2x2_P1_D2x2", "N2_C2_W9_K3_S2_P2_reflect",
                                      "N1_C2_D3H4W5_K2x3x2_S1x2x1_P1-0x1-1x0-2_replicate")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", SMALL, ids=[c.id for c in SMALL])
def test_kernel_dtypes_and_layouts(case, layout, dtype, kernel_device):
    """fp32/fp16/bf16 through the kernel (the group sum in fp32, bf16 widened by its bits in the interpreter),
    any input strides: within the dtype's tolerance of the float64 formula; groups=1 a copy, exact."""
    x = make_input(case, dtype, kernel_device, layout)
    for groups in (1, case.c):
        got = cf.extract_patches(x, groups=groups, **case.kwargs())
        assert got.dtype == dtype
        want = oracle_patches(x.cpu(), case, groups)
        if groups == 1:
            torch.testing.assert_close(got.cpu(), want.to(dtype), atol=0, rtol=0)
        else:
            _close(got, want, dtype)
        _close(cf.extract_averaged_patches(x, groups=groups, **case.kwargs()), want.mean(1), dtype)


def test_every_tile_edge(kernel_device):
    """Small tiles (many programs, partial tiles along both N·L and D) give the formula's result."""
    case = Case(2, 6, (5, 7), (3, 2), (1, 2), 1, (1, 2), "circular")
    x = make_input(case, torch.float64, kernel_device)
    for groups in (1, 2):
        out = kernels.extract_patches(x, *_args(case, groups), config=Config({"BLOCK_R": 4, "BLOCK_D": 16}, 4, 1))
        _close(out, oracle_patches(x.cpu(), case, groups), torch.float64)


def test_unbatched_input(path):
    x = torch.randn(4, 6, 5, device=path)
    want = cf.extract_patches(x[None], 3, 2, 1, 1, 2)[0]
    torch.testing.assert_close(cf.extract_patches(x, (3, 3), 2, 1, 1, 2), want, atol=0, rtol=0)
    want = cf.extract_averaged_patches(x[None], 3, 2, 1, 1, 2)[0]
    torch.testing.assert_close(cf.extract_averaged_patches(x, (3, 3), 2, 1, 1, 2), want, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- averaged, directly
TRANSPOSED = {  # (input shape, kernel_size, stride, padding, output_padding, dilation)
    "1d_K3_S2_P1_OP1": ((2, 3, 7), [3], [2], [1], [1], [1]),
    "2d_K2x5_S2x3_P0x1_OP1x2": ((1, 3, 4, 5), [2, 5], [2, 3], [0, 1], [1, 2], [1, 1]),
    "2d_K7_S2_P4_OP1": ((1, 2, 6, 5), [7, 7], [2, 2], [4, 4], [1, 1], [1, 1]),
    "3d_K2x1x3_S1x2x3_D1x1x2": ((2, 1, 3, 3, 2), [2, 1, 3], [1, 2, 3], [0, 0, 0], [0, 1, 2], [1, 1, 2]),
}


@pytest.mark.parametrize("key", list(TRANSPOSED))
def test_averaged_transpose_patches(key):
    """reference.averaged_transpose_patches is the mean over positions of unfold_transpose's columns (ours and
    unfoldNd's), float64; fp16 in and out, computed in fp32."""
    shape, k, s, p, op, d = TRANSPOSED[key]
    x = torch.randn(shape, dtype=torch.float64)
    g = _shapes.transpose_geometry(shape[2:], k, s, p, op, d)
    got = reference.averaged_transpose_patches(x, g)
    _close(got, unfold_transposeNd(x, k, s, p, op, d).mean(-1), torch.float64)
    _close(got, reference.unfold_transpose(x, k, s, p, op, d).mean(-1), torch.float64)
    half = reference.averaged_transpose_patches(x.half(), g)
    assert half.dtype == torch.float16
    _close(half, got, torch.float16)


def test_averaged_patches_counts_repeated_reads():
    """Circular padding of a 2-wide input with a 3-tap kernel: a tap reads one pixel through two padded
    positions (and the mean still equals the formula)."""
    case = Case(1, 2, (2, 3), (3, 3), None, (2, 3), None, "circular")
    g = _shapes.geometry(case.size, *_args(case, 1)[:5])
    x = make_input(case, torch.float64, "cpu")
    _close(reference.averaged_patches(x, g), oracle_unfold(x, case).mean(-1), torch.float64)


# ---------------------------------------------------------------------------------------------- gradients
GRAD_CASES = [c for c in CASES if c.id in ("N2_C3_H7W9_K3x3_S2x2_P1_D2x2", "N2_C2_W6_K2_S1_Psame_D3_circular",
                                           "N2_C1_D3H4W5_K2x2x2_P1_reflect", "N2_C2_H5W7_K3x3_S2x1_P2x3_replicate")]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.id for c in GRAD_CASES])
def test_backward_matches_autograd_of_formula(case, path):
    groups = _groups_of(case, True)
    x = make_input(case, torch.float64, path).requires_grad_()
    xr = x.detach().cpu().requires_grad_()
    y = torch.randn_like(oracle_patches(xr, case, groups))
    (want,) = torch.autograd.grad(oracle_patches(xr, case, groups), xr, y)
    (got,) = torch.autograd.grad(cf.extract_patches(x, groups=groups, **case.kwargs()), x, y.to(path))
    _close(got, want, torch.float64)
    (want,) = torch.autograd.grad(oracle_patches(xr, case, groups).mean(1), xr, y[:, 0])
    (got,) = torch.autograd.grad(cf.extract_averaged_patches(x, groups=groups, **case.kwargs()), x, y[:, 0].to(path))
    _close(got, want, torch.float64)


@pytest.mark.parametrize("groups", [1, 2])
def test_adjoint_gradcheck_and_gradgradcheck_fp64(groups, path):
    """<P(x), y> == <x, P*(y)>; both ops pass gradcheck and gradgradcheck (each is the other's backward);
    extract_averaged_patches passes them too."""
    case = Case(1, 4, (4, 5), (2, 3), (2, 1), ((1, 0), (1, 2)), None, "reflect")
    x = make_input(case, torch.float64, path)
    args = _args(case, groups)
    p = torch.ops.convzoo.extract_patches(x, *args)
    y = torch.randn_like(p)
    dx = torch.ops.convzoo.extract_patches_backward(y, list(case.size), *args)
    torch.testing.assert_close((p * y).sum(), (x * dx).sum(), atol=1e-10, rtol=0)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()

    def fwd(t):
        return cf.extract_patches(t, groups=groups, **case.kwargs())

    def bwd(t):
        from convzoo.ops import patches as ops

        return ops.extract_patches_backward(t, list(case.size), *args)

    def mean(t):
        return cf.extract_averaged_patches(t, groups=groups, **case.kwargs())

    for fn, inp in ((fwd, xg), (bwd, yg), (mean, xg)):
        assert torch.autograd.gradcheck(fn, (inp,), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (inp,), fast_mode=True)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("permuted", [False, True], ids=["contiguous", "permuted"])
def test_opcheck(permuted, requires_grad, path):
    case = Case(2, 4, (5, 6), (3, 2), (2, 1), 1, None, "replicate")
    args = _args(case, 2)
    x = make_input(case, torch.float32, path, "channels_last" if permuted else "contiguous")
    torch.library.opcheck(torch.ops.convzoo.extract_patches.default, (x.requires_grad_(requires_grad), *args))
    y = torch.ops.convzoo.extract_patches(x.detach(), *args)
    if permuted:
        y = y.transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(torch.ops.convzoo.extract_patches_backward.default,
                          (y.requires_grad_(requires_grad), list(case.size), *args))


@torch.fx.experimental._config.patch(use_duck_shape=False)  # H == W must not specialise
@torch._dynamo.config.patch(error_on_recompile=True)
def test_compile_dynamic_no_recompile(kernel_device):
    torch._dynamo.reset()

    def f(x):
        p = cf.extract_patches(x, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        m = cf.extract_averaged_patches(x, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        return torch.relu(p).sum(1) + m

    # N = 1 would be specialised
    assert_compiles_once(f, [torch.randn(shape, device=kernel_device) for shape in [(2, 4, 6, 7), (3, 6, 9, 5)]])


# ---------------------------------------------------------------------------------------------- torch.func
@pytest.mark.parametrize("fn", ["extract_patches", "extract_averaged_patches"])
def test_func_grad_jvp_vmap(fn, path):
    case = Case(2, 4, (5, 6), (3, 2), (2, 1), 1, None, "circular")
    x = make_input(case, torch.float64, path)
    ours = getattr(cf, fn)

    def theirs(t):
        p = oracle_patches(t, case, 2)
        return p if fn == "extract_patches" else p.mean(1)

    def mine(t):
        return ours(t, groups=2, **case.kwargs())

    w = torch.randn_like(theirs(x.cpu())).to(path)

    def loss(f):
        return lambda t: (f(t) * w.to(t.device)).sum()

    def close(a, b):
        _close(a, b, torch.float64)

    close(grad(loss(mine))(x), grad(loss(theirs))(x.cpu()))
    t = torch.randn_like(x)
    primal, tangent = jvp(mine, (x,), (t,))
    close(primal, theirs(x.cpu()))
    close(tangent, theirs(t.cpu()))  # linear: its own tangent
    xs = torch.randn(3, *x.shape, device=path, dtype=torch.float64)
    close(vmap(mine)(xs), torch.stack([theirs(v.cpu()) for v in xs]))
    close(vmap(grad(loss(mine)))(xs), torch.stack([grad(loss(theirs))(v.cpu()) for v in xs]))


# ---------------------------------------------------------------------------------------------- bad input
X = torch.randn(1, 6, 5, 5)


@pytest.mark.parametrize("fn", ["extract_patches", "extract_averaged_patches"])
@pytest.mark.parametrize("kwargs, exc, name", [
    ({"groups": 4}, ValueError, "groups"),
    ({"groups": 0}, ValueError, "groups"),
    ({"groups": -2}, ValueError, "groups"),
    ({"groups": True}, TypeError, "groups"),
    ({"groups": 2.0}, TypeError, "groups"),
    ({"stride": 0}, ValueError, "stride"),
    ({"padding": -1}, ValueError, "padding"),
    ({"padding_mode": "wrap"}, ValueError, "padding_mode"),
    ({"kernel_size": (3, True)}, TypeError, "kernel_size"),
    ({"kernel_size": 7}, ValueError, "kernel_size"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments_name_the_argument(fn, kwargs, exc, name, path):
    kwargs = {"kernel_size": 3, **kwargs}
    with pytest.raises(exc, match=name):
        getattr(cf, fn)(X.to(path), **kwargs)


@pytest.mark.parametrize("fn", ["extract_patches", "extract_averaged_patches"])
def test_bad_tensors(fn, path):
    f = getattr(cf, fn)
    with pytest.raises(TypeError, match="input"):
        f(torch.ones(1, 2, 4, dtype=torch.int64, device=path), 3)
    with pytest.raises(TypeError, match="input"):
        f(X.numpy(), 3)
    with pytest.raises(ValueError, match="input"):
        f(torch.ones(1, 2, 2, 2, 2, 2, device=path), 3)
    with pytest.raises(ValueError, match="input"):
        f(torch.ones(4, device=path), 3)


def test_bad_gradient_shape_names_it(path):
    args = _args(Case(1, 2, (4, 4), (3, 3)), 1)
    with pytest.raises(ValueError, match=r"grad\.shape\[1\]"):  # a 2x2 grid has 4 positions, not 5
        torch.ops.convzoo.extract_patches_backward(torch.ones(1, 5, 18, device=path), [4, 4], *args)


@pytest.mark.parametrize("shape", [(0, 4, 5, 6), (2, 0, 5, 6), (2, 4, 0, 6)], ids=["N0", "C0", "H0"])
def test_empty_dims(shape, path):
    """An empty batch or channel dim gives an empty result; an empty spatial dim reads only the zero padding:
    zeros (the mean over positions too, never a NaN), and a zero gradient of the input's shape."""
    x = torch.randn(shape, device=path, requires_grad=True)
    groups = 2 if shape[1] else 1
    p = cf.extract_patches(x, (1, 3), padding=1, groups=groups)
    m = cf.extract_averaged_patches(x, (1, 3), padding=1, groups=groups)
    cg, positions = shape[1] // groups, (shape[2] + 2) * shape[3]
    assert p.shape == (shape[0], positions, cg * 3) and m.shape == (shape[0], cg * 3)
    assert not m.isnan().any()
    if shape[2] == 0:
        assert p.numel() and m.numel() and not p.any() and not m.any()
    (g,) = torch.autograd.grad(p.sum() + m.sum(), x)
    assert g.shape == x.shape


def test_meta_tensors():
    """Shapes without data: the custom op's fake, and the plain-torch mean."""
    x = torch.empty(2, 6, 7, 9, device="meta")
    assert cf.extract_patches(x, 3, 2, 1, 1, 3).shape == (2, 20, 18)
    assert cf.extract_averaged_patches(x, 3, 2, 1, 1, 3).shape == (2, 18)
    assert cf.extract_patches(x.requires_grad_(), 3, 2, 1, 1, 3).device.type == "meta"


# ---------------------------------------------------------------------------------------------- attacks
NONFINITE = [Case(1, 2, (6, 5), (3, 2), (2, 1), ((2, 1), (0, 2)), (1, 2), mode)
             for mode in ("zeros", "reflect", "replicate", "circular")] + [
    Case(1, 2, (10,), (3,), (3,), 1, None, "replicate"), Case(1, 2, (4, 5, 6), (2, 2, 3))]


def _poisoned(case, dtype):
    """The case's input (2 channels or more) with +inf at the first pixel of channel 0, -inf at the first and NaN
    at the last pixel of channel 1: each may only reach the mean patch entries whose taps read it."""
    x = make_input(case, dtype, "cpu")
    first, last = (0,) * case.ndim, tuple(n - 1 for n in case.size)
    x[(0, 0, *first)], x[(0, 1, *first)], x[(0, 1, *last)] = float("inf"), float("-inf"), float("nan")
    return x


def _windows_mean(x, case):
    """The mean patch by F.pad and Tensor.unfold views (no matmul, no one-hot conv: F.unfold, unfoldNd's
    1-d/3-d conv and curvlinops' einsum all spread an inf or NaN into the taps that do not read it)."""
    nd, flat = case.ndim, flat_padding(case)
    xp = F.pad(x, [v for i in reversed(range(nd)) for v in flat[2 * i:2 * i + 2]],
               mode="constant" if case.mode == "zeros" else case.mode)
    dil, stride = case.dilation or (1,) * nd, case.stride or (1,) * nd
    for i in range(nd):
        xp = xp.unfold(2 + i, dil[i] * (case.kernel[i] - 1) + 1, stride[i])[..., ::dil[i]]
    return xp.mean(tuple(range(2, 2 + nd))).flatten(1)  # [N, C, *out, *K] -> [N, C·∏K]


@pytest.mark.parametrize("case", NONFINITE, ids=[c.id for c in NONFINITE])
def test_attack_averaged_nonfinite_stays_where_it_is_read(case):
    """The mean over positions of patches holding an inf or a NaN is inf/NaN only in the entries whose tap reads
    it (as ``unfold(...).mean``): a zero count times inf must not turn every other tap's mean into NaN (the
    count-matrix matmul did: one inf pixel made the whole row of taps NaN; curvlinops' einsum does the same)."""
    clean = make_input(case, torch.float64, "cpu")
    _close(_windows_mean(clean, case), oracle_patches(clean, case, 1).mean(1), torch.float64)  # the oracle's oracle
    x = _poisoned(case, torch.float64)
    want = _windows_mean(x, case)
    assert want.isfinite().any() and want.isinf().any() and want.isnan().any()
    got = cf.extract_averaged_patches(x, **case.kwargs())
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12, equal_nan=True)
    got = cf.extract_averaged_patches(x.repeat(1, 2, *(1,) * case.ndim), groups=2, **case.kwargs())
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12, equal_nan=True)


def test_attack_averaged_transpose_nonfinite_stays_where_it_is_read():
    """The transposed mean keeps an inf/NaN in the taps that read it, as unfoldNd's patches do."""
    shape, k, s, p, op, d = TRANSPOSED["2d_K2x5_S2x3_P0x1_OP1x2"]
    case = Case(*shape[:2], shape[2:], tuple(k))
    x = _poisoned(case, torch.float64)
    want = reference.unfold_transpose(x, k, s, p, op, d).mean(-1)  # strided copies: exact (unfoldNd's is a conv)
    assert want.isfinite().any() and want.isinf().any() and want.isnan().any()
    got = reference.averaged_transpose_patches(x, _shapes.transpose_geometry(shape[2:], k, s, p, op, d))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attack_averaged_under_autocast(dtype):
    """Inside ``torch.autocast`` the mean is still computed in fp32 and returned in the input's dtype: the
    count-matrix tensordot met an autocast-lowered operand and raised 'both inputs should have same dtype'."""
    case = NONFINITE[1]
    x = make_input(case, dtype, "cpu")
    want = cf.extract_averaged_patches(x, groups=2, **case.kwargs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cf.extract_averaged_patches(x, groups=2, **case.kwargs())
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, atol=0, rtol=0)
