"""local_conv as custom ops: opcheck on all three ops, fp64 gradcheck and gradgradcheck,
torch.compile(fullgraph=True, dynamic=True) of a small network with recompiles counted, and clear
errors for bad input."""

import pytest
import torch
import torch._dynamo.testing
from compile_checks import assert_compiles_once
from torch import nn

import convzoo
import convzoo.functional as cf
import convzoo.kernels.local_conv  # decorate the kernels while TRITON_INTERPRET is set)

# (input shape, kernel_size, dilation, flat padding, stride, padding_mode), C_out = 3
GEOMS = {
    "2d_K2x3_S2_P1-0": ((2, 2, 4, 5), [2, 3], [1, 1], [1, 0, 1, 1], [2, 1], "zeros"),
    "1d_K2_D2_reflect": ((2, 2, 7), [2], [2], [1, 1], [1], "reflect"),
    "3d_K2_replicate": ((1, 2, 2, 2, 3), [1, 2, 2], [1, 1, 1], [0, 0, 1, 0, 0, 1], [1, 1, 1], "replicate"),
}
C_OUT = 3


def _setup(key, device, dtype=torch.float32, bias="pixel", permuted=False, requires_grad=False):
    shape, ks, dil, pad, st, mode = GEOMS[key]
    x = torch.randn(shape, device=device, dtype=dtype)
    geom = [ks, dil, pad, st, mode]
    L = convzoo.functional.unfold(x, ks, dil, [(pad[2 * i], pad[2 * i + 1]) for i in range(len(ks))], st,
                                  padding_mode=mode).shape[-1]
    R = shape[1] * torch.tensor(ks).prod().item()
    w = torch.randn(C_OUT, R, L, device=device, dtype=dtype)
    if permuted:
        w = w.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        x = x.transpose(1, -1).contiguous().transpose(1, -1)
    b = {"pixel": torch.randn(C_OUT, L, device=device, dtype=dtype),
         "channel": torch.randn(C_OUT, device=device, dtype=dtype), None: None}[bias]
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, b, geom


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("permuted", [False, True], ids=["contiguous", "permuted"])
@pytest.mark.parametrize("bias", ["pixel", "channel", None], ids=["bias_pixel", "bias_channel", "no_bias"])
def test_opcheck_local_conv(bias, permuted, requires_grad, path):
    x, w, b, geom = _setup("2d_K2x3_S2_P1-0", path, bias=bias, permuted=permuted, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.convzoo.local_conv.default, (x, w, b, *geom))


@pytest.mark.parametrize("key, requires_grad", [  # with grad, 5-7 s each of the 2-d and 3-d under the interpreter
    pytest.param(k, g, id=f"{k}-{'grad' if g else 'nograd'}",
                 marks=pytest.mark.slow_interpreted if g and not k.startswith("1d") else ())
    for k in GEOMS for g in (False, True)])
def test_opcheck_backward_ops(key, requires_grad, path):
    x, w, _, geom = _setup(key, path, permuted=True)
    y = torch.ops.convzoo.local_conv(x, w, None, *geom)
    gy = torch.randn_like(y).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.convzoo.local_conv_grad_input.default,
                          (gy, w.requires_grad_(requires_grad), list(x.shape[2:]), *geom))
    torch.library.opcheck(torch.ops.convzoo.local_conv_grad_weight.default,
                          (gy, x.requires_grad_(requires_grad), *geom))


@pytest.mark.parametrize("key", [k if k.startswith("1d") else pytest.param(k, marks=pytest.mark.slow_interpreted)
                                 for k in GEOMS])  # 10-24 s each under the interpreter
def test_gradcheck_fp64(key, path):
    x, w, b, geom = _setup(key, path, torch.float64, bias="channel", requires_grad=True)

    def f(x, w, b):
        return torch.ops.convzoo.local_conv(x, w, b, *geom)

    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), fast_mode=True)


class _Net(nn.Module):
    """LocalConv2d → ReLU → Flatten → Linear."""

    def __init__(self):
        super().__init__()
        self.local = convzoo.LocalConv2d(2, 3, (5, 6), 3, stride=(1, 2), padding="same")
        self.head = nn.Linear(3 * 5 * 3, 4)

    def forward(self, x):
        return self.head(torch.relu(self.local(x)).flatten(1))


def _fwd_bwd(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().sum().backward()
    return y.detach(), x.grad, model.local.weight_by_position.grad, model.local.bias.grad, model.head.weight.grad


@torch.fx.experimental._config.patch(use_duck_shape=False)  # N == C_in must not specialise N
@torch._dynamo.config.patch(error_on_recompile=True)
def test_compile_fullgraph_dynamic_no_recompile(kernel_device):
    torch._dynamo.reset()
    model = _Net().to(kernel_device)
    # N = 1 would be specialised
    assert_compiles_once(model, [torch.randn(n, 2, 5, 6, device=kernel_device) for n in (2, 3, 5)], _fwd_bwd)


@pytest.mark.slow
def test_compile_inductor(kernel_device):
    """Inductor around the op and its backward ops, with a per-channel bias."""
    torch._dynamo.reset()
    x, w, b, _ = _setup("2d_K2x3_S2_P1-0", kernel_device, bias="channel", requires_grad=True)

    def f(x, w, b):
        return torch.sigmoid(cf.local_conv(x, w, b, kernel_size=(2, 3), padding=((1, 0), (1, 1)), stride=(2, 1)))

    ref = f(x, w, b)
    grads_ref = torch.autograd.grad(ref.sum(), (x, w, b))
    got = torch.compile(f, fullgraph=True)(x, w, b)
    grads = torch.autograd.grad(got.sum(), (x, w, b))
    torch.testing.assert_close(got, ref)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- bad input
X = torch.randn(2, 3, 6, 6)
W = torch.randn(4, 27, 36)  # kernel 3, padding 1: L = 36


def lc(x=X, w=W, b=None, **kw):
    return cf.local_conv(x, w, b, **{"kernel_size": 3, "padding": 1, **kw})


@pytest.mark.parametrize("call, exc, match", [
    (lambda: lc(w=torch.randn(4, 26, 36)), ValueError, r"weight.shape\[1\]=26 must be in_channels\*prod"),
    (lambda: lc(w=torch.randn(4, 27, 35)), ValueError, r"weight.shape\[2\]=35 must be the number of output"),
    (lambda: lc(padding=0), ValueError, r"weight.shape\[2\]=36 must be the number of output positions L=16"),
    (lambda: lc(x=torch.randn(2, 2, 6, 6)), ValueError, r"weight.shape\[1\]=27 must be in_channels"),
    (lambda: lc(kernel_size=(3, 2)), ValueError, r"weight.shape\[1\]"),
    (lambda: lc(w=torch.randn(4, 27 * 36)), ValueError, "weight must be"),
    (lambda: lc(w=W.double()), TypeError, "weight has dtype"),
    (lambda: lc(w=W.int()), TypeError, "weight must have a floating dtype"),
    (lambda: lc(w=W.numpy()), TypeError, "weight must be a torch.Tensor"),
    (lambda: lc(b=torch.randn(5)), ValueError, r"bias.shape\[0\]=5 must be out_channels"),
    (lambda: lc(b=torch.randn(4, 35)), ValueError, r"bias.shape\[1\]=35"),
    (lambda: lc(b=torch.randn(4, 6, 6)), ValueError, "bias must be"),
    (lambda: lc(b=torch.randn(4).half()), TypeError, "bias has dtype"),
    (lambda: lc(x=torch.randn(6, 6)), ValueError, "input must be"),
    (lambda: lc(stride=0), ValueError, "stride"),
    (lambda: lc(padding_mode="wrap"), ValueError, "padding_mode"),
    (lambda: torch.ops.convzoo.local_conv_grad_input(torch.randn(2, 5, 6, 6), W, [6, 6], [3, 3], [1, 1],
                                                     [1, 1, 1, 1], [1, 1], "zeros"), ValueError, "C_out"),
    (lambda: torch.ops.convzoo.local_conv_grad_weight(torch.randn(3, 4, 6, 6), X, [3, 3], [1, 1],
                                                      [1, 1, 1, 1], [1, 1], "zeros"), ValueError, "batch size"),
    (lambda: torch.ops.convzoo.local_conv_grad_input(torch.randn(2, 4, 6, 6).half(), W, [6, 6], [3, 3], [1, 1],
                                                     [1, 1, 1, 1], [1, 1], "zeros"), TypeError, "grad has dtype"),
    (lambda: torch.ops.convzoo.local_conv_grad_weight(torch.randn(2, 4, 6, 6).double(), X, [3, 3], [1, 1],
                                                      [1, 1, 1, 1], [1, 1], "zeros"), TypeError, "grad has dtype"),
], ids=lambda v: None)
def test_bad_input_raises_naming_the_argument(call, exc, match, path):
    with pytest.raises(exc, match=match):
        call()
