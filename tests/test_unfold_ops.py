"""unfold / fold as custom ops: opcheck, torch.compile (fullgraph, dynamic, recompiles), fp64 gradcheck,
and clear errors for bad input."""

import pytest
import torch
import torch._dynamo.testing
from compile_checks import assert_compiles_once
from torch import nn

import convzoo
import convzoo.functional as cf

GEOMS = {
    "2d_K3_S2_P1-2": ((2, 3, 7, 6), [3, 3], [1, 1], [1, 2, 1, 2], [2, 2], "zeros"),
    "1d_K2_D2_reflect": ((2, 2, 9), [2], [2], [1, 1], [1], "reflect"),
    "3d_K2_replicate": ((1, 2, 3, 4, 3), [2, 2, 2], [1, 1, 1], [1, 0, 0, 1, 1, 1], [1, 1, 1], "replicate"),
}


def _inputs(key, device, permuted, requires_grad, dtype=torch.float32):
    shape, *geom = GEOMS[key]
    x = torch.randn(shape, device=device, dtype=dtype)
    if permuted:
        x = x.transpose(1, -1).contiguous().transpose(1, -1)
    x.requires_grad_(requires_grad)
    return x, geom


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("permuted", [False, True], ids=["contiguous", "permuted"])
@pytest.mark.parametrize("key", list(GEOMS))
def test_opcheck(key, permuted, requires_grad, path):
    x, geom = _inputs(key, path, permuted, requires_grad)
    torch.library.opcheck(torch.ops.convzoo.unfold.default, (x, *geom))
    cols = torch.ops.convzoo.unfold(x.detach(), *geom)
    if permuted:
        cols = cols.transpose(1, 2).contiguous().transpose(1, 2)
    cols.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.convzoo.fold.default, (cols, list(x.shape[2:]), *geom))


@pytest.mark.parametrize("key", list(GEOMS))
def test_gradcheck_fp64(key, path):
    x, geom = _inputs(key, path, False, True, torch.float64)
    assert torch.autograd.gradcheck(lambda t: torch.ops.convzoo.unfold(t, *geom), (x,), fast_mode=True)
    cols = torch.ops.convzoo.unfold(x.detach(), *geom).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: torch.ops.convzoo.fold(t, list(x.shape[2:]), *geom), (cols,),
                                    fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.convzoo.unfold(t, *geom), (x,), fast_mode=True)


class _Net(nn.Module):
    """Unfold → per-patch linear map (a conv written as im2col + matmul) → ReLU → Flatten → Linear."""

    def __init__(self, c=3, out=4, hidden=5):
        super().__init__()
        self.unfold = convzoo.Unfold(3, padding="same", padding_mode="reflect")
        self.w = nn.Parameter(torch.randn(out, c * 9) / 3)
        self.head = nn.Linear(out, hidden)

    def forward(self, x):
        cols = self.unfold(x)  # [N, C*9, L]
        y = torch.relu(self.w @ cols)  # [N, out, L]
        return self.head(y.mean(-1))


def _fwd_bwd(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_()
    y = model(x)
    y.sum().backward()
    return y.detach(), x.grad, model.w.grad


def test_compile_fullgraph_matches_eager(kernel_device):
    model = _Net().to(kernel_device)
    x = torch.randn(2, 3, 6, 7, device=kernel_device)
    ref = _fwd_bwd(model, x)
    got = _fwd_bwd(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


@torch.fx.experimental._config.patch(use_duck_shape=False)  # H == W must not specialise
@torch._dynamo.config.patch(error_on_recompile=True)
def test_compile_dynamic_no_recompile(kernel_device):
    torch._dynamo.reset()
    model = _Net().to(kernel_device)
    # N = 1 would be specialised
    assert_compiles_once(model, [torch.randn(shape, device=kernel_device) for shape in [(2, 3, 6, 7), (3, 3, 9, 5)]],
                         _fwd_bwd)


@pytest.mark.slow
def test_compile_inductor_fold(kernel_device):
    """Inductor (not only aot_eager) around both ops, forward and backward."""
    torch._dynamo.reset()

    def f(x):
        cols = cf.unfold(x, 2, stride=2, padding=1)
        return cf.fold(torch.sigmoid(cols), x.shape[2:], 2, stride=2, padding=1)

    x = torch.randn(2, 2, 5, 6, device=kernel_device, requires_grad=True)
    ref = f(x)
    (gref,) = torch.autograd.grad(ref.sum(), x)
    got = torch.compile(f, fullgraph=True)(x)
    (g,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g, gref)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- bad input
X = torch.randn(2, 3, 6, 6)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: cf.unfold(torch.randn(2, 3), 3), ValueError, "input"),
    (lambda: cf.unfold(torch.randn(1, 1, 2, 2, 2, 2), 1), ValueError, "input"),
    (lambda: cf.unfold(X, 7), ValueError, "kernel_size"),
    (lambda: cf.unfold(X, 3, stride=0), ValueError, "stride"),
    (lambda: cf.unfold(X, 3, dilation=-1), ValueError, "dilation"),
    (lambda: cf.unfold(X, 0), ValueError, "kernel_size"),
    (lambda: cf.unfold(X, 3, padding=-1), ValueError, "padding"),
    (lambda: cf.unfold(X, 3, padding="full"), ValueError, "padding"),
    (lambda: cf.unfold(X, (3, 3, 3, 3)), ValueError, "kernel_size"),  # (3, 3, 3) would be an unbatched 3-d call
    (lambda: cf.unfold(X[0, 0], (3, 3, 3)), ValueError, "input"),
    (lambda: cf.unfold(X, 3.0), TypeError, "kernel_size"),
    (lambda: cf.unfold(X, 3, padding_mode="wrap"), ValueError, "padding_mode"),
    (lambda: cf.unfold(X, 3, padding=6, padding_mode="reflect"), ValueError, "reflect"),
    (lambda: cf.unfold(X, 3, padding=7, padding_mode="circular"), ValueError, "circular"),
    (lambda: cf.unfold(X.long(), 3), TypeError, "dtype"),
    (lambda: cf.unfold(X.numpy(), 3), TypeError, "Tensor"),
    (lambda: cf.fold(torch.randn(2, 27, 15), (6, 6), 3), ValueError, "output_size"),
    (lambda: cf.fold(torch.randn(2, 26, 16), (6, 6), 3), ValueError, "divisible"),
    (lambda: cf.fold(torch.randn(27 * 16), (6, 6), 3), ValueError, "input"),  # [27, 16] is an unbatched fold
    (lambda: cf.fold(torch.randn(2, 27, 16), (0, 6), 3), ValueError, "output_size"),
    (lambda: cf.fold(torch.randn(2, 27, 16), (6, 6), 3, stride=(1, 0)), ValueError, "stride"),
    (lambda: cf.fold(torch.randn(2, 27, 16).int(), (6, 6), 3), TypeError, "dtype"),
    (lambda: torch.ops.convzoo.unfold(X, [3, 3], [1, 1], [1, 1], [1, 1], "zeros"), ValueError, "padding"),
    (lambda: torch.ops.convzoo.fold(torch.randn(2, 27, 15), [6, 6], [3, 3], [1, 1], [0, 0, 0, 0], [1, 1],
                                    "zeros"), ValueError, "blocks"),
], ids=lambda v: None)
def test_bad_input_raises_naming_the_argument(call, exc, match, path):
    with pytest.raises(exc, match=match):
        call()
