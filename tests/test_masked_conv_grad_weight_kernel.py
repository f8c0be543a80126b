"""The masked-conv grad-weight kernel (convzoo.kernels.masked_conv.masked_conv_grad_weight) against an
independent float64 reference, ``torch.nn.grad.convNd_weight`` of the ``F.pad``-ed input, then ⊙ mask:
1/2/3-d, strides (also past the kernel), dilation, (lo, hi) padding, every padding mode, groups incl.
depthwise, odd sizes (C_out/G not a multiple of BO, K not a multiple of BK), random, block-structured,
all-zero, all-one and no masks, N = 1, one share and several (SPLIT), every dtype, strided and channels-last
x and dY, exact zeros where the mask (or the lists) drop an entry even with NaN / Inf in x and dY, offsets
past 2^31, empty dims, the config space and every candidate config, bad input. The tile lists are the
forward tests' brute-force ones (independent of convzoo.sparsity), except where a test says otherwise."""

import math

import _families as fam
import pytest
import torch
import torch.nn.functional as F
from problems import TOL, assert_tune_problems_match
from test_kernel_hardening import HUGE, huge_view
from test_masked_conv_kernels import CASES, TAP_CASES, block_mask, make_mask, tile_lists

from convzoo import autotune, sparsity
from convzoo.autotune import Config
from convzoo.kernels import masked_conv as kernels
from convzoo.kernels.masked_conv import grad_weight as grad_weight_module  # the launcher's globals

NAME = "masked_conv_grad_weight"


# ---------------------------------------------------------------------------------------------- helpers
def grad_weight_ref(dy, x, weight_size, stride, padding, dilation, groups, mode):
    """The dense weight gradient in float64: ``torch.nn.grad.convNd_weight`` of ``x`` after ``F.pad`` in
    ``mode`` (``padding`` per-dim ``(lo, hi)`` pairs)."""
    nd = x.dim() - 2
    flat = [v for lo, hi in reversed(padding) for v in (lo, hi)]
    xp = F.pad(x.double(), flat, mode="constant" if mode == "zeros" else mode)
    fn = (torch.nn.grad.conv1d_weight, torch.nn.grad.conv2d_weight, torch.nn.grad.conv3d_weight)[nd - 1]
    return fn(xp, list(weight_size), dy.double(), stride, 0, dilation, groups)


def out_size(x_shape, kernel, stride, padding, dilation):
    return [(n + lo + hi - d * (k - 1) - 1) // s + 1
            for n, k, s, (lo, hi), d in zip(x_shape[2:], kernel, stride, padding, dilation)]


def run(dy, x, mask, weight_size, kernel, stride, padding, dilation, groups, mode, block, config=None, lists=None):
    """The launcher with ``lists`` (default: ``mask``'s tile lists; ``padding``: (lo, hi) pairs)."""
    count, index = lists if lists is not None else tile_lists(mask, groups, block)
    flat = [v for p in padding for v in p]
    return kernels.masked_conv_grad_weight(dy, x, mask, count.to(x.device), index.to(x.device), list(weight_size),
                                           list(kernel), list(dilation), flat, list(stride), mode, groups, block,
                                           config=config)


def _inputs(key, dtype=torch.float64, device="cpu"):
    shape, co, kernel, stride, padding, dilation, groups, mode = CASES[key]
    x = torch.randn(shape, dtype=dtype, device=device)
    dy = torch.randn(shape[0], co, *out_size(shape, kernel, stride, padding, dilation), dtype=dtype, device=device)
    weight_size = [co, shape[1] // groups, *kernel]
    return dy, x, weight_size, dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                    mode=mode)


def _ref(dy, x, weight_size, geo, mask=None):
    want = grad_weight_ref(dy, x, weight_size, geo["stride"], geo["padding"], geo["dilation"], geo["groups"],
                           geo["mode"])
    return want if mask is None else want * mask.to(want.device)


def _run(dy, x, mask, weight_size, geo, block=(16, 16), config=None, lists=None):
    return run(dy, x, mask, weight_size, geo["kernel"], geo["stride"], geo["padding"], geo["dilation"],
               geo["groups"], geo["mode"], block, config, lists)


def _check(key, density, block=(16, 16), dtype=torch.float64, config=None, device="cpu"):
    dy, x, weight_size, geo = _inputs(key, dtype, device)
    mask = make_mask(weight_size, geo["groups"], block, density).to(device)
    dw = _run(dy, x, mask, weight_size, geo, block, config)
    want = _ref(dy, x, weight_size, geo, mask)
    fam.assert_matches_reference(dw, want, dtype)
    assert (dw[~mask] == 0).all()  # exactly: the mask's zeros are stored, not computed
    return dw


def _config(block_m=16, split=1):
    return Config({"BLOCK_M": block_m, "SPLIT": split}, num_warps=4, num_stages=1)


# ---------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("key", sorted(CASES))
def test_geometries_dense_and_random_masks(key, kernel_device):
    """All-one and 0.5 / 0.1 random element masks, float64, over the forward's geometry cases (1/2/3-d,
    stride, stride 3 > kernel 1, dilation, (lo, hi) padding, every padding mode, groups, depthwise, N = 1)."""
    for density in ("one", 0.5, 0.1):
        _check(key, density, device=kernel_device)


@pytest.mark.parametrize("key", ["1d_K5_D2_G2_lohi_circular", "2d_K3_S2x1_D1x2_reflect", "3d_K3_S2_P1_G2"])
def test_block_structured_masks_with_sparsity_lists(key, kernel_device):
    """Whole tiles dropped (sparsity.block_mask) with the lists of sparsity.tile_lists, the op's own: rows with
    count < TK, so some slots write their tile's zeros and the others sum."""
    dy, x, weight_size, geo = _inputs(key, device=kernel_device)
    scores = torch.randn(weight_size, dtype=torch.float64)
    mask = sparsity.block_mask(scores, (16, 16), density=0.5, groups=geo["groups"]).to(kernel_device)
    lists = sparsity.tile_lists(mask, geo["groups"], (16, 16))
    assert (lists.count < lists.index.shape[-1]).any() and (lists.count > 0).any()
    dw = _run(dy, x, mask, weight_size, geo, lists=(lists.count, lists.index))
    torch.testing.assert_close(dw, _ref(dy, x, weight_size, geo, mask), atol=1e-12, rtol=1e-12)
    assert (dw[~mask] == 0).all()


def test_all_zero_mask_is_exactly_zero_even_with_nan(kernel_device):
    """count all 0: every slot writes its tile's zeros, nothing is read (NaN / Inf in x and dY change nothing)."""
    dy, x, weight_size, geo = _inputs("2d_K3_S2x1_D1x2_reflect", torch.float32, kernel_device)
    x[0, 1, 2, 3], dy[1, 0, 1, 1] = float("nan"), float("inf")
    mask = torch.zeros(weight_size, dtype=torch.bool, device=kernel_device)
    assert tile_lists(mask, geo["groups"], (16, 16))[0].sum() == 0
    for split in (1, 2):
        dw = _run(dy, x, mask, weight_size, geo, config=_config(16, split))
        torch.testing.assert_close(dw, torch.zeros(weight_size, device=kernel_device), atol=0, rtol=0)


def test_no_mask_is_the_dense_gradient_within_the_listed_tiles(kernel_device):
    """mask=None: the dense lists give the dense gradient; lists of a block mask give it in the listed tiles
    and exact zeros in the others (the lists alone zero a tile, also where x holds NaN)."""
    dy, x, weight_size, geo = _inputs("2d_K3_S2x1_D1x2_reflect", device=kernel_device)
    geo_g = geo["groups"]
    dense = kernels.dense_tile_lists(torch.empty(weight_size), geo_g, (16, 16))
    dw = _run(dy, x, None, weight_size, geo, lists=dense)
    torch.testing.assert_close(dw, _ref(dy, x, weight_size, geo), atol=1e-12, rtol=1e-12)
    tiles = block_mask(weight_size, geo_g, (16, 16), 0.5).to(kernel_device)
    count, index = tile_lists(tiles, geo_g, (16, 16))
    assert (count < index.shape[-1]).any() and (count > 0).any()
    x[:, :, 0, 0] = float("nan")  # every tap's sum sees a NaN: only the unlisted tiles stay finite
    dw = _run(dy, x, None, weight_size, geo, lists=(count, index))
    assert (dw[~tiles] == 0).all() and torch.isnan(dw[tiles]).any()


@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 32), (16, 64)], ids=str)
def test_blocks_and_odd_sizes(block, kernel_device):
    """C_out/G = 20 and K = 6·9 = 54 are multiples of neither side: partial o- and k-tiles at every block."""
    x = torch.randn(2, 6, 6, 5, dtype=torch.float64, device=kernel_device)
    padding = [(1, 1), (0, 2)]
    dy = torch.randn(2, 20, *out_size(x.shape, (3, 3), (1, 1), padding, (1, 1)), dtype=torch.float64,
                     device=kernel_device)
    weight_size = [20, 6, 3, 3]
    for density in ("one", 0.3, "block0.5"):
        mask = make_mask(weight_size, 1, block, density).to(kernel_device)
        dw = run(dy, x, mask, weight_size, (3, 3), (1, 1), padding, (1, 1), 1, "zeros", block)
        want = grad_weight_ref(dy, x, weight_size, (1, 1), padding, (1, 1), 1, "zeros") * mask
        torch.testing.assert_close(dw, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("split", [1, 2, 4, 8])
@pytest.mark.parametrize("key", ["1d_K3_S2_P1", "2d_K2x3_replicate_asym", "3d_K3_S2_P1_G2"])
def test_splits(key, split, kernel_device):
    """BLOCK_M 16 over N·L positions that are not a multiple of it (tiles span two samples, the last is
    partial), in SPLIT shares: the last shares hold fewer steps or none (split 8 · 16 > N·L)."""
    _check(key, 0.5, config=_config(16, split), device=kernel_device)


def test_split_is_deterministic(kernel_device):
    """The partials are summed in a fixed order: two runs agree bit for bit."""
    dy, x, weight_size, geo = _inputs("2d_K3_P1", torch.float32, kernel_device)
    mask = make_mask(weight_size, 1, (16, 16), 0.5).to(kernel_device)
    first = _run(dy, x, mask, weight_size, geo, config=_config(16, 4))
    torch.testing.assert_close(_run(dy, x, mask, weight_size, geo, config=_config(16, 4)), first, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("key", ["1d_K5_D2_G2_lohi_circular", "2d_K3_P1", "3d_K3_S2_P1_G2"])
def test_dtypes(key, dtype, kernel_device):
    """fp32 (exact products under the interpreter; TF32 on a GPU only where torch's precision allows), fp16
    and bf16 (upcast for tl.dot under the interpreter, rounded once by the launcher) within the dtype's
    tolerance of the float64 gradient of the same values, one share and two (the fp32 partials)."""
    for split in (1, 2):
        _check(key, 0.5, dtype=dtype, config=_config(16, split), device=kernel_device)


def test_fp32_follows_torch_matmul_precision(kernel_device):
    with fam.float32_matmul_precision("highest"):
        _check("2d_K3_P1", "one", dtype=torch.float32, device=kernel_device)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "mask_permuted"])
def test_layouts(layout, kernel_device):
    """x and dY channels-last (2-d and 3-d) or strided slices; a mask with no [C_out, C_in/G, ∏kernel] view."""
    for key in ("2d_K3_S2x1_D1x2_reflect", "3d_K3_S2_P1_G2"):
        dy, x, weight_size, geo = _inputs(key, torch.float32, kernel_device)
        mask = make_mask(weight_size, geo["groups"], (16, 16), 0.5).to(kernel_device)
        if layout == "channels_last":
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            x, dy = x.to(memory_format=fmt), dy.to(memory_format=fmt)
            assert not x.is_contiguous() and not dy.is_contiguous()
        elif layout == "sliced":
            x = torch.randn(x.shape[0], 2 * x.shape[1], *x.shape[2:-1], x.shape[-1] + 3, device=kernel_device)
            x = x[:, ::2, ..., 1:-2]
            dy = torch.randn(dy.shape[0], dy.shape[1], *dy.shape[2:-1], 2 * dy.shape[-1], device=kernel_device)
            dy = dy[..., ::2]
        else:
            mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
            assert not mask.is_contiguous()
        dw = _run(dy, x, mask, weight_size, geo)
        want = _ref(dy, x, weight_size, geo, mask)
        torch.testing.assert_close(dw.double(), want, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])


def test_x_alignment_is_asserted_only_where_proved(kernel_device, monkeypatch):
    """VEC (the 16-byte alignment of x's sub-tile rows, asserted to the compiler) is 16 / element size for a
    channels-last x whose strides are multiples of it (here a contiguous x, copied channels-last), and 1 for a
    32-channel slice of a 42-channel channels-last tensor (already channels-last, so not copied: its strides,
    multiples of 42, are not multiples of 4 fp32 elements); both give the reference's dW."""
    real = grad_weight_module.masked_conv_grad_weight_kernel
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((kwargs["SUB"], kwargs["VEC"]))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(grad_weight_module, "masked_conv_grad_weight_kernel", Recorder())
    weight_size = [16, 32, 3, 3]
    geo = dict(kernel=[3, 3], stride=[1, 1], padding=[(1, 1), (1, 1)], dilation=[1, 1], groups=1, mode="zeros")
    wide = torch.randn(2, 42, 5, 6, device=kernel_device).to(memory_format=torch.channels_last)
    for x, vec in ((torch.randn(2, 32, 5, 6, device=kernel_device), 4), (wide[:, 5:37], 1)):
        dy = torch.randn(2, 16, 5, 6, device=kernel_device)
        mask = make_mask(weight_size, 1, (16, 16), 0.5).to(kernel_device)
        dw = _run(dy, x, mask, weight_size, geo)
        assert seen[-1] == (16, vec)
        torch.testing.assert_close(dw.double(), _ref(dy, x, weight_size, geo, mask), atol=TOL[torch.float32][0],
                                   rtol=TOL[torch.float32][1])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmul
@pytest.mark.parametrize("split", [1, 2])
def test_masked_entries_are_exact_zeros_with_nan_and_inf(split, kernel_device):
    """NaN in x and Inf in dY reach every entry's sum; the mask's zeros stay exact zeros (a where, not a
    product: 0·NaN is NaN), in one share and in several; the kept entries are NaN / Inf as the reference's."""
    dy, x, weight_size, geo = _inputs("2d_K3_P1", torch.float32, kernel_device)
    x[0, :, 3, 3] = float("nan")
    dy[1, 2, 2, 2] = float("inf")
    mask = make_mask(weight_size, 1, (16, 16), 0.5).to(kernel_device)
    assert mask.any() and not mask.all()
    dw = _run(dy, x, mask, weight_size, geo, config=_config(16, split))
    assert (dw[~mask] == 0).all()
    want = _ref(dy, x, weight_size, geo)
    assert not torch.isfinite(want[mask]).all()
    torch.testing.assert_close(dw[mask].double(), want[mask], atol=TOL[torch.float32][0],
                               rtol=TOL[torch.float32][1], equal_nan=True)


def test_offsets_past_int32(tmp_path, kernel_device):
    """x's channel c and dY's channel o at c · HUGE and o · HUGE, the mask's output channel o at o · HUGE: past
    2^31 from the second on (groups 2: group 1's first channel too)."""
    x = torch.randint(-4, 5, (2, 4, 5)).float().to(kernel_device)  # integers: exact sums in fp32
    dy = torch.randint(-4, 5, (2, 4, 5)).float().to(kernel_device)
    mask = torch.rand(4, 2, 3, device=kernel_device) < 0.7
    xh = huge_view(x, (1, HUGE, 4), tmp_path, "x")
    dyh = huge_view(dy, (1, HUGE, 4), tmp_path, "dy")
    mh = huge_view(mask, (HUGE, 3, 1), tmp_path, "mask")
    count, index = tile_lists(mask.cpu(), 2, (16, 16))
    for split in (1, 2):
        dw = kernels.masked_conv_grad_weight(dyh, xh, mh, count.to(kernel_device), index.to(kernel_device),
                                             [4, 2, 3], [3], [1], [1, 1], [1], "zeros", 2, (16, 16),
                                             config=_config(16, split))
        want = torch.nn.grad.conv1d_weight(x.double(), [4, 2, 3], dy.double(), 1, 1, 1, 2) * mask
        torch.testing.assert_close(dw.double(), want, atol=0, rtol=0)


def test_empty_dims(kernel_device, monkeypatch):
    """N = 0: dW is exactly zero, no launch; C_out = 0 and C_in = 0: an empty dW, no launch; an empty spatial
    input with padding has positions (all reading padding): launched, exactly zero."""
    geom = ([3], [1], [1, 1], [1], "zeros")
    kernel = kernels.masked_conv_grad_weight_kernel

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError(f"launched with grid {grid}")

    monkeypatch.setattr(grad_weight_module, "masked_conv_grad_weight_kernel", NoLaunch())
    for n, co, c in ((0, 4, 2), (2, 0, 2), (2, 4, 0)):
        x = torch.randn(n, c, 5, device=kernel_device)
        dy = torch.randn(n, co, 5, device=kernel_device)
        count, index = kernels.dense_tile_lists(torch.empty(co, c, 3), 1, (16, 16))
        mask = torch.ones(co, c, 3, dtype=torch.bool, device=kernel_device)
        dw = kernels.masked_conv_grad_weight(dy, x, mask, count.to(kernel_device), index.to(kernel_device),
                                             [co, c, 3], *geom, 1, (16, 16))
        assert dw.shape == (co, c, 3) and dw.dtype == x.dtype and dw.is_contiguous()
        torch.testing.assert_close(dw, torch.zeros(co, c, 3, device=kernel_device), atol=0, rtol=0)
    monkeypatch.setattr(grad_weight_module, "masked_conv_grad_weight_kernel", kernel)
    x = torch.randn(2, 2, 0, device=kernel_device)
    dy = torch.randn(2, 4, 1, device=kernel_device)
    count, index = kernels.dense_tile_lists(torch.empty(4, 2, 2), 1, (16, 16))
    dw = kernels.masked_conv_grad_weight(dy, x, None, count.to(kernel_device), index.to(kernel_device), [4, 2, 2],
                                         [2], [1], [1, 1], [1], "zeros", 1, (16, 16))
    torch.testing.assert_close(dw, torch.zeros(4, 2, 2, device=kernel_device), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_configs_are_in_the_declared_space(dtype):
    """Every candidate and heuristic default (for each block) is one the table reader accepts: BLOCK_M a power
    of two, ≥ 16 where tl.dot runs (not fp64's broadcast-sum), SPLIT a power of two ≤ 64; the default is the
    same for a key's raw and bucketed dims; the space holds no BLOCK_O / BLOCK_K (the block is a lookup dim)."""
    spec = autotune.get_spec(NAME)
    assert set(spec.space.tiles) == {"BLOCK_M", "SPLIT"} and set(spec.dims) == {"M", "O", "K", "BO", "BK"}

    def split_bounds(cfg, bo, bk):
        split = cfg.meta["SPLIT"]
        assert split & (split - 1) == 0 and 1 <= split <= 64, cfg

    fam.check_config_space(NAME, kernels.BLOCK_SIZES, {"O": 200, "K": 1152}, dtype, split_bounds, keep_default=True)


def test_heuristic_splits_when_tiles_are_few():
    """A ResNet-size layer (9 tiles of 64 × 64, 10^5 positions) gets shares for 132 SMs; a layer with
    thousands of tiles, or few positions, gets one; the interpreter always one."""
    spec = autotune.get_spec(NAME)
    few = {"M": 100352, "O": 64, "K": 576, "BO": 64, "BK": 64}
    many = {"M": 100352, "O": 4096, "K": 4096, "BO": 64, "BK": 64}
    for dtype in (torch.float16, torch.float32):
        split = spec.default_config(few, dtype, False).meta["SPLIT"]
        assert 9 * split >= 132 and split <= 64
        assert spec.default_config(many, dtype, False).meta["SPLIT"] == 1
        assert spec.default_config({**few, "M": 64}, dtype, False).meta["SPLIT"] == 1
        assert spec.default_config(few, dtype, True).meta["SPLIT"] == 1


def test_every_candidate_config_runs(kernel_device):
    """Each of a small problem's candidate (BLOCK_M, SPLIT) pairs, fp32 and fp64 (warps and stages do nothing
    in the interpreter)."""
    spec = autotune.get_spec(NAME)
    for key, dtype in (("2d_K3_P1", torch.float32), ("1d_K3_S2_P1", torch.float64)):
        dy, _, weight_size, _ = _inputs(key, dtype, kernel_device)
        dims = {"M": dy.shape[0] * math.prod(dy.shape[2:]), "O": weight_size[0],
                "K": math.prod(weight_size[1:]), "BO": 16, "BK": 16}
        pairs = sorted({(c.meta["BLOCK_M"], c.meta["SPLIT"]) for c in spec.candidates(dims, dtype)})
        assert len(pairs) > 1
        for bm, split in pairs:
            _check(key, 0.5, dtype=dtype, config=_config(bm, split), device=kernel_device)


def test_force_config(kernel_device):
    with autotune.force_config(NAME, BLOCK_M=16, SPLIT=2):
        _check("1d_K3_S2_P1", 0.5, device=kernel_device)
    with pytest.raises(ValueError, match="BLOCK_O"), autotune.force_config(NAME, BLOCK_M=32, SPLIT=1, BLOCK_O=16):
        pass


def test_tune_problem_runs_and_matches(kernel_device):
    assert_tune_problems_match(NAME, kernel_device)


# ---------------------------------------------------------------------------------------------- bad input
def _good(device="cpu"):
    x = torch.randn(2, 4, 6, 6, device=device)
    dy = torch.randn(2, 6, 6, 6, device=device)
    count, index = kernels.dense_tile_lists(torch.empty(6, 2, 3, 3), 2, (16, 16))
    return dict(grad=dy, x=x, mask=torch.ones(6, 2, 3, 3, dtype=torch.bool, device=device),
                count=count.to(device), index=index.to(device), weight_size=[6, 2, 3, 3], **fam.BAD_INPUT_GEOMETRY)


BAD = {
    "grad_not_tensor": ({"grad": lambda a: a["grad"].tolist()}, TypeError, "grad must be a torch.Tensor"),
    "grad_dtype": ({"grad": lambda a: a["grad"].double()}, TypeError, "grad has dtype"),
    "grad_int": ({"grad": lambda a: a["grad"].long()}, TypeError, "grad must have a floating dtype"),
    "grad_channels": ({"grad": lambda a: a["grad"][:, :5]}, ValueError, r"grad must be \[N, C_out, \*out\]"),
    "grad_spatial": ({"grad": lambda a: a["grad"][..., :5]}, ValueError, r"grad must be \[N, C_out, \*out\]"),
    "grad_batch": ({"grad": lambda a: a["grad"][:1]}, ValueError, r"grad must be \[N, C_out, \*out\]"),
    "input_int": ({"x": lambda a: a["x"].long()}, TypeError, "input must have a floating dtype"),
    "mask_float": ({"mask": lambda a: a["mask"].float()}, TypeError, "mask must be a bool tensor"),
    "mask_not_tensor": ({"mask": lambda a: True}, TypeError, "mask must be a tensor or None"),
    "mask_shape": ({"mask": lambda a: a["mask"][:, :, :2]}, ValueError, "mask must have the weight's shape"),
    "weight_size_kernel": ({"weight_size": lambda a: [6, 2, 3, 2]}, ValueError, "weight_size must be"),
    "weight_size_channels": ({"weight_size": lambda a: [6, 4, 3, 3]}, ValueError, "weight_size must be"),
    "weight_size_rank": ({"weight_size": lambda a: [6, 2, 9]}, ValueError, "weight_size must be"),
    "weight_size_floats": ({"weight_size": lambda a: [6.0, 2, 3, 3]}, TypeError, "weight_size must be a list of"),
    "groups_divide_cout": ({"weight_size": lambda a: [5, 2, 3, 3], "grad": lambda a: a["grad"][:, :5]},
                           ValueError, "groups=2 must divide the output"),
    "groups_divide_cin": ({"groups": lambda a: 3}, ValueError, "groups=3 must divide"),
    "count_dtype": ({"count": lambda a: a["count"].long()}, TypeError, "count must be int32"),
    "count_groups": ({"count": lambda a: a["count"][:1]}, ValueError, "count must have shape"),
    "index_shape": ({"index": lambda a: a["index"][..., :1]}, ValueError, r"index must have shape \(2, 1, 2\)"),
    "block_not_pow2": ({"block": lambda a: (24, 16)}, ValueError, "block must be"),
    "block_8": ({"block": lambda a: (8, 16)}, ValueError, "block must be"),
    "block_triple": ({"block": lambda a: (16, 16, 16)}, TypeError, "block must be a pair"),
    "padding_mode": ({"padding_mode": lambda a: "mirror"}, ValueError, "padding_mode must be one of"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, kernel_device):
    fam.assert_refuses(kernels.masked_conv_grad_weight, _good(kernel_device), BAD[case])


def test_good_input_runs(kernel_device):
    """The bad-input table's base case is accepted (so each case fails for its own change)."""
    args = _good(kernel_device)
    dw = kernels.masked_conv_grad_weight(**args)
    want = torch.nn.grad.conv2d_weight(args["x"].double(), [6, 2, 3, 3], args["grad"].double(), 1, 1, 1, 2)
    torch.testing.assert_close(dw.double(), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- the tap walk
# C_in/G with a power-of-two divisor >= 16 takes the tap walk (SUB > 0: a tile's sub-tiles of one tap each,
# per-(position, sub-tile) validity, channels-last vector loads); the forward's TAP_CASES (one sub-tile per
# k-tile, two, a sub-tile stepping to the next tap, groups, every padding mode, 1/2/3-d, 27 and 35 taps)
def _tap_inputs(key, dtype=torch.float64, device="cpu", layout="contiguous"):
    shape, co, kernel, stride, padding, dilation, groups, mode, block = TAP_CASES[key]
    x = torch.randn(shape, dtype=dtype, device=device)
    dy = torch.randn(shape[0], co, *out_size(shape, kernel, stride, padding, dilation), dtype=dtype, device=device)
    if layout == "channels_last":
        x, dy = (t.movedim(1, -1).contiguous().movedim(-1, 1) for t in (x, dy))
    elif layout == "sliced":
        x = torch.randn(shape[0], 2 * shape[1], *shape[2:-1], shape[-1] + 3, dtype=dtype, device=device)
        x = x[:, ::2, ..., 1:-2]
    assert kernels._tap_tile(shape[1] // groups, block[1])["SUB"] >= 16  # the tap walk, not the fallback
    weight_size = [co, shape[1] // groups, *kernel]
    return dy, x, weight_size, dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                    mode=mode), block


def _tap_check(key, density, dtype=torch.float64, device="cpu", layout="contiguous", config=None):
    dy, x, weight_size, geo, block = _tap_inputs(key, dtype, device, layout)
    mask = make_mask(weight_size, geo["groups"], block, density).to(device)
    dw = _run(dy, x, mask, weight_size, geo, block, config)
    want = _ref(dy, x, weight_size, geo, mask)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(dw.double(), want, atol=atol, rtol=rtol)
    assert (dw[~mask] == 0).all()
    return dw


@pytest.mark.parametrize("key", sorted(TAP_CASES))
def test_tap_walk(key, kernel_device):
    """Dense, random and whole-tile masks through the tap walk, every padding mode, 1/2/3-d."""
    for density in ("one", 0.3, "block0.5"):
        _tap_check(key, density, device=kernel_device)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_tap_walk_layouts(layout, kernel_device):
    """Channels-last x and dY are read in place (vector loads along C); other layouts are copied once."""
    for key in ("2d_C32_K3_S2_P1_b16x64", "3d_C16_K3_S2_P1"):
        _tap_check(key, 0.5, torch.float32, kernel_device, layout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tap_walk_16bit(dtype, kernel_device):
    _tap_check("2d_C16_G2_S2x1_D1x2_reflect", 0.5, dtype, kernel_device)
    _tap_check("2d_C32_K3_S2_P1_b16x64", "block0.5", dtype, kernel_device)


@pytest.mark.parametrize("split", [1, 3])
def test_tap_walk_steps_cross_samples_and_split(split, kernel_device):
    """BLOCK_M 16 over N·L = 2·15 positions: steps span both samples, the last is partial; shares."""
    _tap_check("2d_C16_K1x3_P2x1", 0.5, device=kernel_device, config=_config(16, split))


@pytest.mark.parametrize("bl", [0, 16, 4], ids=["flat", "plane_one_sample", "plane_four_samples"])
@pytest.mark.parametrize("key", sorted(TAP_CASES))
def test_tap_walk_plane_and_flat(key, bl, monkeypatch, kernel_device):
    """Both position walks on every tap case, BLOCK_M 16 in 3 shares (a share's pairs begin and end inside an
    l-block): the flat walk (steps of 16 consecutive positions), the plane walk with one sample of 16 positions per
    step and with four samples of 4 (N ≤ 2 here: lanes past N; more l-blocks than samples)."""
    calls = []
    monkeypatch.setattr(grad_weight_module, "_gw_plane", lambda L, bm: calls.append((L, bm)) or bl)
    _tap_check(key, 0.5, device=kernel_device, config=_config(16, 3))
    assert calls and all(bm == 16 for _, bm in calls)


def test_plane_walk_choice():
    """The plane walk's BL: the smallest power of two holding a plane, at most BLOCK_M, where its tiles are at least
    3/4 positions (7² in 64: 0.77; 28² in 7 tiles of 128: 0.875); else the flat walk (3² in 16: 0.56; 130 in 2
    tiles of 128: 0.51)."""
    assert grad_weight_module._gw_plane(49, 128) == 64
    assert grad_weight_module._gw_plane(784, 128) == 128
    assert grad_weight_module._gw_plane(256, 128) == 128
    assert grad_weight_module._gw_plane(1, 16) == 1
    assert grad_weight_module._gw_plane(9, 16) == 0
    assert grad_weight_module._gw_plane(130, 128) == 0
    assert grad_weight_module._gw_plane(40, 16) == 16  # 40 in 3 tiles of 16: 0.83


def test_tap_walk_nan_outside_the_mask_and_deterministic(kernel_device):
    """NaN in x never reaches a masked entry, and two runs agree bit for bit."""
    dy, x, weight_size, geo, block = _tap_inputs("2d_C32_K3_S2_P1_b16x64", torch.float32, kernel_device)
    mask = make_mask(weight_size, geo["groups"], block, "block0.5").to(kernel_device)
    a = _run(dy, x, mask, weight_size, geo, block, _config(16, 2))
    b = _run(dy, x, mask, weight_size, geo, block, _config(16, 2))
    assert torch.equal(a, b)
    x[0, 0, 0, 0] = float("nan")
    c = _run(dy, x, mask, weight_size, geo, block, _config(16, 2))
    assert (c[~mask] == 0).all()


@pytest.mark.parametrize("key", ["2d_C32_K3_S2_P1_b16x64", "2d_C16_G2_S2x1_D1x2_reflect"])
def test_tap_walk_coactivation_count_thresholds(key, kernel_device):
    """The fused thresholds (coactivation counts) through the tap walk: the weight gradient of the binarized
    tensors, a padded tap absent whatever θ_x (θ_x < 0 here), NaN never above a threshold; fp16 operands, fp32
    counts (exact)."""
    dy, x, weight_size, geo, block = _tap_inputs(key, torch.float16, kernel_device)
    x[0, 0, 0, 0] = float("nan")
    th = (-0.25, 0.5)
    mask = make_mask(weight_size, geo["groups"], block, "block0.5").to(kernel_device)
    count, index = tile_lists(mask, geo["groups"], block)
    flat = [v for p in geo["padding"] for v in p]
    got = kernels.masked_conv_grad_weight(dy, x, mask, count.to(kernel_device), index.to(kernel_device), weight_size,
                                          list(geo["kernel"]), list(geo["dilation"]), flat, list(geo["stride"]),
                                          geo["mode"], geo["groups"], block, thresholds=th)
    xb, yb = (x.float() > th[0]).double(), (dy.float() > th[1]).double()
    want = _ref(yb, xb, weight_size, geo, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=0, rtol=0)
