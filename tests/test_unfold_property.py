"""Property: fold is the adjoint of unfold, <unfold(x), c> == <x, fold(c)>, over random geometries."""

import pytest
import torch
from conftest import KERNEL_DEVICE
from hypothesis import given, settings
from hypothesis import strategies as st

import convzoo.functional as cf
import convzoo.kernels.unfold  # noqa: F401  (decorate the kernels now, while TRITON_INTERPRET=1 holds)
from convzoo import _shapes


@st.composite
def geometries(draw):
    nd = draw(st.integers(1, 3))
    size = tuple(draw(st.integers(1, 7)) for _ in range(nd))
    mode = draw(st.sampled_from(_shapes.PADDING_MODES))
    kernel, dil, stride, pad = [], [], [], []
    for n in size:
        k, d = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        cap = {"reflect": n - 1, "circular": n}.get(mode, 3)
        lo, hi = draw(st.integers(0, min(cap, 3))), draw(st.integers(0, min(cap, 3)))
        if n + lo + hi < d * (k - 1) + 1:  # keep the window inside the padded input
            k, d = 1, 1
        kernel.append(k), dil.append(d), stride.append(draw(st.integers(1, 3))), pad.append((lo, hi))
    return size, dict(kernel_size=tuple(kernel), dilation=tuple(dil), padding=tuple(pad),
                      stride=tuple(stride), padding_mode=mode)


def _check_adjoint(size, kw, device):
    x = torch.randn(2, 2, *size, dtype=torch.float64, device=device)
    y = cf.unfold(x, **kw)
    c = torch.randn_like(y)
    lhs = (y * c).sum()
    rhs = (x * cf.fold(c, size, **kw)).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-10)


@settings(max_examples=150, deadline=None)
@given(geom=geometries())
def test_fold_is_adjoint_of_unfold_torch_path(geom):
    size, kw = geom
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        _check_adjoint(size, kw, "cpu")


@settings(max_examples=15, deadline=None)
@given(geom=geometries())
def test_fold_is_adjoint_of_unfold_kernels(geom):
    _check_adjoint(*geom, KERNEL_DEVICE)
