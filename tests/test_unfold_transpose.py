"""unfold_transpose (the patches a transposed convolution sees) and its adjoint: bit-exact against
unfoldNd's ``unfold_transposeNd`` on both paths, the transposed-convolution identity, gradients, opcheck,
torch.compile, torch.func transforms, the module, and clear errors for bad input."""

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from compile_checks import assert_compiles_once
from torch.func import grad, jvp, vmap
from unfoldNd import UnfoldTransposeNd, unfold_transposeNd

import convzoo
import convzoo.functional as cf
from convzoo import autotune
from convzoo.kernels import unfold_transpose as kernels

# id: (input shape, kernel_size, stride, padding, output_padding, dilation)
CASES = {
    "1d_N2C3_L7_K3_S2_P1_OP1": ((2, 3, 7), 3, 2, 1, 1, 1),
    "1d_K1_S3_OP2": ((1, 2, 5), 1, 3, 0, 2, 1),
    "1d_K5_S1_P3_D2": ((2, 1, 6), 5, 1, 3, 0, 2),
    "2d_K3_S1_P2_D2": ((2, 2, 5, 4), 3, 1, 2, 0, 2),
    "2d_K2x5_S2x3_P0x1_OP1x2": ((1, 3, 4, 5), (2, 5), (2, 3), (0, 1), (1, 2), 1),
    "2d_K3_S1_D3_OP2": ((1, 2, 4, 4), 3, 1, 1, 2, 3),  # output_padding < dilation, not < stride
    "2d_K7_S2_P4_OP1": ((1, 2, 6, 5), 7, 2, 4, 1, 1),
    "3d_K3_S2_P1_OP1": ((1, 2, 3, 4, 3), 3, 2, 1, 1, 1),
    "3d_K2x1x3_S1x2x3_D1x1x2": ((2, 1, 3, 3, 2), (2, 1, 3), (1, 2, 3), 0, (0, 1, 2), (1, 1, 2)),
}
SMALL = ["1d_N2C3_L7_K3_S2_P1_OP1", "2d_K2x5_S2x3_P0x1_OP1x2", "3d_K3_S2_P1_OP1"]


def _tuple(v, nd):
    return list(v) if isinstance(v, tuple) else [v] * nd


def _case(key, device, dtype=torch.float32, requires_grad=False):
    shape, *geom = CASES[key]
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=requires_grad)
    return x, geom


def _resolved(x, geom):
    """The op's resolved arguments: per-dim lists."""
    return [_tuple(v, x.dim() - 2) for v in geom]


# ---------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("key", list(CASES))
def test_matches_unfoldnd_exactly(key, dtype, path):
    x, geom = _case(key, path, dtype)
    got = cf.unfold_transpose(x, *geom)
    torch.testing.assert_close(got, unfold_transposeNd(x, *geom), atol=0, rtol=0)


@pytest.mark.parametrize("key", SMALL)
def test_fp16_and_permuted_input_exact(key, path):
    """fp16 is copied, not computed; a non-contiguous (channels-last-like) input reads through its strides."""
    x, geom = _case(key, path, torch.float64)
    want = unfold_transposeNd(x, *geom)
    got = cf.unfold_transpose(x.half(), *geom)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want.half(), atol=0, rtol=0)
    perm = [0, *range(2, x.dim()), 1]
    xp = x.permute(perm).contiguous().permute([0, x.dim() - 1, *range(1, x.dim() - 1)])
    assert not xp.is_contiguous()
    torch.testing.assert_close(cf.unfold_transpose(xp, *geom), want, atol=0, rtol=0)


@pytest.mark.parametrize("ties_to_last", [False, True], ids=["positions_x_rows", "rows_x_positions"])
@pytest.mark.parametrize("key", ["2d_K3_S1_P2_D2", "2d_K7_S2_P4_OP1"])
def test_every_tile_edge(key, ties_to_last, monkeypatch, kernel_device):
    """Small tiles (many programs, partial tiles at every edge) give the same result as the reference, in both
    orientations of the gather's tile (the launcher's depends on the installed Triton: test_unfold)."""
    from convzoo.kernels import _common as cm

    monkeypatch.setattr(cm, "_TIES_TO_LAST_DIM", ties_to_last)
    x, geom = _case(key, kernel_device, torch.float64)
    args = _resolved(x, geom)
    cols = kernels.unfold_transpose(x, *args, config=autotune.Config({"BLOCK_R": 4, "BLOCK_L": 32}, 4, 1))
    torch.testing.assert_close(cols, unfold_transposeNd(x, *geom), atol=0, rtol=0)
    y = torch.randn_like(cols)
    dx = kernels.unfold_transpose_backward(y, list(x.shape[2:]), *args,
                                           config=autotune.Config({"BLOCK_R": 2, "BLOCK_P": 16}, 4, 1))
    (want,) = torch.autograd.grad(unfold_transposeNd(x.requires_grad_(), *geom), x, y)
    torch.testing.assert_close(dx, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("key", ["1d_N2C3_L7_K3_S2_P1_OP1", "2d_K2x5_S2x3_P0x1_OP1x2", "2d_K3_S1_D3_OP2",
                                 "3d_K2x1x3_S1x2x3_D1x1x2"])
def test_conv_transpose_is_weight_matrix_times_patches(key, path):
    """conv_transposeNd(x, w) == w_matrix @ unfold_transpose(x), w_matrix[o, (c, t)] = w[c, o, t]."""
    x, (k, s, p, op, d) = _case(key, path, torch.float64)
    nd = x.dim() - 2
    c_out = 4
    w = torch.randn(x.shape[1], c_out, *_tuple(k, nd), device=path, dtype=torch.float64)
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    want = conv(x, w, stride=s, padding=p, output_padding=op, dilation=d)
    w_matrix = w.flatten(2).permute(1, 0, 2).reshape(c_out, -1)
    got = (w_matrix @ cf.unfold_transpose(x, k, s, p, op, d)).reshape(want.shape)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_output_size_resolves_like_conv_transpose(path):
    """output_size (spatial, or with the leading (N, C)) picks output_padding as nn.ConvTranspose2d does."""
    x = torch.randn(2, 3, 4, 5, device=path)
    for size in ([7, 9], [8, 10], (2, 3, 8, 9)):  # the range is [7, 8] x [9, 10]
        want = UnfoldTransposeNd(3, stride=2, padding=1, dilation=1)(x, output_size=size)
        got = cf.unfold_transpose(x, 3, stride=2, padding=1, output_size=size)
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_unbatched_input(path):
    x = torch.randn(3, 5, 4, device=path)
    want = unfold_transposeNd(x[None], 3, 2, 1, 1)[0]
    torch.testing.assert_close(cf.unfold_transpose(x, (3, 3), 2, 1, 1), want, atol=0, rtol=0)
    got = cf.unfold_transpose(x, (3, 3), 2, 1, output_size=(3, 10, 8))  # [C, *spatial], as torch reads it
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("key", [*SMALL, "2d_K3_S1_D3_OP2"])
def test_backward_matches_autograd_of_unfoldnd(key, path):
    x, geom = _case(key, path, torch.float64, requires_grad=True)
    y = torch.randn_like(unfold_transposeNd(x, *geom))
    (want,) = torch.autograd.grad(unfold_transposeNd(x, *geom), x, y)
    (got,) = torch.autograd.grad(cf.unfold_transpose(x, *geom), x, y)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("key", SMALL)
def test_adjoint_identity_and_gradcheck_fp64(key, path):
    """<unfold_transpose(x), y> == <x, backward(y)>, and both ops pass gradcheck (each is the other's backward)."""
    x, geom = _case(key, path, torch.float64)
    args = _resolved(x, geom)
    size = list(x.shape[2:])
    cols = torch.ops.convzoo.unfold_transpose(x, *args)
    y = torch.randn_like(cols)
    dx = torch.ops.convzoo.unfold_transpose_backward(y, size, *args)
    torch.testing.assert_close((cols * y).sum(), (x * dx).sum(), atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(lambda t: torch.ops.convzoo.unfold_transpose(t, *args),
                                    (x.requires_grad_(),), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.convzoo.unfold_transpose_backward(t, size, *args),
                                    (y.requires_grad_(),), fast_mode=True)
    # double backward: the backward op's own backward is unfold_transpose again
    g2 = torch.randn_like(dx)
    yy = y.detach().requires_grad_()
    (gg,) = torch.autograd.grad(cf.unfold_transpose(x, *geom), x, yy, create_graph=True)
    (back,) = torch.autograd.grad(gg, yy, g2)
    torch.testing.assert_close(back, unfold_transposeNd(g2, *geom), atol=0, rtol=0)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("permuted", [False, True], ids=["contiguous", "permuted"])
def test_opcheck(permuted, requires_grad, path):
    x, geom = _case("2d_K2x5_S2x3_P0x1_OP1x2", path)
    args = _resolved(x, geom)
    if permuted:
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    torch.library.opcheck(torch.ops.convzoo.unfold_transpose.default, (x.requires_grad_(requires_grad), *args))
    cols = torch.ops.convzoo.unfold_transpose(x.detach(), *args)
    if permuted:
        cols = cols.transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(torch.ops.convzoo.unfold_transpose_backward.default,
                          (cols.requires_grad_(requires_grad), list(x.shape[2:]), *args))


@torch.fx.experimental._config.patch(use_duck_shape=False)  # H == W must not specialise
@torch._dynamo.config.patch(error_on_recompile=True)
def test_compile_dynamic_no_recompile(kernel_device):
    torch._dynamo.reset()

    def f(x):
        return torch.relu(cf.unfold_transpose(x, 3, stride=2, padding=1, output_padding=1))

    # N = 1 would be specialised
    assert_compiles_once(f, [torch.randn(shape, device=kernel_device) for shape in [(2, 3, 6, 7), (3, 2, 9, 5)]])


# ---------------------------------------------------------------------------------------------- torch.func
def test_func_grad_jvp_vmap(path):
    x, geom = _case("2d_K2x5_S2x3_P0x1_OP1x2", path, torch.float64)
    w = torch.randn_like(unfold_transposeNd(x, *geom))

    def loss(f):
        return lambda t: (f(t, *geom) * w).sum()

    torch.testing.assert_close(grad(loss(cf.unfold_transpose))(x), grad(loss(unfold_transposeNd))(x),
                               atol=1e-12, rtol=0)
    t = torch.randn_like(x)
    primal, tangent = jvp(lambda v: cf.unfold_transpose(v, *geom), (x,), (t,))
    torch.testing.assert_close(primal, unfold_transposeNd(x, *geom), atol=0, rtol=0)
    torch.testing.assert_close(tangent, unfold_transposeNd(t, *geom), atol=0, rtol=0)  # linear: its own tangent
    xs = torch.randn(3, *x.shape, device=path, dtype=torch.float64)
    got = vmap(lambda v: cf.unfold_transpose(v, *geom))(xs)
    torch.testing.assert_close(got, torch.stack([unfold_transposeNd(v, *geom) for v in xs]), atol=0, rtol=0)
    per_sample = vmap(grad(loss(cf.unfold_transpose)))(xs)
    torch.testing.assert_close(per_sample, torch.stack([grad(loss(unfold_transposeNd))(v) for v in xs]),
                               atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------- module
def test_module_forward_output_size_and_repr(path):
    x = torch.randn(2, 3, 4, 5, device=path)
    m = convzoo.UnfoldTranspose((3, 2), stride=2, padding=1, output_padding=(1, 0), dilation=1)
    ref = UnfoldTransposeNd((3, 2), stride=2, padding=1, output_padding=(1, 0), dilation=1)
    torch.testing.assert_close(m(x), ref(x), atol=0, rtol=0)
    torch.testing.assert_close(m(x, output_size=[7, 9]), ref(x, output_size=[7, 9]), atol=0, rtol=0)
    assert repr(m) == ("UnfoldTranspose(kernel_size=(3, 2), stride=2, padding=1, output_padding=(1, 0), "
                       "dilation=1)")


# ---------------------------------------------------------------------------------------------- bad input
X = torch.randn(1, 2, 4, 4)


@pytest.mark.parametrize("kwargs, exc, name", [
    ({"kernel_size": 3, "stride": 2, "output_padding": 2}, ValueError, "output_padding"),
    ({"kernel_size": 3, "stride": 2, "dilation": 2, "output_padding": 2}, ValueError, "output_padding"),
    ({"kernel_size": 3, "output_padding": -1}, ValueError, "output_padding"),
    ({"kernel_size": 3, "stride": 2, "output_size": [6, 9]}, ValueError, "output_size"),  # range [9, 10]
    ({"kernel_size": 3, "stride": 2, "output_size": [11, 9]}, ValueError, "output_size"),
    ({"kernel_size": 3, "output_size": [6]}, ValueError, "output_size"),
    ({"kernel_size": 3, "output_size": [6.0, 6]}, TypeError, "output_size"),
    ({"kernel_size": 0}, ValueError, "kernel_size"),
    ({"kernel_size": 3, "stride": 0}, ValueError, "stride"),
    ({"kernel_size": 3, "dilation": -1}, ValueError, "dilation"),
    ({"kernel_size": 3, "stride": True}, TypeError, "stride"),
    ({"kernel_size": (3, True)}, TypeError, "kernel_size"),
    ({"kernel_size": 3, "padding": -1}, ValueError, "padding"),
    ({"kernel_size": 3, "padding": "same"}, TypeError, "padding"),
    ({"kernel_size": 1, "padding": 3}, ValueError, "padding"),  # output size 4 - 1 - 6 + 1 < 1
    ({"kernel_size": (3, 3, 3, 3)}, ValueError, "kernel_size"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments_name_the_argument(kwargs, exc, name, path):
    with pytest.raises(exc, match=name):
        cf.unfold_transpose(X.to(path), **kwargs)


def test_bad_tensors(path):
    with pytest.raises(TypeError, match="input"):
        cf.unfold_transpose(torch.ones(1, 2, 4, dtype=torch.int64, device=path), 3)
    with pytest.raises(ValueError, match="input"):
        cf.unfold_transpose(torch.ones(1, 2, 2, 2, 2, 2, device=path), 3)
    with pytest.raises(ValueError, match=r"input\.shape\[2\]"):  # a 4x4 output has 16 positions, not 5
        torch.ops.convzoo.unfold_transpose_backward(torch.ones(1, 18, 5, device=path), [4, 4], [3, 3], [1, 1],
                                                    [0, 0], [0, 0], [1, 1])


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5)], ids=["N0", "C0", "H0"])
def test_empty_dims(shape, path):
    """An empty batch or channel dim gives an empty result; an empty input dim reads nothing (zeros)."""
    x = torch.randn(shape, device=path, requires_grad=True)
    cols = cf.unfold_transpose(x, 3, stride=2, output_padding=1)  # out = (in - 1)·2 + 2 + 1 + 1
    assert cols.shape == (shape[0], shape[1] * 9, (shape[2] * 2 + 2) * (shape[3] * 2 + 2))
    assert not cols.any()
    (g,) = torch.autograd.grad(cols.sum(), x)
    assert g.shape == x.shape
