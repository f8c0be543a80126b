"""coactivation: ``mode='count'`` against a transcription of the Sparse-CNN seed's brute-force loop ``f3`` and
against ``torch.nn.grad.convNd_weight`` of the binarized tensors (padding built with ``F.pad``);
``mode='correlation'`` against a float64 transcription of the seed's ``f2b``; ``out=`` accumulation, opcheck,
torch.compile with recompiles counted, meta tensors, empty batches, memory, and clear errors for bad input.

The seed (``shared/seeds/002_d42c469d49bd87de.txt``) calls a unit active when ``sigmoid(t) > 0.5``, i.e.
``t > 0``: the transcriptions take ``t > threshold`` with the thresholds as parameters.
"""

import itertools
import math

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from problems import TOL

import convzoo.functional as cf
from convzoo import reference
from convzoo.ops import coactivation as ops_coactivation
from convzoo.tools.bench.memory import peak_bytes

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}

# id: (x shape, weight shape, stride, padding, dilation, groups)
CASES = {
    "1d_S2_P1": ((2, 4, 11), (6, 4, 3), 2, 1, 1, 1),
    "1d_D2_G2_lohi": ((2, 4, 9), (4, 2, 3), 1, [(2, 1)], 2, 2),
    "2d_P1_G2": ((2, 4, 6, 7), (6, 2, 3, 3), 1, 1, 1, 2),
    "2d_same_even_kernel": ((3, 3, 5, 6), (4, 3, 2, 3), 1, "same", 1, 1),
    "2d_S3_depthwise": ((2, 3, 8, 7), (6, 1, 3, 2), 3, (1, 2), 1, 3),
    "2d_K1_valid": ((2, 5, 4, 4), (3, 5, 1, 1), 1, "valid", 1, 1),
    "2d_S2_D2_lohi": ((2, 2, 7, 8), (3, 2, 2, 3), (2, 1), [(0, 2), (3, 1)], (2, 1), 1),
    "3d_S2_P1_G2": ((2, 4, 5, 4, 5), (4, 2, 3, 3, 3), 2, 1, 1, 2),
    "3d_D2": ((2, 2, 5, 5, 4), (3, 2, 2, 2, 2), 1, 1, 2, 1),
}
# the cases small enough for the Python loops of the seed transcriptions
SMALL = ["1d_S2_P1", "1d_D2_G2_lohi", "2d_P1_G2", "2d_same_even_kernel", "2d_S3_depthwise", "2d_S2_D2_lohi",
         "3d_D2"]


def _tuple(v, nd):
    return (v,) * nd if isinstance(v, int) else tuple(v)


def _pairs(padding, w_shape, dilation):
    """The (lo, hi) padding per dim, resolved by hand (torch's 'same': the odd element on the high side)."""
    nd = len(w_shape) - 2
    if padding == "same":
        return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(w_shape[2:], _tuple(dilation, nd))]
    if padding == "valid":
        return [(0, 0)] * nd
    if isinstance(padding, list):
        return padding
    return [(p, p) for p in _tuple(padding, nd)]


def _pad(x, pairs, mode="zeros"):
    flat = [v for lo, hi in reversed(pairs) for v in (lo, hi)]
    return F.pad(x, flat, mode="constant" if mode == "zeros" else mode)


def _case(key, dtype=torch.float64, padding_mode="zeros", n=None):
    """``x``, ``y = convNd(x, w) + noise`` (the shape a convolution gives) and the geometry kwargs."""
    xs, ws, s, p, d, g = CASES[key]
    xs = (n, *xs[1:]) if n is not None else xs
    x = torch.randn(xs, dtype=dtype)
    pairs = _pairs(p, ws, d)
    y = CONV[len(ws) - 2](_pad(x, pairs, padding_mode), torch.randn(ws, dtype=dtype), None, s, 0, d, g)
    y = y + 0.3 * torch.randn_like(y)
    return x, y, ws, {"stride": s, "padding": p, "dilation": d, "groups": g, "padding_mode": padding_mode}


def _source(i, size, mode):
    """The input index that padded index ``i`` reads (F.pad's modes), None for zero padding."""
    if 0 <= i < size:
        return i
    if mode == "zeros":
        return None
    if mode == "circular":
        return i % size
    if mode == "replicate":
        return min(max(i, 0), size - 1)
    return -i if i < 0 else 2 * (size - 1) - i  # reflect


def _taps(x_shape, y_shape, w_shape, stride, padding, dilation, padding_mode):
    """For every (output position l, tap k): the input index per dim, or None where it lands in zero padding
    (the seed's ``get_indeces_of_input_and_filter``, with stride, dilation, (lo, hi) padding and modes)."""
    nd = len(w_shape) - 2
    st, dil = _tuple(stride, nd), _tuple(dilation, nd)
    lo = [a for a, _ in _pairs(padding, w_shape, dilation)]
    out = {}
    for l in itertools.product(*(range(e) for e in y_shape[2:])):
        for k in itertools.product(*(range(e) for e in w_shape[2:])):
            idx = [_source(l[i] * st[i] - lo[i] + k[i] * dil[i], x_shape[2 + i], padding_mode) for i in range(nd)]
            out[l, k] = None if None in idx else tuple(idx)
    return out


def seed_f3(x, y, w_shape, stride, padding, dilation, groups, padding_mode="zeros", x_threshold=0.0,
            y_threshold=0.0):
    """The seed's brute force ``f3``: for every sample, output unit and connection, +1 where both ends are
    active; a tap landing in zero padding is skipped (``f3`` only visits real input indices). Groups: connection
    ``(o, c)`` reads input channel ``g(o)·C_in/G + c``."""
    taps = _taps(x.shape, y.shape, w_shape, stride, padding, dilation, padding_mode)
    xl, yl = x.tolist(), y.tolist()
    cg, og = w_shape[1], w_shape[0] // groups
    h = {}
    for b, o in itertools.product(range(x.shape[0]), range(w_shape[0])):
        for (l, k), idx in taps.items():
            unit_1 = yl[b][o]
            for i in l:
                unit_1 = unit_1[i]
            if idx is None or not unit_1 > y_threshold:
                continue
            for c in range(cg):
                unit_2 = xl[b][(o // og) * cg + c]
                for i in idx:
                    unit_2 = unit_2[i]
                if unit_2 > x_threshold:
                    h[(o, c, *k)] = h.get((o, c, *k), 0) + 1
    out = torch.zeros(w_shape)
    for key, v in h.items():
        out[key] = v
    return out


def seed_f2b(x, y, w_shape, stride, padding, dilation, groups, padding_mode="zeros"):
    """The seed's ``f2b`` in float64, one connection at a time: ``s1`` the values that connection's input takes
    at each output position (its stacked one-hot convolution: 0 in zero padding), ``s2`` the output channel's,
    then the seed's own lines (mean, ``torch.std``, population covariance over their product, 0 where a std is
    0, ``abs``, mean over positions)."""
    x, y = x.double(), y.double()
    taps = _taps(x.shape, y.shape, w_shape, stride, padding, dilation, padding_mode)
    n, cg, og = x.shape[0], w_shape[1], w_shape[0] // groups
    positions = list(itertools.product(*(range(e) for e in y.shape[2:])))
    out = torch.zeros(w_shape, dtype=torch.float64)
    for o, c in itertools.product(range(w_shape[0]), range(cg)):
        for k in itertools.product(*(range(e) for e in w_shape[2:])):
            s1 = torch.zeros(n, len(positions), dtype=torch.float64)
            for j, l in enumerate(positions):
                idx = taps[l, k]
                if idx is not None:
                    s1[:, j] = x[(slice(None), (o // og) * cg + c, *idx)]
            s2 = y[:, o].reshape(n, -1)
            mu_in, mu_out = s1.mean(dim=0), s2.mean(dim=0)
            std_in, std_out = s1.std(dim=0), s2.std(dim=0)
            corr = ((s1 - mu_in) * (s2 - mu_out)).mean(dim=0) / (std_in * std_out)
            corr[torch.where((std_in == 0) | (std_out == 0))] = 0
            out[(o, c, *k)] = corr.abs().mean()
    return out


def binarized_conv_weight(x, y, w_shape, stride, padding, dilation, groups, padding_mode="zeros", x_threshold=0.0,
                          y_threshold=0.0):
    """``convNd_weight`` of the binarized tensors, binarized BEFORE the padding (F.pad), as issue 13 states it."""
    xb = _pad((x > x_threshold).float(), _pairs(padding, w_shape, dilation), padding_mode)
    return CONV_WEIGHT[len(w_shape) - 2](xb, w_shape, (y > y_threshold).float(), stride, 0, dilation, groups)


# ---------------------------------------------------------------------------------------------- count
@pytest.mark.parametrize("key", SMALL)
def test_count_matches_the_seed_brute_force(key, path):
    """Both paths: the fused-threshold grad-weight kernel (CUDA, or the interpreter) and the plain-torch path."""
    x, y, ws, geom = _case(key)
    got = cf.coactivation(x.to(path), y.to(path), ws, **geom).cpu()
    assert got.dtype == torch.float32 and got.shape == ws
    assert torch.equal(got, seed_f3(x, y, ws, **geom))


@pytest.mark.parametrize("key", list(CASES))
@pytest.mark.parametrize("thresholds", [(0.0, 0.0), (0.3, -0.2), (-0.5, 0.7)], ids=["t0", "tpos", "tneg"])
def test_count_is_the_weight_gradient_of_the_binarized_tensors(key, thresholds, path):
    x, y, ws, geom = _case(key, torch.float32)
    tx, ty = thresholds
    got = cf.coactivation(x.to(path), y.to(path), ws, **geom, x_threshold=tx, y_threshold=ty).cpu()
    assert torch.equal(got, binarized_conv_weight(x, y, ws, **geom, x_threshold=tx, y_threshold=ty))


def test_negative_x_threshold_keeps_zero_padding_inactive(path):
    """θ_x < 0: a padded 0 would be 'active' if the padded input were binarized; it is not read at all. The
    naive order (pad, then binarize) gives another count here, so the test can tell them apart."""
    x, y, ws, geom = _case("2d_P1_G2")
    x, y = x.to(path), y.to(path)
    got = cf.coactivation(x, y, ws, **geom, x_threshold=-0.5)
    assert torch.equal(got, seed_f3(x, y, ws, **geom, x_threshold=-0.5))
    naive = torch.nn.grad.conv2d_weight((F.pad(x, [1, 1, 1, 1]) > -0.5).float(), ws, (y > 0).float(), 1, 0, 1, 2)
    got, naive = got.cpu(), naive.cpu()
    assert not torch.equal(got, naive)
    # every input active: the count is the number of (sample, position) pairs whose tap reads a real pixel
    every = cf.coactivation(x, y, ws, **geom, x_threshold=-math.inf, y_threshold=-math.inf).cpu()
    assert every[0, 0, 1, 1] == 2 * 6 * 7 and every[0, 0, 0, 0] == 2 * 5 * 6


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("key", ["1d_D2_G2_lohi", "2d_P1_G2", "2d_same_even_kernel"])
def test_count_with_padding_modes_reads_the_copied_values(key, padding_mode):
    """A padded position reads the input value it copies (as nn.Conv2d(padding_mode=...)'s convolution)."""
    x, y, ws, geom = _case(key, padding_mode=padding_mode)
    got = cf.coactivation(x, y, ws, **geom, x_threshold=-0.1)
    assert torch.equal(got, seed_f3(x, y, ws, **geom, x_threshold=-0.1))
    assert torch.equal(got, binarized_conv_weight(x, y, ws, **geom, x_threshold=-0.1))


@pytest.mark.parametrize("key", ["1d_D2_G2_lohi", "2d_S3_depthwise", "2d_S2_D2_lohi", "3d_S2_P1_G2"])
def test_count_cpu_int8_path_in_chunks_and_its_fp32_fallback(key, monkeypatch):
    """The CPU path counts with exact int8 matmuls (taken here: spied), in batch chunks (one sample at a time
    below) or, without ``torch._int_mm``, with the fp32 weight-gradient conv: the same counts every way."""
    from convzoo import _compat

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the plain-torch (CPU) path
    x, y, ws, geom = _case(key, torch.float32)
    want = binarized_conv_weight(x, y, ws, **geom, x_threshold=0.1, y_threshold=-0.1)
    calls = []
    mm = _compat.int8_mm
    monkeypatch.setattr(_compat, "int8_mm", lambda a, b: calls.append(a.shape) or mm(a, b))
    assert torch.equal(cf.coactivation(x, y, ws, **geom, x_threshold=0.1, y_threshold=-0.1), want) and calls
    monkeypatch.setattr(reference, "_COUNT_CHUNK_BYTES", 1)
    calls.clear()
    assert torch.equal(cf.coactivation(x, y, ws, **geom, x_threshold=0.1, y_threshold=-0.1), want)
    assert len(calls) == x.shape[0] * geom.get("groups", 1)  # one sample per chunk
    monkeypatch.setattr(_compat, "int8_mm", None)
    assert torch.equal(cf.coactivation(x, y, ws, **geom, x_threshold=0.1, y_threshold=-0.1), want)


def test_count_ignores_nan_and_reads_any_dtype_and_layout():
    """NaN is never active; fp16/bf16 inputs (and y in another dtype, as under autocast) give the same count
    as their fp32 values; a channels-last / permuted x reads the same."""
    x, y, ws, geom = _case("2d_P1_G2", torch.float32)
    x[0, 1, 2, 3] = float("nan")
    y[1, 2, 3, 4] = float("nan")
    want = seed_f3(x, y, ws, **geom)
    assert torch.equal(cf.coactivation(x, y, ws, **geom), want)
    xh, yb = x.half(), y.bfloat16()
    assert torch.equal(cf.coactivation(xh, yb, ws, **geom), seed_f3(xh.float(), yb.float(), ws, **geom))
    xc = x.to(memory_format=torch.channels_last)
    assert torch.equal(cf.coactivation(xc, y.transpose(2, 3).contiguous().transpose(2, 3), ws, **geom), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the count stays exact (fp32 inside the op)
        assert torch.equal(cf.coactivation(x, y, ws, **geom), want)


def test_thresholds_are_compared_in_fp32_for_half_inputs():
    """The bf16 value 0.10009765625 is above 0.10005, but not above 0.10005 rounded to bf16 (that same value, which
    ``xb > 0.10005`` compares with): the comparison is in fp32, and the count is that of the exact values."""
    x, y, ws, geom = _case("2d_P1_G2", torch.float32)
    x[:, :, ::2] = 0.10009765625
    xb = x.bfloat16()
    got = cf.coactivation(xb, y, ws, **geom, x_threshold=0.10005)
    assert torch.equal(got, seed_f3(xb.double(), y, ws, **geom, x_threshold=0.10005))
    rounded = torch.nn.grad.conv2d_weight((xb > 0.10005).float(), ws, (y > 0).float(), 1, 1, 1, 2)
    assert not torch.equal(got, rounded)


def test_unbatched_is_a_batch_of_one():
    x, y, ws, geom = _case("2d_P1_G2", n=1)
    assert torch.equal(cf.coactivation(x[0], y[0], ws, **geom), cf.coactivation(x, y, ws, **geom))
    with pytest.raises(ValueError, match="y must be unbatched"):
        cf.coactivation(x[0], y, ws, **geom)


# ---------------------------------------------------------------------------------------------- correlation
@pytest.mark.parametrize("key", SMALL)
def test_correlation_matches_the_seed_f2b(key):
    x, y, ws, geom = _case(key, n=5)
    got = cf.coactivation(x, y, ws, **geom, mode="correlation")
    assert got.dtype == torch.float64 and got.shape == ws
    torch.testing.assert_close(got, seed_f2b(x, y, ws, **geom), rtol=1e-12, atol=1e-12)


def test_correlation_zero_std_channels_score_zero():
    """A dead input channel, a constant output channel (0.5: the seed's std is exactly 0 too), a partly constant
    input and zero padding: the terms whose std is 0 are 0, as the seed sets them."""
    x, y, ws, geom = _case("2d_P1_G2", n=4)
    x[:, 1] = 0.0  # dead input channel
    x[:, 2, :3] = 1.5  # constant over the batch at some positions only
    y[:, 4] = 0.5  # constant output channel
    got = cf.coactivation(x, y, ws, **geom, mode="correlation")
    torch.testing.assert_close(got, seed_f2b(x, y, ws, **geom), rtol=1e-12, atol=1e-12)
    # groups=2: outputs 0-2 read input channels 0-1, outputs 3-5 channels 2-3
    assert (got[4] == 0).all() and (got[:3, 1] == 0).all() and (got[[3, 5]] != 0).all()


def test_correlation_constant_is_detected_exactly():
    """Three samples of 0.1: their float64 mean is not 0.1, so torch.std gives 1.7e-17, not 0, and a rule on the
    computed std would score rounding noise; the constant is detected as such and scores exactly 0."""
    x, y, ws, geom = _case("1d_S2_P1", n=3)
    x[:, 2] = 0.1
    assert x[:, 2, 0].std() != 0
    got = cf.coactivation(x, y, ws, **geom, mode="correlation")
    assert (got[:, 2] == 0).all() and (got[:, [0, 1, 3]] != 0).all()
    torch.testing.assert_close(got, seed_f2b(x, y, ws, **geom), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("key", ["1d_D2_G2_lohi", "2d_same_even_kernel"])
@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_correlation_with_padding_modes(key, padding_mode):
    x, y, ws, geom = _case(key, n=4, padding_mode=padding_mode)
    torch.testing.assert_close(cf.coactivation(x, y, ws, **geom, mode="correlation"),
                               seed_f2b(x, y, ws, **geom), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_correlation_low_precision_against_float64(dtype):
    """fp32 accumulation for fp32/bf16 inputs, the result in x's dtype; inputs far from zero (mean 1e3, spread
    1): the centred computation has no E[x²]-E[x]² cancellation."""
    x, y, ws, geom = _case("3d_S2_P1_G2", n=6)
    x, y = x + 1e3, y - 1e3
    want = seed_f2b(x.to(dtype), y.to(dtype), ws, **{k: v for k, v in geom.items() if k != "padding_mode"})
    got = cf.coactivation(x.to(dtype), y.to(dtype), ws, **geom, mode="correlation")
    assert got.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, atol=10 * atol, rtol=10 * rtol)  # sums of |r| over L positions


def test_correlation_fewer_than_two_samples_is_zero():
    for n in (0, 1):
        x, y, ws, geom = _case("2d_P1_G2", n=n)
        got = cf.coactivation(x, y, ws, **geom, mode="correlation")
        assert got.shape == ws and not got.any()


def test_correlation_chunks_give_the_same_scores(monkeypatch):
    """One position per chunk (the smallest chunk) sums to the same scores as one chunk (under the interpreter:
    as the kernel, which has no chunks)."""
    x, y, ws, geom = _case("3d_S2_P1_G2", n=3)
    want = cf.coactivation(x, y, ws, **geom, mode="correlation")
    _plain_torch_correlation(monkeypatch)
    monkeypatch.setattr(reference, "_CHUNK_BYTES", 1)
    torch.testing.assert_close(cf.coactivation(x, y, ws, **geom, mode="correlation"), want, rtol=1e-12, atol=1e-12)


def _plain_torch_correlation(monkeypatch):
    """The op's correlation on the plain-torch path even where the kernel would run (the interpreter)."""
    monkeypatch.setattr(ops_coactivation, "_kernel_correlation", lambda *args, **kwargs: None)


def test_correlation_memory_is_not_the_seeds_tensor(monkeypatch):
    """The seed forms [N, C_out·C_in·∏K, L]; the CPU path holds the normalised copies and one chunk."""
    _plain_torch_correlation(monkeypatch)  # the kernel's interpreted loop over 576 positions takes ~40 s
    monkeypatch.setattr(reference, "_CHUNK_BYTES", 1 << 18)
    x = torch.randn(4, 16, 24, 24)
    ws = (16, 16, 3, 3)
    y = F.conv2d(x, torch.randn(ws), padding=1)
    seed_bytes = 4 * 16 * 16 * 9 * 24 * 24 * 4
    result = {}
    peak = peak_bytes(lambda: result.setdefault("h", cf.coactivation(x, y, ws, padding=1, mode="correlation")))
    assert peak < seed_bytes / 10, (peak, seed_bytes)
    assert torch.isfinite(result["h"]).all()


# ---------------------------------------------------------------------------------------------- out=
@pytest.mark.parametrize("mode", ["count", "correlation"])
def test_out_accumulates(mode):
    x, y, ws, geom = _case("2d_S3_depthwise", torch.float32, n=3)
    h = cf.coactivation(x, y, ws, **geom, mode=mode)
    start = torch.randn(ws)
    out = start.clone()
    assert cf.coactivation(x, y, ws, **geom, mode=mode, out=out) is out
    cf.coactivation(2 * x, 3 * y, ws, **geom, mode=mode, out=out)  # the same signs and correlations again
    torch.testing.assert_close(out, start + 2 * h)
    strided = start.clone().permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)  # any strides
    cf.coactivation(x, y, ws, **geom, mode=mode, out=strided)
    torch.testing.assert_close(strided, start + h)


def test_out_is_checked():
    x, y, ws, geom = _case("2d_P1_G2", torch.float32)
    bad = [(torch.zeros(6, 2, 3, 2), ValueError, "out must have shape"),
           (torch.zeros(ws, dtype=torch.float64), TypeError, "out must be torch.float32"),
           (torch.zeros(ws, device="meta"), ValueError, "device"),
           ([[0.0]], TypeError, "out must be a tensor"),
           (torch.zeros(ws, requires_grad=True), ValueError, "requires grad"),
           (torch.zeros(1, 1, 1, 1).expand(ws), ValueError, "out has elements that share memory")]
    for out, exc, match in bad:
        with pytest.raises(exc, match=match):
            cf.coactivation(x, y, ws, **geom, out=out)
    with pytest.raises(TypeError, match=r"out must be torch\.float64"):  # correlation: x's dtype
        cf.coactivation(x.double(), y.double(), ws, **geom, mode="correlation", out=torch.zeros(ws))
    buf = torch.randn(x.numel() + math.prod(ws))
    xs = buf[:x.numel()].view(x.shape)
    with pytest.raises(ValueError, match="out shares memory with x"):
        cf.coactivation(xs, y, ws, **geom, out=buf[10:10 + math.prod(ws)].view(ws))
    ybuf = torch.randn(y.numel() + math.prod(ws))
    with pytest.raises(ValueError, match="out shares memory with y"):
        cf.coactivation(x, ybuf[:y.numel()].view(y.shape), ws, **geom, out=ybuf[:math.prod(ws)].view(ws))
    out = buf[x.numel():].view(ws)  # disjoint parts of one buffer are fine
    out.zero_()
    cf.coactivation(xs, y, ws, **geom, out=out)
    assert torch.equal(out, binarized_conv_weight(xs, y, ws, **geom))


# ---------------------------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("mode", ["count", "correlation"])
def test_opcheck(mode):
    x, y, _, _ = _case("2d_P1_G2", torch.float32, n=3)
    args = (x, y, [6, 2, 3, 3], [1, 1], [1, 1, 0, 2], [1, 1], 2, "zeros", 0.0, 0.0, mode)  # y: the same size
    torch.library.opcheck(torch.ops.convzoo.coactivation, args)
    torch.library.opcheck(torch.ops.convzoo.coactivation, (x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2),
                                                           *args[1:]))
    out = torch.randn(6, 2, 3, 3)
    torch.library.opcheck(torch.ops.convzoo.coactivation_, (out, *args))


@pytest.mark.parametrize("mode", ["count", pytest.param("correlation", marks=pytest.mark.slow)])  # ~12 s
@torch.fx.experimental._config.patch(use_duck_shape=False)
@torch._dynamo.config.patch(error_on_recompile=True)
def test_compile_fullgraph_dynamic_no_recompile(mode):
    """Inside one compiled function with the convolution itself (x requires grad: read detached, the
    convolution's own gradient unchanged): one graph for every batch and image size, with and without out."""
    torch._dynamo.reset()
    w = torch.randn(6, 2, 3, 3)

    def f(x, buf):
        y = F.conv2d(x, w, padding=1, groups=2).relu()
        cf.coactivation(x, y, w.shape, padding=1, groups=2, mode=mode, out=buf, x_threshold=0.0, y_threshold=0.0)
        return y.square().sum(), cf.coactivation(x, y, w.shape, padding=1, groups=2, mode=mode, x_threshold=0.0,
                                                 y_threshold=0.0)

    def g(x):  # the thresholds' defaults: Dynamo first traces them as tensors, then once more as constants
        return cf.coactivation(x, F.conv2d(x, w, padding=1, groups=2), w.shape, padding=1, groups=2, mode=mode)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    counter_g = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled_g = torch.compile(g, fullgraph=True, dynamic=True, backend=counter_g)
    frames_g = []
    for shape in [(2, 4, 6, 7), (3, 4, 5, 9)]:
        x = torch.randn(shape, requires_grad=True)
        start = torch.randn(6, 2, 3, 3)
        a, b = start.clone(), start.clone()
        (la, ha), (lb, hb) = compiled(x, a), f(x, b)
        torch.testing.assert_close(ha, hb)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(torch.autograd.grad(la, x)[0], torch.autograd.grad(lb, x)[0])
        torch.testing.assert_close(compiled_g(x), g(x))
        frames_g.append(counter_g.frame_count)
    assert counter.frame_count == 1
    assert frames_g[1] == frames_g[0]  # that re-trace is once: no recompile for a new shape
    torch._dynamo.reset()


_SYNCS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("mode", ["count", "correlation"])
def test_no_host_synchronisation(mode, monkeypatch):
    """The path reads no tensor value on the host (what would stall a training step on a GPU): every Tensor method
    that would (``.item()``, ``.tolist()``, ``.cpu()``, ``nonzero``, ``bool(t)``, ...) raises during the calls."""
    x, y, ws, geom = _case("2d_S2_D2_lohi", torch.float32, padding_mode="reflect", n=3)
    want = cf.coactivation(x, y, ws, **geom, mode=mode)
    out = torch.zeros(ws)

    def trap(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name}")
        return raise_

    with monkeypatch.context() as m:
        for name in _SYNCS:
            m.setattr(torch.Tensor, name, trap(name))
        got = cf.coactivation(x, y, ws, **geom, mode=mode)
        cf.coactivation(x, y, ws, **geom, mode=mode, out=out)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(out, want)


def test_meta_and_empty_batch():
    x, y, ws, geom = _case("2d_P1_G2", torch.float16)
    meta = cf.coactivation(x.to("meta"), y.to("meta"), ws, **geom)
    assert meta.is_meta and meta.shape == ws and meta.dtype == torch.float32
    meta = cf.coactivation(x.to("meta"), y.to("meta"), ws, **geom, mode="correlation")
    assert meta.is_meta and meta.dtype == torch.float16
    empty = cf.coactivation(x[:0].float(), y[:0].float(), ws, **geom)
    assert empty.shape == ws and not empty.any()
    out = torch.ones(ws)
    cf.coactivation(x[:0].float(), y[:0].float(), ws, **geom, out=out)
    assert (out == 1).all()


def test_statistic_of_live_activations_under_transforms():
    """Reading inputs that require grad (or carry a forward-mode tangent) is fine: the scores are a constant."""
    x, y, ws, geom = _case("2d_P1_G2")
    want = cf.coactivation(x, y, ws, **geom, mode="correlation")
    xg = x.clone().requires_grad_()
    got = cf.coactivation(xg, y * xg.sum(), ws, **geom, mode="correlation")
    assert not got.requires_grad
    torch.testing.assert_close(got, cf.coactivation(x, y * x.sum(), ws, **geom, mode="correlation"))
    g = torch.func.grad(lambda t: (t.square().sum() + 0 * cf.coactivation(t, y, ws, **geom).sum()))(x)
    torch.testing.assert_close(g, 2 * x)
    _, tangent = torch.func.jvp(lambda t: cf.coactivation(t, y, ws, **geom, mode="correlation"), (x,),
                                (torch.ones_like(x),))
    assert not tangent.any()
    torch.testing.assert_close(cf.coactivation(x, y, ws, **geom, mode="correlation"), want)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, exc, match", [
    ({"x_threshold": True}, TypeError, "x_threshold"),
    ({"y_threshold": torch.tensor(0.5)}, TypeError, "y_threshold"),
    ({"x_threshold": "0.5"}, TypeError, "x_threshold"),
    ({"y_threshold": float("nan")}, ValueError, "y_threshold"),
    ({"mode": "pearson"}, ValueError, "mode"),
    ({"mode": "correlation", "x_threshold": 0.5}, ValueError, "mode='count' only"),
    ({"x": torch.randn(2, 5, 6, 7)}, ValueError, "x has C_in=5"),
    ({"x": torch.randn(2, 4, 6, 7, 1)}, ValueError, "x must be"),
    ({"x": torch.randn(2, 4, 6)}, ValueError, r"y must be unbatched \[C_out, \*out\] like x \(shape \(2, 4, 6\)\)"),
    ({"x": torch.ones(2, 4, 6, 7, dtype=torch.int64)}, TypeError, "x must have a floating"),
    ({"y": torch.randn(2, 5, 6, 7)}, ValueError, "y has 5 channels"),
    ({"y": torch.randn(3, 6, 6, 7)}, ValueError, "y has batch size 3"),
    ({"y": torch.randn(2, 6, 4, 5)}, ValueError, r"y must have the convolution's output size \[6, 7\]"),
    ({"y": torch.randn(2, 6, 6)}, ValueError, "y must be"),
    ({"y": [1.0]}, TypeError, "y must be a torch.Tensor"),
    ({"y": torch.randn(2, 6, 6, 7, device="meta")}, ValueError, "y is on meta"),
    ({"weight_shape": (6, 2, 3)}, ValueError, "x must be"),
    ({"weight_shape": (6, 2)}, ValueError, "weight_shape"),
    ({"weight_shape": (6, 2, 0, 3)}, ValueError, "weight_shape must be positive"),
    ({"weight_shape": (6, 2, 3.0, 3)}, TypeError, "weight_shape"),
    ({"weight_shape": torch.randn(6, 2, 3, 3)}, TypeError, "weight_shape"),
    ({"groups": 4}, ValueError, "groups"),
    ({"groups": 3}, ValueError, "groups"),
    ({"groups": True}, TypeError, "groups"),
    ({"stride": 2, "padding": "same"}, ValueError, "same"),
    ({"stride": 0}, ValueError, "stride"),
    ({"padding": "full"}, ValueError, "padding"),
    ({"padding_mode": "wrap"}, ValueError, "padding_mode"),
])
def test_bad_input_names_the_argument(change, exc, match):
    x, y, ws, geom = _case("2d_P1_G2", torch.float32)
    a = {"x": x, "y": y, "weight_shape": ws, **geom, **change}
    with pytest.raises(exc, match=match):
        cf.coactivation(a.pop("x"), a.pop("y"), a.pop("weight_shape"), **a)
