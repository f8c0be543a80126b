"""The coactivation correlation kernel (:func:`convzoo.kernels.coactivation.coactivation_correlation`) against the
plain-torch path (:func:`convzoo.reference.coactivation` with ``mode='correlation'``): geometry, groups, padding
modes, dtypes, batch chunks, position shares, degenerate batches, determinism, configs, bad input."""

from __future__ import annotations

import pytest
import torch

from convzoo import _shapes, autotune, reference
from convzoo.autotune import Config
from convzoo.kernels import coactivation as kernels
from tests.problems import TOL

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _case(in_size, c_in, c_out, kernel, stride=1, padding=None, dilation=1, groups=1, padding_mode="zeros", n=5,
          dtype=torch.float64, seed=0):
    nd = len(in_size)
    ks, st, dil = [kernel] * nd, [stride] * nd, [dilation] * nd
    pad = padding if padding is not None else [0] * (2 * nd)
    g = _shapes.geometry(tuple(in_size), tuple(ks), dil, pad, st, padding_mode)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, *in_size, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(n, c_out, *g.out_size, generator=gen, dtype=torch.float64).to(dtype)
    ws = [c_out, c_in // groups, *ks]
    return x, y, ws, (st, pad, dil, groups, padding_mode)


def _want(x, y, ws, geom):
    return reference.coactivation(x, y, ws, *geom, 0.0, 0.0, "correlation")


def _close(got, want, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


CASES = {
    "1d_K3_P1": dict(in_size=(9,), c_in=3, c_out=5, kernel=3, padding=[1, 1]),
    "1d_K3_S2_D2_Plohi": dict(in_size=(11,), c_in=2, c_out=3, kernel=3, stride=2, dilation=2, padding=[0, 3]),
    "2d_K3_S2_P1": dict(in_size=(6, 5), c_in=3, c_out=4, kernel=3, stride=2, padding=[1, 1, 1, 1]),
    "2d_K2_D2_Plohi_G2": dict(in_size=(6, 5), c_in=4, c_out=6, kernel=2, dilation=2, padding=[1, 0, 0, 2],
                              groups=2),
    "2d_K3_depthwise": dict(in_size=(5, 5), c_in=3, c_out=3, kernel=3, padding=[1, 1, 1, 1], groups=3),
    "3d_K2_P1": dict(in_size=(3, 4, 3), c_in=2, c_out=3, kernel=2, padding=[1, 0, 0, 1, 1, 1]),
    "2d_K3_reflect": dict(in_size=(5, 6), c_in=2, c_out=3, kernel=3, padding=[2, 1, 1, 2], padding_mode="reflect"),
    "2d_K3_circular": dict(in_size=(5, 4), c_in=2, c_out=3, kernel=3, padding=[1, 1, 2, 0],
                           padding_mode="circular"),
    "2d_K3_replicate_S2": dict(in_size=(5, 6), c_in=2, c_out=3, kernel=3, stride=2, padding=[1, 2, 1, 1],
                               padding_mode="replicate"),
}


@pytest.mark.parametrize("key", CASES)
def test_matches_reference_float64(key):
    x, y, ws, geom = _case(**CASES[key])
    _close(kernels.coactivation_correlation(x, y, ws, *geom), _want(x, y, ws, geom), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_against_float64(dtype):
    x, y, ws, geom = _case(**CASES["2d_K2_D2_Plohi_G2"], n=7)
    got = kernels.coactivation_correlation(x.to(dtype), y.to(dtype), ws, *geom)
    assert got.dtype == dtype
    _close(got.double(), _want(x, y, ws, geom), dtype)


def _cfg(bo=16, bk=16, bn=16, split=1):
    return Config({"BLOCK_O": bo, "BLOCK_K": bk, "BLOCK_N": bn, "SPLIT": split}, num_warps=4, num_stages=2)


@pytest.mark.parametrize("split", [2, 4, 64])  # 64 > L = 30: the shares past the positions hold none
def test_batch_chunks_and_position_shares(split):
    # N = 37: two full BLOCK_N = 16 chunks and a partial one; several o-tiles and k-tiles too
    x, y, ws, geom = _case((6, 5), c_in=3, c_out=20, kernel=3, padding=[1, 1, 1, 1], n=37)
    got = kernels.coactivation_correlation(x, y, ws, *geom, config=_cfg(split=split))
    _close(got, _want(x, y, ws, geom), torch.float64)


def test_fewer_than_two_samples_is_zero():
    for n in (0, 1):
        x, y, ws, geom = _case((6,), c_in=2, c_out=3, kernel=3, n=n)
        got = kernels.coactivation_correlation(x, y, ws, *geom)
        assert got.shape == tuple(ws) and torch.equal(got, torch.zeros(ws, dtype=torch.float64))


def test_constant_channel_scores_zero():
    x, y, ws, geom = _case((6, 5), c_in=3, c_out=4, kernel=3, padding=[1, 1, 1, 1])
    x[:, 1] = 0.3  # constant over the batch: std 0, its connections score exactly 0
    y[:, 2] = -1.7
    got = kernels.coactivation_correlation(x, y, ws, *geom)
    assert torch.equal(got[:, 1], torch.zeros_like(got[:, 1])) and torch.equal(got[2], torch.zeros_like(got[2]))
    assert (got[:2, 0] > 0).all()
    _close(got, _want(x, y, ws, geom), torch.float64)


def test_out_accumulates():
    x, y, ws, geom = _case(**CASES["2d_K3_S2_P1"])
    out = torch.ones(ws, dtype=torch.float64)
    assert kernels.coactivation_correlation(x, y, ws, *geom, out=out) is out
    _close(out, 1 + _want(x, y, ws, geom), torch.float64)


def test_deterministic():
    x, y, ws, geom = _case((6, 5), c_in=3, c_out=4, kernel=3, padding=[1, 1, 1, 1], n=9, dtype=torch.float32)
    first = kernels.coactivation_correlation(x, y, ws, *geom, config=_cfg(split=4))
    assert torch.equal(first, kernels.coactivation_correlation(x, y, ws, *geom, config=_cfg(split=4)))


def test_non_contiguous_inputs():
    x, y, ws, geom = _case(**CASES["2d_K3_S2_P1"])
    xt, yt = x.transpose(2, 3).contiguous().transpose(2, 3), y[:, :, :, None].expand(-1, -1, -1, 2, -1)[:, :, :, 0]
    assert not xt.is_contiguous()
    _close(kernels.coactivation_correlation(xt, yt, ws, *geom), _want(x, y, ws, geom), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_configs_in_space(dtype):
    spec = autotune.get_spec("coactivation_correlation")
    for dims in ({"N": 64, "L": 1024, "O": 64, "K": 576}, {"N": 2, "L": 1, "O": 1, "K": 1},
                 {"N": 256, "L": 64, "O": 512, "K": 4608}):
        spec.check(spec.default_config(dims, dtype, False), dtype, dims)
        # the interpreter's default only needs power-of-2 tiles (its largest tiles are outside the GPU's budgets)
        for name, v in spec.default_config(dims, dtype, True).meta.items():
            lo, hi = spec.space.tiles[name]
            assert v & (v - 1) == 0 and lo <= v <= hi, (name, v)
        cands = list(spec.candidates(dims, dtype))
        assert cands
        for cfg in cands:
            spec.check(cfg, dtype, dims)
            if dtype != torch.float64:  # tl.dot tiles ≥ 16 on NVIDIA
                assert min(cfg.meta["BLOCK_O"], cfg.meta["BLOCK_K"], cfg.meta["BLOCK_N"]) >= 16


def test_bad_input():
    x, y, ws, geom = _case(**CASES["2d_K3_S2_P1"])
    with pytest.raises(TypeError, match="y has dtype"):
        kernels.coactivation_correlation(x, y.float(), ws, *geom)
    with pytest.raises(ValueError, match="y"):
        kernels.coactivation_correlation(x, y[:, :, :1], ws, *geom)
    with pytest.raises(ValueError, match="weight_shape"):
        kernels.coactivation_correlation(x, y, [ws[0], ws[1] + 1, *ws[2:]], *geom)
    with pytest.raises(ValueError, match="out must be"):
        kernels.coactivation_correlation(x, y, ws, *geom, out=torch.zeros(3))
    with pytest.raises(TypeError, match="x"):
        kernels.coactivation_correlation(x.long(), y, ws, *geom)
