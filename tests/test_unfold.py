"""unfold / fold numerics (fwd + bwd) against independent oracles, on both implementations."""

import pytest
import torch
import torch.nn.functional as F
from problems import CASES, IDS, TOL, flat_padding, integer_like, make_input, oracle_fold, oracle_unfold

import convzoo
import convzoo.functional as cf
from convzoo import reference
from convzoo.autotune import Config
from convzoo.kernels import unfold as kernels

DTYPES = [torch.float32, torch.float16]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _kw(case):
    return case.kwargs()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unfold_forward_exact(case, dtype, path):
    x = make_input(case, dtype, path)
    y = cf.unfold(x, **_kw(case))
    torch.testing.assert_close(y.cpu(), oracle_unfold(x.cpu(), case), atol=0, rtol=0)
    assert y.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fold_forward_exact(case, dtype, path):
    # integer-valued entries: every summation order gives the exact sum, so fold is compared bit-exactly
    cols = integer_like(oracle_unfold(make_input(case, dtype, "cpu"), case)).to(path)
    out = cf.fold(cols, case.size, **_kw(case))
    torch.testing.assert_close(out.cpu(), oracle_fold(cols.cpu(), case), atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fold_forward_random_fp32(case, path):
    cols = torch.randn_like(oracle_unfold(make_input(case, torch.float32, "cpu"), case)).to(path)
    out = cf.fold(cols, case.size, **_kw(case))
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out.cpu().double(), oracle_fold(cols.cpu().double(), case), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unfold_fold_backward_exact(case, dtype, path):
    x = make_input(case, dtype, path).requires_grad_()
    y = cf.unfold(x, **_kw(case))
    g = integer_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad.cpu(), oracle_fold(g.cpu(), case), atol=0, rtol=0)

    cols = y.detach().clone().requires_grad_()
    out = cf.fold(cols, case.size, **_kw(case))
    h = integer_like(out)
    out.backward(h)
    torch.testing.assert_close(cols.grad.cpu(), oracle_unfold(h.cpu(), case), atol=0, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("case", [CASES[1], CASES[11], CASES[16], CASES[21], CASES[23]],
                         ids=[IDS[1], IDS[11], IDS[16], IDS[21], IDS[23]])
def test_layouts_read_in_place(case, layout, path):
    """Channels-last and strided inputs give the same result as contiguous ones, and non-contiguous
    columns fold like contiguous ones."""
    x = make_input(case, torch.float32, path, layout)
    assert not x.is_contiguous()
    y = cf.unfold(x, **_kw(case))
    torch.testing.assert_close(y.cpu(), oracle_unfold(x.cpu(), case), atol=0, rtol=0)
    cols_t = integer_like(y).transpose(1, 2).contiguous().transpose(1, 2)  # [N, CK, L] with L-major strides
    torch.testing.assert_close(cf.fold(cols_t, case.size, **_kw(case)).cpu(),
                               oracle_fold(cols_t.cpu(), case), atol=0, rtol=0)


def test_matches_torch_unfold_fold_2d(path):
    x = torch.randn(3, 4, 9, 11, device=path)
    kw = dict(kernel_size=(2, 3), dilation=(1, 2), padding=(1, 2), stride=(2, 1))
    torch.testing.assert_close(cf.unfold(x, **kw), F.unfold(x, **kw), atol=0, rtol=0)
    cols = torch.randint(-8, 9, F.unfold(x, **kw).shape, device=path).float()
    torch.testing.assert_close(cf.fold(cols, (9, 11), **kw), F.fold(cols, (9, 11), **kw), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_reference_matches_oracle(dtype):
    """The plain-torch reference is itself checked against the independent oracle."""
    for case in CASES:
        x = make_input(case, dtype, "cpu")
        args = (list(case.kernel), list(case.kwargs()["dilation"]), flat_padding(case),
                list(case.kwargs()["stride"]), case.mode)
        torch.testing.assert_close(reference.unfold(x, *args), oracle_unfold(x, case), atol=0, rtol=0)
        cols = integer_like(oracle_unfold(x, case))
        torch.testing.assert_close(reference.fold(cols, list(case.size), *args), oracle_fold(cols, case),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("config", [
    Config({"BLOCK_R": 1, "BLOCK_L": 16}),
    Config({"BLOCK_R": 4, "BLOCK_L": 32}),
    Config({"BLOCK_R": 32, "BLOCK_L": 16}),
], ids=lambda c: "R{BLOCK_R}_L{BLOCK_L}".format(**c.meta))
def test_unfold_small_tiles_cover_every_element(config, kernel_device):
    """Tiles much smaller than the problem: many programs, partial tiles on both axes."""
    case = CASES[1]
    x = make_input(case, torch.float32, kernel_device)
    args = (list(case.kernel), [2, 2], flat_padding(case), [2, 2], "zeros")
    y = kernels.unfold(x, *args, config=config)
    torch.testing.assert_close(y.cpu(), oracle_unfold(x.cpu(), case), atol=0, rtol=0)


@pytest.mark.parametrize("ties_to_last", [False, True], ids=["positions_x_rows", "rows_x_positions"])
def test_both_tile_orientations_gather_every_case(ties_to_last, monkeypatch, kernel_device):
    """The launcher holds the gather's tile positions × rows or rows × positions by the installed Triton's
    coalescing tie (``_common._TIES_TO_LAST_DIM``), so each CI leg runs one of them: both here, on every case (every
    padding mode, rank, stride, dilation) with partial 16 × 32 tiles."""
    from convzoo.kernels import _common as cm

    monkeypatch.setattr(cm, "_TIES_TO_LAST_DIM", ties_to_last)
    for case in CASES:
        x = make_input(case, torch.float32, kernel_device)
        nd = case.ndim
        args = (list(case.kernel), list(case.dilation or (1,) * nd), flat_padding(case), list(case.stride or (1,) * nd),
                case.mode)
        y = kernels.unfold(x, *args, config=Config({"BLOCK_R": 16, "BLOCK_L": 32}))
        torch.testing.assert_close(y.cpu(), oracle_unfold(x.cpu(), case), atol=0, rtol=0, msg=case.id)


@pytest.mark.parametrize("config", [
    pytest.param(Config({"BLOCK_R": 1, "BLOCK_P": 16}), marks=pytest.mark.slow_interpreted),  # ~10 s: 1-row tiles
    Config({"BLOCK_R": 4, "BLOCK_P": 32}), Config({"BLOCK_R": 8, "BLOCK_P": 16}),
], ids=lambda c: "R{BLOCK_R}_P{BLOCK_P}".format(**c.meta))
def test_fold_small_tiles_cover_every_element(config, kernel_device):
    case = CASES[12]
    cols = integer_like(oracle_unfold(make_input(case, torch.float32, "cpu"), case)).to(kernel_device)
    args = (list(case.kernel), [1, 1], flat_padding(case), list(case.stride), case.mode)
    out = kernels.fold(cols, list(case.size), *args, config=config)
    torch.testing.assert_close(out.cpu(), oracle_fold(cols.cpu(), case), atol=0, rtol=0)


def test_fold_has_no_2pow24_limit(monkeypatch):
    """unfoldNd's fold refuses outputs above 2^24 elements; ours only needs memory (the CPU path:
    the interpreter would take minutes at this size)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    size = (4100, 4100)  # 16.8M > 2^24 output elements
    cols = torch.ones(1, 4, (size[0] // 2) * (size[1] // 2))
    out = cf.fold(cols, size, 2, stride=2)
    assert out.shape == (1, 1, *size) and out.numel() > 2**24
    assert out.sum().item() == out.numel()


def test_fold_is_deterministic(kernel_device):
    case = CASES[1]
    cols = torch.randn(oracle_unfold(make_input(case, torch.float32, "cpu"), case).shape, device=kernel_device)
    a = cf.fold(cols, case.size, **_kw(case))
    b = cf.fold(cols, case.size, **_kw(case))
    assert torch.equal(a, b)


def test_modules_match_functional_and_repr(path):
    x = torch.randn(2, 3, 6, 7, device=path)
    m = convzoo.Unfold(3, padding=1, stride=2, padding_mode="reflect")
    y = m(x)
    torch.testing.assert_close(y, cf.unfold(x, 3, padding=1, stride=2, padding_mode="reflect"), atol=0, rtol=0)
    f = convzoo.Fold((6, 7), 3, padding=1, stride=2, padding_mode="reflect")
    torch.testing.assert_close(f(y), cf.fold(y, (6, 7), 3, padding=1, stride=2, padding_mode="reflect"))
    assert "padding_mode='reflect'" in repr(m) and "output_size=(6, 7)" in repr(f)
    assert convzoo.layers.Unfold is convzoo.Unfold


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bf16_on_gpu(case):
    x = make_input(case, torch.bfloat16, "cuda")
    torch.testing.assert_close(cf.unfold(x, **_kw(case)).cpu(), oracle_unfold(x.cpu(), case), atol=0, rtol=0)
    cols = integer_like(oracle_unfold(x.cpu(), case)).cuda()
    torch.testing.assert_close(cf.fold(cols, case.size, **_kw(case)).cpu(), oracle_fold(cols.cpu(), case),
                               atol=0, rtol=0)
