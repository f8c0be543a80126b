"""Inputs as users pass them: unbatched tensors (read as torch reads them), numpy integers as sizes, every
weight layout (hypnettorch's costs one transposing copy, not a strided matmul), torch.autocast (torch's own
casting rules, float64 untouched), meta tensors, and TRITON_INTERPRET changed after the kernels were imported."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import unfoldNd
from problems import TOL
from torch import nn

import convzoo
import convzoo.functional as cf
import convzoo.kernels.local_conv
from convzoo.ops import local_conv as lc_ops


# ---------------------------------------------------------------------------------------------- unbatched
def test_unbatched_unfold_fold_as_torch_reads_them(path):
    x = torch.randn(3, 6, 7, device=path)
    torch.testing.assert_close(convzoo.Unfold((3, 3))(x), nn.Unfold(3)(x), rtol=0, atol=0)
    torch.testing.assert_close(cf.unfold(x, 3, padding=(1, 2), stride=(2, 1)), F.unfold(x, 3, padding=(1, 2),
                                                                                        stride=(2, 1)),
                               rtol=0, atol=0)
    cols = nn.Unfold(3, padding=1)(x)
    torch.testing.assert_close(cf.fold(cols, (6, 7), 3, padding=1), F.fold(cols, (6, 7), 3, padding=1), rtol=0, atol=0)
    # an int kernel on a 3-d input keeps the batched 1-d meaning (unfoldNd's)
    assert convzoo.Unfold(3)(x).shape == (3, 18, 5)
    torch.testing.assert_close(cf.unfold(x, 3), unfoldNd.unfoldNd(x, 3), rtol=0, atol=0)
    # unbatched 1-d and 3-d
    torch.testing.assert_close(cf.unfold(x[0], (3,)), unfoldNd.unfoldNd(x[:1], 3)[0], rtol=0, atol=0)
    v = torch.randn(2, 3, 4, 5, device=path)
    torch.testing.assert_close(cf.unfold(v, (2, 2, 2)), unfoldNd.unfoldNd(v[None], 2)[0], rtol=0, atol=0)


def test_unbatched_local_conv(path):
    x = torch.randn(3, 6, 6, device=path, dtype=torch.float64)
    w = torch.randn(4, 27, 36, device=path, dtype=torch.float64)
    b = torch.randn(4, 36, device=path, dtype=torch.float64)
    y = cf.local_conv(x, w, b, kernel_size=(3, 3), padding=1)
    assert y.shape == (4, 6, 6)
    ref = (torch.einsum("rl,orl->ol", F.unfold(x, 3, padding=1), w) + b).reshape(4, 6, 6)
    torch.testing.assert_close(y, ref, **dict(zip(("atol", "rtol"), TOL[torch.float64])))
    # int geometry: a 3-d input is a batch of 1-d signals; when the weight fits the unbatched 2-d reading,
    # the error names the input and says what to do
    with pytest.raises(ValueError, match=r"input of shape \(3, 6, 6\) is read as a batched 1-d input.*2-tuple"):
        cf.local_conv(x, w, b, kernel_size=3, padding=1)


def test_unbatched_local_conv_module(path):
    layer = convzoo.LocalConv2d(2, 3, (5, 6), 3, stride=(1, 2), padding=1, dtype=torch.float64).to(path)
    x = torch.randn(2, 5, 6, dtype=torch.float64, device=path)
    y = layer(x)
    assert y.shape == (3, 5, 3)
    torch.testing.assert_close(y, layer(x[None])[0], rtol=0, atol=0)
    assert convzoo.LocalConv1d(2, 3, 7, 3)(torch.randn(2, 7)).shape == (3, 5)


# ---------------------------------------------------------------------------------------------- numpy ints
def test_numpy_integers_as_sizes(path):
    x = torch.randn(2, 3, 7, 8, device=path)
    got = cf.unfold(x, np.int64(3), dilation=(np.int32(1), 2), padding=np.int64(1), stride=np.uint8(2))
    torch.testing.assert_close(got, F.unfold(x, 3, dilation=(1, 2), padding=1, stride=2), rtol=0, atol=0)
    cols = F.unfold(x, 2)
    torch.testing.assert_close(cf.fold(cols, (np.int64(7), np.int64(8)), np.int64(2)), F.fold(cols, (7, 8), 2),
                               rtol=0, atol=0)
    torch.testing.assert_close(cf.unfold(x, 3, padding=((np.int64(1), 0), (0, np.int16(2)))),
                               F.unfold(F.pad(x, (0, 2, 1, 0)), 3), rtol=0, atol=0)
    for bad in (True, np.bool_(True), 2.0, np.float64(2)):
        with pytest.raises(TypeError, match="kernel_size must be an int"):
            cf.unfold(x, bad)


def test_numpy_integers_in_modules_are_kept_as_python_ints():
    """Modules keep plain ints, so torch.compile(fullgraph=True) never traces a numpy integer (Dynamo
    reads those as tensors and fails)."""
    u = convzoo.Unfold((np.int64(2), np.int64(2)), padding=np.int64(1), stride=[np.int32(1), 1])
    assert all(type(v) is int for v in (*u.kernel_size, u.padding, *u.stride))
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(torch.compile(u, fullgraph=True, backend="aot_eager")(x), F.unfold(x, 2, padding=1),
                               rtol=0, atol=0)
    layer = convzoo.LocalConv2d(np.int64(3), np.int32(4), (np.int64(5), 5), np.int64(3), padding=np.int64(1))
    assert (layer.in_channels, layer.out_channels, layer.in_size, layer.padding) == (3, 4, (5, 5), 1)
    assert all(type(v) is int for v in (layer.in_channels, layer.out_channels, *layer.in_size, layer.padding))
    assert layer(x).shape == (2, 4, 5, 5)
    with pytest.raises(TypeError, match="in_channels must be an int"):
        convzoo.LocalConv2d(np.bool_(True), 4, 5, 3)


# ---------------------------------------------------------------------------------------------- weight layouts
def test_hypnettorch_layout_costs_one_transposing_copy(path, monkeypatch):
    """A contiguous ``[C_out, R, L]`` weight reaches the op in the fast physical layout ``[L, C_out, R]``
    (copied once), with the same output and gradients as the module layout; a fast-layout weight is not copied."""
    x = torch.randn(2, 3, 5, 6, device=path, dtype=torch.float64)
    w_hyp = torch.randn(4, 27, 30, device=path, dtype=torch.float64)
    w_fast = w_hyp.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    seen = []
    orig = lc_ops.local_conv

    def spy(x, weight, *args):
        seen.append((weight.permute(2, 0, 1).is_contiguous(), weight.data_ptr()))
        return orig(x, weight, *args)

    monkeypatch.setattr(lc_ops, "local_conv", spy)
    outs = []
    for w in (w_hyp, w_fast):
        w = w.detach().requires_grad_()
        y = cf.local_conv(x, w, kernel_size=3, padding=1)
        (dw,) = torch.autograd.grad(y, w, torch.ones_like(y))
        outs.append((y, dw, w))
    assert [fast for fast, _ in seen] == [True, True]
    assert seen[1][1] == w_fast.data_ptr()  # the fast layout is read in place
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)
    assert outs[0][1].shape == w_hyp.shape


# ---------------------------------------------------------------------------------------------- autocast
def test_autocast_follows_torch_rules(path):
    x = torch.randn(2, 3, 5, 6, device=path)
    w = torch.randn(4, 27, 30, device=path) / 5
    with torch.autocast(path, dtype=torch.bfloat16):
        y = cf.local_conv(x, w, kernel_size=3, padding=1)
        y64 = cf.local_conv(x.double(), w.double(), kernel_size=3, padding=1)  # float64 is never cast
        y16 = cf.local_conv(x.half(), w.half(), kernel_size=3, padding=1)  # other floats are, as F.conv2d's
        ref_dtype = F.conv2d(x.half(), torch.randn(4, 3, 3, 3, device=path).half(), padding=1).dtype
    assert y.dtype == torch.bfloat16 and y64.dtype == torch.float64 and y16.dtype == ref_dtype
    ref = torch.einsum("nrl,orl->nol", F.unfold(x.double(), 3, padding=1), w.double()).reshape(2, 4, 5, 6)
    atol, rtol = TOL[torch.bfloat16]
    torch.testing.assert_close(y.double(), ref, atol=4 * atol, rtol=4 * rtol)  # inputs rounded to bf16 too
    torch.testing.assert_close(y64, ref, atol=1e-12, rtol=1e-12)


def test_meta_device_module_and_autocast():
    """Build on 'meta', run on meta tensors (with autocast active elsewhere), then materialise with to_empty."""
    layer = convzoo.LocalConv2d(3, 4, (6, 6), 3, padding=1, device="meta")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 3, 6, 6, device="meta"))
    assert y.shape == (2, 4, 6, 6) and y.device.type == "meta"
    layer = layer.to_empty(device="cpu")
    layer.reset_parameters()
    ref = convzoo.LocalConv2d(3, 4, (6, 6), 3, padding=1)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- interpreter
def test_interpret_set_after_kernel_import_is_a_clear_error():
    code = textwrap.dedent("""
        import os, torch
        import convzoo.functional as cf
        import convzoo.kernels.unfold  # decorated for a GPU: TRITON_INTERPRET is unset
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            cf.unfold(torch.randn(1, 1, 4, 4), 2)
        except RuntimeError as e:
            print("RAISED", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    expected = "RAISED TRITON_INTERPRET is set now but was unset when convzoo's Triton kernels were imported"
    assert expected in out.stdout, out.stdout + out.stderr[-2000:]


def test_replicate_padding_of_an_empty_dim_is_refused_on_every_path(path):
    """One check in the shape math covers the kernels, the plain-torch path and the fakes."""
    x = torch.randn(2, 2, 0, device=path)
    with pytest.raises(ValueError, match="padding_mode='replicate' needs a non-empty input"):
        cf.unfold(x, 1, padding=1, padding_mode="replicate")
    with pytest.raises(ValueError, match="padding_mode='replicate' needs a non-empty input"):
        cf.local_conv(x, torch.randn(3, 2, 2, device=path), kernel_size=1, padding=1, padding_mode="replicate")
    with pytest.raises(ValueError, match="padding_mode='replicate' needs a non-empty input"):
        cf.unfold(x.to("meta"), 1, padding=1, padding_mode="replicate")
    assert cf.unfold(x, 1, padding=1).shape == (2, 2, 2)  # zeros padding of an empty dim is fine


_IN_PLACE_CALLS = {
    "unfold_k1": (lambda x: cf.unfold(x, 1), (2, 3, 5, 5)),
    "unfold_k1_large": (lambda x: cf.unfold(x, 1), (2, 8, 40, 40)),  # the reference's reshape is a view here
    "unfold_k3": (lambda x: cf.unfold(x, 3, padding=1), (2, 3, 5, 5)),
    "fold_1d": (lambda c: cf.fold(c, (7,), 3, padding=1), (2, 9, 7)),  # col2im's result squeezed: a view
    "fold_2d": (lambda c: cf.fold(c, (5, 5), 3, padding=1), (2, 27, 25)),
    "local_conv_2d": (lambda x: cf.local_conv(x, torch.ones(4, 27, 25, dtype=x.dtype, device=x.device),
                                              kernel_size=3, padding=1), (2, 3, 5, 5)),
    "local_conv_1d_unbatched": (lambda x: cf.local_conv(x, torch.ones(4, 9, 5, dtype=x.dtype, device=x.device),
                                                        kernel_size=(3,)), (3, 7)),
}


@pytest.mark.parametrize("name", list(_IN_PLACE_CALLS))
def test_outputs_can_be_modified_in_place_under_autograd(name, path):
    """`y.mul_(2)` after an op (nn.ReLU(inplace=True), `y += x`) is ordinary PyTorch; an output that is a view
    of a temporary would make autograd refuse it on one path and not the other."""
    fn, shape = _IN_PLACE_CALLS[name]
    x = torch.randn(*shape, device=path, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(fn(x).sum(), x)
    y = fn(x)
    y.mul_(2)
    (got,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(got, 2 * want)


def test_layer_then_inplace_relu(path):
    torch.manual_seed(0)
    layer = convzoo.LocalConv2d(3, 4, (6, 6), 3, padding=1).to(path).double()
    x = torch.randn(2, 3, 6, 6, device=path, dtype=torch.float64, requires_grad=True)
    y_ref = torch.relu(layer(x))
    want = torch.autograd.grad(y_ref.sum(), (x, layer.weight_by_position))
    got = torch.autograd.grad(nn.Sequential(layer, nn.ReLU(inplace=True))(x).sum(), (x, layer.weight_by_position))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
