"""Properties of local conv over random geometries (every rank, padding form and mode):
the forward is einsum(unfold(x), W), and the two backward ops are its adjoints,
<y(x, W), g> == <x, grad_input(g, W)> == <W, grad_weight(g, x)>, with the bias gradient Σ_n g."""

import pytest
import torch
from conftest import KERNEL_DEVICE
from hypothesis import given, settings
from hypothesis import strategies as st
from test_unfold_property import geometries

import convzoo.functional as cf
import convzoo.kernels.local_conv  # noqa: F401  (decorate the kernels now, while TRITON_INTERPRET=1 holds)


def _check(size, kw, c_in, c_out, n, device):
    x = torch.randn(n, c_in, *size, dtype=torch.float64, device=device)
    cols = cf.unfold(x, **kw)
    w = torch.randn(c_out, cols.shape[1], cols.shape[2], dtype=torch.float64, device=device)
    b = torch.randn(c_out, cols.shape[2], dtype=torch.float64, device=device)
    y = cf.local_conv(x, w, b, **kw)
    ref = torch.einsum("nkl,okl->nol", cols, w) + b
    torch.testing.assert_close(y.reshape(ref.shape), ref, atol=1e-10, rtol=1e-10)

    g = torch.randn_like(y)
    ks, dil, pad, stride, mode = cf._geometry_args(len(size), kw["kernel_size"], kw["dilation"], kw["padding"],
                                                   kw["stride"], size, kw["padding_mode"])
    geom = (ks, dil, pad, stride, mode)
    dx = torch.ops.convzoo.local_conv_grad_input(g, w, list(size), *geom)
    dw, db = torch.ops.convzoo.local_conv_grad_weight(g, x, *geom)
    lhs = ((y - b.view(1, *y.shape[1:])) * g).sum()
    torch.testing.assert_close((x * dx).sum(), lhs, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close((w * dw).sum(), lhs, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(db, g.sum(0).reshape(db.shape), atol=1e-12, rtol=1e-12)


channels = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))


@settings(max_examples=100, deadline=None)
@given(geom=geometries(), chans=channels)
def test_local_conv_properties_torch_path(geom, chans):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        _check(*geom, *chans, "cpu")


@settings(max_examples=10, deadline=None)
@given(geom=geometries(), chans=channels)
def test_local_conv_properties_kernels(geom, chans):
    _check(*geom, *chans, KERNEL_DEVICE)

