"""conv_matrix against F.conv1d/2d/3d (the independent oracle), in float64.

The oracle never touches convzoo's index arithmetic: zero padding given as an int, a tuple, 'same' or
'valid' goes straight to F.convNd; (lo, hi) pairs and the other padding modes go through F.pad first,
then F.convNd without padding (what nn.ConvNd does with padding_mode).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import convzoo.functional as cf

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
LAYOUTS = ["sparse_csr", "sparse_coo", "dense"]
TORCH_LAYOUT = {"sparse_csr": torch.sparse_csr, "sparse_coo": torch.sparse_coo, "dense": torch.strided}
DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
ATOL = 1e-12  # float64; every entry of B@x is one short sum, as in the conv

pytestmark = [
    # torch's notes about its own internals, not about a result (the oracle's 'same' with an even kernel copies
    # the input; CSR is a beta layout)
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning"),
]


def _tup(v, nd):
    return (v,) * nd if isinstance(v, int) else tuple(v)


def _pairs(padding, kernel, dilation):
    """Per-dim (lo, hi) of a padding argument, torch's rule for 'same' (the odd element on the high side)."""
    nd = len(kernel)
    if padding == "valid":
        return [(0, 0)] * nd
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, _tup(dilation, nd))]
        return [(t // 2, t - t // 2) for t in totals]
    if isinstance(padding, int):
        return [(padding, padding)] * nd
    return [p if isinstance(p, tuple) else (p, p) for p in padding]


def oracle(x, w, stride, padding, dilation, groups, mode):
    nd = w.dim() - 2
    pairs_given = not isinstance(padding, (int, str)) and any(isinstance(p, tuple) for p in padding)
    if mode == "zeros" and not pairs_given:
        return CONV[nd](x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)
    pad = [v for lo_hi in reversed(_pairs(padding, w.shape[2:], dilation)) for v in lo_hi]  # F.pad: last dim first
    xp = F.pad(x, pad, mode="constant" if mode == "zeros" else mode)
    return CONV[nd](xp, w, stride=stride, dilation=dilation, groups=groups)


# (id, C_in, C_out, input_size, kernel, stride, padding, dilation, groups)
GEOMS = [
    ("1d_C3to4_L11_K3", 3, 4, (11,), (3,), 1, 0, 1, 1),
    ("1d_C2to3_L13_K3_S2_P1_D2", 2, 3, (13,), (3,), 2, 1, 2, 1),
    ("1d_C1to2_L7_K2_S3_stride_gt_kernel", 1, 2, (7,), (2,), 3, 1, 1, 1),
    ("1d_C2to2_L10_K4_same_even_kernel", 2, 2, (10,), (4,), 1, "same", 1, 1),
    ("1d_C2to2_L9_K3_P2-0", 2, 2, (9,), (3,), 1, ((2, 0),), 1, 1),
    ("1d_C3to2_L5_K1_S2", 3, 2, (5,), (1,), 2, 0, 1, 1),
    ("1d_C4to6_L8_K3_P1_G2", 4, 6, (8,), (3,), 1, 1, 1, 2),
    ("2d_C2to3_H7W9_K3x2_S2x1_P1x0_D1x2", 2, 3, (7, 9), (3, 2), (2, 1), (1, 0), (1, 2), 1),
    ("2d_C1to2_H5W5_K3_same_D2", 1, 2, (5, 5), (3, 3), 1, "same", 2, 1),
    ("2d_C2to2_H11W13_K1", 2, 2, (11, 13), (1, 1), 1, 0, 1, 1),
    ("2d_C1to1_H7W5_K3_S3_valid", 1, 1, (7, 5), (3, 3), 3, "valid", 1, 1),
    ("2d_C2to2_H6W7_K2x3_P1-2x0-1", 2, 2, (6, 7), (2, 3), 1, ((1, 2), (0, 1)), 1, 1),
    ("2d_C4to6_H5W7_K3_S2_P2_G2", 4, 6, (5, 7), (3, 3), 2, 2, 1, 2),
    ("2d_C4to8_H7W6_K3_P1_depthwise", 4, 8, (7, 6), (3, 3), 1, 1, 1, 4),
    ("3d_C2to3_D5H4W3_K3x2x1_S1x2x1_P1x1x0", 2, 3, (5, 4, 3), (3, 2, 1), (1, 2, 1), (1, 1, 0), 1, 1),
    ("3d_C2to2_D3H5W4_K2_same", 2, 2, (3, 5, 4), (2, 2, 2), 1, "same", 1, 1),
    ("3d_C3to3_D4H3W5_K2x3x2_S3x1x2_P1-0x1-1x0-2_D2x1x1_depthwise", 3, 3, (4, 3, 5), (2, 3, 2), (3, 1, 2),
     ((1, 0), (1, 1), (0, 2)), (2, 1, 1), 3),
]


def _has_padding(geom):
    _, _, _, _, kernel, _, padding, dilation, _ = geom
    return any(v > 0 for lo_hi in _pairs(padding, kernel, dilation) for v in lo_hi)


# every geometry in zero padding; the other modes only where there is padding to fill
CASES = [pytest.param(g, "zeros", id=f"{g[0]}-zeros") for g in GEOMS] + [
    pytest.param(g, mode, id=f"{g[0]}-{mode}")
    for g in GEOMS if _has_padding(g) for mode in ("reflect", "replicate", "circular")
]


def _build(geom, mode, dtype=torch.float64, device="cpu"):
    _, c_in, c_out, size, kernel, stride, padding, dilation, groups = geom
    w = torch.randn(c_out, c_in // groups, *kernel, dtype=dtype, device=device)
    x = torch.randn(3, c_in, *size, dtype=dtype, device=device)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode)
    return w, x, kw


@pytest.mark.parametrize("geom, mode", CASES)
def test_matches_conv(geom, mode):
    """B @ x.flatten(1).T is the convolution in every layout, straight from the sparse product too;
    the three layouts hold the same entries."""
    w, x, kw = _build(geom, mode)
    ref = oracle(x, w, kw["stride"], kw["padding"], kw["dilation"], kw["groups"], mode).flatten(1)
    dense = []
    for layout in LAYOUTS:
        b = cf.conv_matrix(w, x.shape[2:], **kw, layout=layout)
        assert b.layout == TORCH_LAYOUT[layout]
        assert tuple(b.shape) == (ref.shape[1], x[0].numel())
        torch.testing.assert_close((b @ x.flatten(1).T).T, ref, atol=ATOL, rtol=0)
        dense.append(b.to_dense())
    torch.testing.assert_close(dense[0], dense[2], atol=0, rtol=0)
    torch.testing.assert_close(dense[1], dense[2], atol=0, rtol=0)
    # one stored entry per (row, col) pair that some tap reads: taps reading one pixel summed into one entry
    # (coalesced), a tap reading the zero padding no entry at all (random weights: no entry is 0 by chance)
    nnz = int((dense[2] != 0).sum())
    for layout in LAYOUTS[:2]:
        b = cf.conv_matrix(w, x.shape[2:], **kw, layout=layout)
        assert b._nnz() == nnz, layout
    # coalesced for real (zero padding builds the entries in sorted order and says so without sorting)
    assert b.is_coalesced()
    resorted = torch.sparse_coo_tensor(b.indices(), b.values(), b.shape, check_invariants=True).coalesce()
    assert torch.equal(resorted.indices(), b.indices()) and torch.equal(resorted.values(), b.values())


# padding 1 of a 2-pixel input with a 3-tap kernel: two taps of one row read the same pixel.
# (out 0 reads padded -1, 0, 1 and out 1 reads 0, 1, 2; entries as functions of the taps w0, w1, w2)
COINCIDING = {
    "circular": lambda w0, w1, w2: [[w1, w0 + w2], [w0 + w2, w1]],  # -1 -> 1, 2 -> 0
    "reflect": lambda w0, w1, w2: [[w1, w0 + w2], [w0 + w2, w1]],  # -1 -> 1, 2 -> 0
    "replicate": lambda w0, w1, w2: [[w0 + w1, w2], [w0, w1 + w2]],  # -1 -> 0, 2 -> 1
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", list(COINCIDING))
def test_coinciding_taps_are_summed(mode, layout):
    """Taps that the padding sends to one pixel give one entry holding their sum (2 per row, not 3):
    without coalescing, the sparse layouts hold 6 entries with duplicate (row, col) pairs."""
    w = torch.tensor([[[1.0, 10.0, 100.0]]], dtype=torch.float64)
    b = cf.conv_matrix(w, (2,), padding=1, padding_mode=mode, layout=layout)
    expected = torch.tensor(COINCIDING[mode](1.0, 10.0, 100.0), dtype=torch.float64)
    torch.testing.assert_close(b.to_dense(), expected, atol=0, rtol=0)
    x = torch.randn(4, 1, 2, dtype=torch.float64)
    torch.testing.assert_close((b @ x.flatten(1).T).T, oracle(x, w, 1, 1, 1, 1, mode).flatten(1), atol=ATOL, rtol=0)
    if layout == "sparse_coo":
        assert b.is_coalesced()
        assert b._nnz() == 4
        assert b.indices().T.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    if layout == "sparse_csr":
        assert b.crow_indices().tolist() == [0, 2, 4]
        assert b.col_indices().tolist() == [0, 1, 0, 1]


def test_coinciding_taps_2d_circular():
    """The same in 2-d: a 2x3 input, 3x3 kernel, circular padding 1 (rows and columns wrap onto each other)."""
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    x = torch.randn(2, 1, 2, 3, dtype=torch.float64)
    b = cf.conv_matrix(w, (2, 3), padding=1, padding_mode="circular", layout="sparse_coo")
    assert b._nnz() == 2 * 6 * 6  # every output pixel reads every input pixel exactly once, as one entry
    torch.testing.assert_close((b @ x.flatten(1).T).T, oracle(x, w, 1, 1, 1, 1, "circular").flatten(1),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect"])
def test_gradient_wrt_weight(mode, layout):
    """d/dweight of <g, B @ x> equals d/dweight of <g, conv(x)>: the entries are a differentiable gather
    (through coalesce's sum where taps coincide, and through CSR conversion)."""
    geom = ("2d", 4, 6, (5, 6), (3, 2), (2, 1), ((1, 1), (2, 1)), (1, 2), 2)
    w, x, kw = _build(geom, mode)
    w.requires_grad_()
    ref = oracle(x, w, kw["stride"], kw["padding"], kw["dilation"], kw["groups"], mode).flatten(1)
    g = torch.randn_like(ref)
    (want,) = torch.autograd.grad((ref * g).sum(), w)
    b = cf.conv_matrix(w, x.shape[2:], **kw, layout=layout)
    (got,) = torch.autograd.grad(((b @ x.flatten(1).T).T * g).sum(), w)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    if layout != "dense":  # and through to_dense
        b = cf.conv_matrix(w, x.shape[2:], **kw, layout=layout)
        (got,) = torch.autograd.grad(((b.to_dense() @ x.flatten(1).T).T * g).sum(), w)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dtype_device_preserved(layout, device):
    """float32 in, float32 out on the weight's device; sparse indices int64; a non-contiguous weight works."""
    w = torch.randn(3, 4, 3, 2, device=device).transpose(0, 1)  # [4, 3, 3, 2], not contiguous
    assert not w.is_contiguous()
    x = torch.randn(2, 3, 6, 5, device=device)
    b = cf.conv_matrix(w, (6, 5), padding=1, padding_mode="reflect", layout=layout)
    assert b.dtype == torch.float32 and b.device == w.device
    if layout == "sparse_coo":
        assert b.indices().dtype == torch.int64
    if layout == "sparse_csr":
        assert b.crow_indices().dtype == torch.int64 and b.col_indices().dtype == torch.int64
    ref = oracle(x.double(), w.double(), 1, 1, 1, 1, "reflect").flatten(1)
    torch.testing.assert_close((b.to_dense().double() @ x.double().flatten(1).T).T, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_column_indices_past_int32(layout):
    """A 70000x70000 input has 4.9e9 columns: the column index of the last tap passes 2**31 and stays exact
    (only 4 entries are built: stride 70000 leaves one output position, dilation 69999 spans the input)."""
    n = 70000
    w = torch.arange(1.0, 5.0, dtype=torch.float64).view(1, 1, 2, 2)
    b = cf.conv_matrix(w, (n, n), stride=n, dilation=n - 1, layout=layout)
    assert tuple(b.shape) == (1, n * n)
    want_cols = [0, n - 1, (n - 1) * n, (n - 1) * n + n - 1]
    if layout == "sparse_coo":
        assert b.indices().dtype == torch.int64
        assert b.indices()[1].tolist() == want_cols and b.indices()[0].tolist() == [0] * 4
    else:
        assert b.col_indices().dtype == torch.int64
        assert b.col_indices().tolist() == want_cols and b.crow_indices().tolist() == [0, 4]
    assert b.values().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert want_cols[-1] > 2**31


def test_dense_refused_over_max_dense_elements():
    w = torch.randn(2, 1, 3, dtype=torch.float64)
    # 2*9 rows x 1*11 columns = 198 elements
    assert cf.conv_matrix(w, (11,), layout="dense", max_dense_elements=198).shape == (18, 11)
    with pytest.raises(ValueError, match=r"layout='dense'.*198 elements.*max_dense_elements=197"):
        cf.conv_matrix(w, (11,), layout="dense", max_dense_elements=197)
    one = torch.ones(1, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"max_dense_elements=268435456"):  # the default, 2**28
        cf.conv_matrix(one, (2**14 + 1,), layout="dense")
    with pytest.raises(ValueError, match=r"never more than 2\*\*31"):  # the hard cap, whatever the caller allows
        cf.conv_matrix(one, (2**16,), layout="dense", max_dense_elements=2**40)
    assert cf.conv_matrix(one, (2**16,), layout="sparse_csr")._nnz() == 2**16  # sparse has no such limit


W1 = torch.randn(4, 2, 3, dtype=torch.float64)  # 1-d, C_out 4, C_in/groups 2, kernel 3
BAD = [
    ("weight_not_tensor", dict(weight=[[[1.0]]]), TypeError, "weight"),
    ("weight_int", dict(weight=torch.ones(1, 1, 3, dtype=torch.int64)), TypeError, "weight"),
    ("weight_2d", dict(weight=torch.ones(2, 3)), ValueError, "weight"),
    ("weight_6d", dict(weight=torch.ones(1, 1, 1, 1, 1, 1)), ValueError, "weight"),
    ("weight_empty_kernel", dict(weight=torch.ones(2, 1, 0)), ValueError, "weight"),
    ("input_size_length", dict(input_size=(5, 5)), ValueError, "input_size"),
    ("input_size_float", dict(input_size=(5.0,)), TypeError, "input_size"),
    ("input_size_bool", dict(input_size=(True,)), TypeError, "input_size"),
    ("input_size_str", dict(input_size="5"), TypeError, "input_size"),
    ("input_size_zero", dict(input_size=(0,)), ValueError, "input_size"),
    ("groups_zero", dict(groups=0), ValueError, "groups"),
    ("groups_not_dividing_c_out", dict(groups=3, weight=torch.ones(4, 1, 3)), ValueError, "groups"),
    ("groups_bool", dict(groups=True), TypeError, "groups"),
    ("groups_float", dict(groups=2.0), TypeError, "groups"),
    ("kernel_larger_than_padded_input", dict(input_size=(2,)), ValueError, "weight's kernel"),
    ("kernel_dilated_larger", dict(input_size=(4,), dilation=2, padding=(0,)), ValueError, "weight's kernel"),
    ("layout_unknown", dict(layout="csr"), ValueError, "layout"),
    ("layout_not_str", dict(layout=torch.sparse_csr), ValueError, "layout"),
    ("padding_mode_unknown", dict(padding_mode="mirror"), ValueError, "padding_mode"),
    ("same_with_stride", dict(padding="same", stride=2), ValueError, "padding='same'"),
    ("padding_negative", dict(padding=-1), ValueError, "padding"),
    ("padding_pair_negative", dict(padding=((1, -1),)), ValueError, "padding"),
    ("padding_unknown_str", dict(padding="full"), ValueError, "padding"),
    ("padding_bool", dict(padding=True), TypeError, "padding"),
    ("padding_float", dict(padding=1.0), TypeError, "padding"),
    ("stride_zero", dict(stride=0), ValueError, "stride"),
    ("stride_float", dict(stride=1.5), TypeError, "stride"),
    ("stride_bool", dict(stride=True), TypeError, "stride"),
    ("dilation_zero", dict(dilation=0), ValueError, "dilation"),
    ("dilation_length", dict(dilation=(1, 1)), ValueError, "dilation"),
    ("reflect_padding_too_large", dict(input_size=(3,), padding=3, padding_mode="reflect"), ValueError, "reflect"),
    ("circular_padding_too_large", dict(input_size=(3,), padding=4, padding_mode="circular"), ValueError,
     "circular"),
    ("max_dense_negative", dict(max_dense_elements=-1), ValueError, "max_dense_elements"),
    ("max_dense_str", dict(max_dense_elements="big"), TypeError, "max_dense_elements"),
    ("max_dense_bool", dict(max_dense_elements=True), TypeError, "max_dense_elements"),
    ("size_past_int64", dict(weight=torch.ones(1, 1, 1, 1, 1), input_size=(2**40, 2**40, 2**40), stride=2**40),
     ValueError, "int64"),
]


@pytest.mark.parametrize("kwargs, exc, match", [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_arguments(kwargs, exc, match):
    args = dict(weight=W1, input_size=(9,)) | kwargs
    with pytest.raises(exc, match=match):
        cf.conv_matrix(**args)


def test_torch_refuses_same_with_stride_too():
    """The refusal above mirrors torch's own (so 'same' keeps meaning 'output size = input size')."""
    with pytest.raises(RuntimeError, match="same"):
        F.conv1d(torch.randn(1, 2, 9), torch.randn(4, 2, 3), stride=2, padding="same")
