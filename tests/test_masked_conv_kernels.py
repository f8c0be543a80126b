"""The masked-conv forward kernel (convzoo.kernels.masked_conv) against ``F.convNd(x, weight * mask)``
(padding modes through ``F.pad``, float64): densities from all-zero to dense, random and block-structured
masks, 1/2/3-d, strides, dilation, groups incl. depthwise, every padding mode, odd sizes (C_out/G not a
multiple of BO, K not a multiple of BK), several position tiles crossing sample boundaries, every dtype,
channels-last and strided inputs; that omitted tiles are never read (NaN-poisoned); the config space;
bad input. The tile lists are built here from the mask by a plain-torch helper (brute force), independent
of ``convzoo.sparsity``."""

import math

import _families as fam
import pytest
import torch
import torch.nn.functional as F
from problems import TOL, assert_tune_problems_match

from convzoo import autotune
from convzoo.autotune import Config
from convzoo.kernels import masked_conv as kernels

# ---------------------------------------------------------------------------------------------- helpers


def tile_lists(mask: torch.Tensor, groups: int, block) -> tuple[torch.Tensor, torch.Tensor]:
    """``(count, index)`` of ``mask`` (weight-shaped, nonzero = kept) for ``block = (BO, BK)``: per group the
    ``[C_out/G, K]`` matrix ``mask[o].movedim(0, -1).flatten()`` (tap-major columns), tiled; ``count[g, to]``
    non-empty k-tiles of row ``to``,
    ``index[g, to]`` those first, ascending, then the empty ones (padding the kernel must never read: a
    test that poisons the empty tiles catches a read past ``count``)."""
    bo, bk = block
    co = mask.shape[0]
    og, k = co // groups, math.prod(mask.shape[1:])
    to, tk = -(-og // bo), -(-k // bk)
    occ = (mask.movedim(1, -1).reshape(groups, og, k) != 0)
    occ = F.pad(occ, (0, tk * bk - k, 0, to * bo - og)).reshape(groups, to, bo, tk, bk).any(dim=4).any(dim=2)
    count = occ.sum(-1, dtype=torch.int32)
    index = torch.sort((~occ).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return count, index


def block_mask(shape, groups: int, block, density: float) -> torch.Tensor:
    """A mask whose kept entries fill whole random tiles (``round(density · tiles)`` of them)."""
    bo, bk = block
    co = shape[0]
    og, k = co // groups, math.prod(shape[1:])
    to, tk = -(-og // bo), -(-k // bk)
    n_tiles = groups * to * tk
    keep = torch.zeros(n_tiles, dtype=torch.bool)
    keep[torch.randperm(n_tiles)[:round(density * n_tiles)]] = True
    full = keep.reshape(groups, to, 1, tk, 1).expand(groups, to, bo, tk, bk).reshape(groups, to * bo, tk * bk)
    return full[:, :og, :k].reshape(co, *shape[2:], shape[1]).movedim(-1, 1).clone()  # tap-major columns


def make_mask(shape, groups, block, density) -> torch.Tensor:
    """``density``: a float (random elements), ``"block0.5"`` (whole tiles), ``"zero"`` or ``"one"``."""
    return fam.density_mask(shape, density, lambda share: block_mask(shape, groups, block, share))


def conv_ref(x, weight, bias, stride, padding, dilation, groups, mode):
    """``F.convNd`` in float64 after ``F.pad`` in ``mode`` (``padding`` per-dim ``(lo, hi)`` pairs)."""
    nd = x.dim() - 2
    flat = [v for lo, hi in reversed(padding) for v in (lo, hi)]
    xp = F.pad(x.double(), flat, mode="constant" if mode == "zeros" else mode)
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(xp, weight.double(), None if bias is None else bias.double(), stride, 0, dilation, groups)


def run(x, weight, mask, bias, kernel, stride, padding, dilation, groups, mode, block, config=None):
    """The launcher on ``weight * mask`` with ``mask``'s tile lists (``padding``: (lo, hi) pairs)."""
    count, index = tile_lists(mask, groups, block)
    flat = [v for p in padding for v in p]
    w = weight * mask.to(weight.dtype)
    return kernels.masked_conv(x, w, count.to(x.device), index.to(x.device), bias, list(kernel), list(dilation),
                               flat, list(stride), mode, groups, block, config=config)


# id: (x shape, C_out, kernel, stride, padding pairs, dilation, groups, mode)
CASES = {
    "1d_K3_S2_P1": ((2, 4, 11), 6, (3,), (2,), [(1, 1)], (1,), 1, "zeros"),
    "1d_K5_D2_G2_lohi_circular": ((2, 4, 13), 4, (5,), (1,), [(3, 1)], (2,), 2, "circular"),
    "2d_K3_P1": ((2, 3, 7, 6), 5, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 1, "zeros"),
    "2d_K3_S2x1_D1x2_reflect": ((2, 4, 7, 8), 6, (3, 3), (2, 1), [(1, 1), (2, 2)], (1, 2), 2, "reflect"),
    "2d_K2x3_replicate_asym": ((1, 3, 5, 6), 4, (2, 3), (1, 2), [(1, 0), (2, 1)], (1, 1), 1, "replicate"),
    "2d_K3_depthwise": ((2, 5, 6, 6), 5, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 5, "zeros"),
    "2d_K3_depthwise_x2_circular": ((2, 3, 5, 5), 6, (3, 3), (2, 2), [(2, 2), (1, 1)], (1, 1), 3, "circular"),
    "2d_K1_S3": ((2, 6, 7, 5), 20, (1, 1), (3, 3), [(0, 0), (0, 0)], (1, 1), 1, "zeros"),
    "3d_K3_S2_P1_G2": ((2, 4, 4, 5, 4), 4, (3, 3, 3), (2, 2, 2), [(1, 1)] * 3, (1, 1, 1), 2, "zeros"),
    "3d_K2x1x3_reflect": ((1, 2, 3, 4, 5), 3, (2, 1, 3), (1, 1, 2), [(1, 0), (0, 1), (1, 1)], (1, 1, 1), 1,
                          "reflect"),
}


def _inputs(key, dtype=torch.float64, bias=True, device="cpu"):
    shape, co, kernel, stride, padding, dilation, groups, mode = CASES[key]
    x = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(co, shape[1] // groups, *kernel, dtype=dtype, device=device)
    b = torch.randn(co, dtype=dtype, device=device) if bias else None
    return x, w, b, dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, mode=mode)


def _check(key, density, block=(16, 16), dtype=torch.float64, config=None, bias=True, device="cpu"):
    x, w, b, geo = _inputs(key, dtype, bias, device)
    mask = make_mask(w.shape, geo["groups"], block, density).to(device)
    y = run(x, w, mask, b, geo["kernel"], geo["stride"], geo["padding"], geo["dilation"], geo["groups"],
            geo["mode"], block, config)
    want = conv_ref(x, w * mask, b, geo["stride"], geo["padding"], geo["dilation"], geo["groups"], geo["mode"])
    fam.assert_matches_reference(y, want, dtype)
    return y, want


# ---------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("key", sorted(CASES))
def test_dense_and_random_masks(key, kernel_device):
    """Densities 1.0 and 0.5 / 0.1 random elements, float64, over the geometry cases."""
    for density in ("one", 0.5, 0.1):
        _check(key, density, device=kernel_device)


@pytest.mark.parametrize("key", ["1d_K5_D2_G2_lohi_circular", "2d_K3_S2x1_D1x2_reflect", "3d_K3_S2_P1_G2"])
@pytest.mark.parametrize("density", ["block0.5", "block0.25"])
def test_block_structured_masks(key, density, kernel_device):
    """Whole tiles kept or dropped: the lists really skip tiles (count < TK), and rows differ in count."""
    _, w, _, geo = _inputs(key)
    mask = make_mask(w.shape, geo["groups"], (16, 16), density)
    count, _ = tile_lists(mask, geo["groups"], (16, 16))
    tk = -(-math.prod(w.shape[1:]) // 16)
    assert (count < tk).any() or tk == 1
    _check(key, density, device=kernel_device)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_all_zero_mask_gives_the_bias(bias, kernel_device):
    """count all 0: no k-step runs, y is the bias broadcast (exactly), or zeros."""
    x, w, b, geo = _inputs("2d_K3_S2x1_D1x2_reflect", torch.float32, bias, kernel_device)
    mask = torch.zeros_like(w, dtype=torch.bool)
    assert tile_lists(mask, geo["groups"], (16, 16))[0].sum() == 0
    y = run(x, w, mask, b, geo["kernel"], geo["stride"], geo["padding"], geo["dilation"], geo["groups"],
            geo["mode"], (16, 16))
    want = torch.zeros_like(y) if b is None else b[:, None, None].expand_as(y)
    torch.testing.assert_close(y, want, atol=0, rtol=0)


@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 32), (16, 64)], ids=str)
def test_blocks_and_odd_sizes(block, kernel_device):
    """C_out/G = 20 and K = 6·9 = 54 are multiples of neither side: partial o- and k-tiles at every block."""
    x = torch.randn(2, 6, 6, 5, dtype=torch.float64, device=kernel_device)
    w = torch.randn(20, 6, 3, 3, dtype=torch.float64, device=kernel_device)
    b = torch.randn(20, dtype=torch.float64, device=kernel_device)
    for density in (1.0, 0.3, "block0.5"):
        mask = make_mask(w.shape, 1, block, density).to(kernel_device)
        y = run(x, w, mask, b, (3, 3), (1, 1), [(1, 1), (0, 2)], (1, 1), 1, "zeros", block)
        want = conv_ref(x, w * mask, b, (1, 1), [(1, 1), (0, 2)], (1, 1), 1, "zeros")
        torch.testing.assert_close(y, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("key", ["1d_K3_S2_P1", "2d_K2x3_replicate_asym", "3d_K2x1x3_reflect"])
def test_position_tiles_cross_samples(key, kernel_device):
    """BLOCK_M 16 over N·L positions that are not a multiple of it: tiles span two samples, the last is partial."""
    _check(key, 0.5, config=Config({"BLOCK_M": 16}, 4, 1), device=kernel_device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("key", ["1d_K5_D2_G2_lohi_circular", "2d_K3_P1", "3d_K3_S2_P1_G2"])
def test_dtypes(key, dtype, kernel_device):
    """fp32 (exact products under the interpreter; TF32 on a GPU only where torch's precision allows),
    fp16 and bf16 (upcast for tl.dot under the interpreter) within the dtype's tolerance."""
    _check(key, 0.5, dtype=dtype, device=kernel_device)


def test_fp32_follows_torch_matmul_precision(kernel_device):
    """'highest' asks for IEEE fp32 products: within fp32's tolerance of the float64 conv."""
    with fam.float32_matmul_precision("highest"):
        _check("2d_K3_P1", 1.0, dtype=torch.float32, device=kernel_device)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "weight_permuted"])
def test_input_and_weight_layouts(layout, kernel_device):
    """x channels-last (2-d and 3-d) or a strided slice; a weight whose strides have no [C_out, K] view."""
    for key in ("2d_K3_S2x1_D1x2_reflect", "3d_K3_S2_P1_G2"):
        x, w, b, geo = _inputs(key, torch.float32, device=kernel_device)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        elif layout == "sliced":
            x = torch.randn(x.shape[0], 2 * x.shape[1], *x.shape[2:-1], x.shape[-1] + 3, device=kernel_device)
            x = x[:, ::2, ..., 1:-2]
        else:
            w = w.transpose(-1, -2).contiguous().transpose(-1, -2)
            assert not w.is_contiguous()
        mask = make_mask(w.shape, geo["groups"], (16, 16), 0.5).to(kernel_device)
        y = run(x, w, mask, b, geo["kernel"], geo["stride"], geo["padding"], geo["dilation"], geo["groups"],
                geo["mode"], (16, 16))
        want = conv_ref(x, w * mask, b, geo["stride"], geo["padding"], geo["dilation"], geo["groups"], geo["mode"])
        torch.testing.assert_close(y.double(), want, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])


def test_omitted_tiles_are_never_read(kernel_device):
    """NaN in every tile the lists omit (and the lists' padding entries point at those tiles): y stays finite
    and equals the conv with those tiles zeroed, so neither an omitted tile nor a padding entry past
    ``count`` is read."""
    x, w, b, geo = _inputs("2d_K3_S2x1_D1x2_reflect", torch.float32, device=kernel_device)
    block = (16, 16)
    mask = block_mask(w.shape, geo["groups"], block, 0.5).to(kernel_device)
    count, index = tile_lists(mask, geo["groups"], block)
    assert (count > 0).any() and (count < index.shape[-1]).any()  # both kinds of tile in some row
    poisoned = torch.where(mask, w, torch.full_like(w, float("nan")))
    flat = [v for p in geo["padding"] for v in p]
    y = kernels.masked_conv(x, poisoned, count.to(kernel_device), index.to(kernel_device), b, list(geo["kernel"]),
                            list(geo["dilation"]), flat, list(geo["stride"]), geo["mode"], geo["groups"], block)
    assert torch.isfinite(y).all()
    want = conv_ref(x, w * mask, b, geo["stride"], geo["padding"], geo["dilation"], geo["groups"], geo["mode"])
    torch.testing.assert_close(y.double(), want, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])
    # and the check can fail: with a dense list the NaNs are read
    dense = kernels.dense_tile_lists(w, geo["groups"], block)
    y = kernels.masked_conv(x, poisoned, *(t.to(kernel_device) for t in dense), b, list(geo["kernel"]),
                            list(geo["dilation"]), flat, list(geo["stride"]), geo["mode"], geo["groups"], block)
    assert torch.isnan(y).any()


def test_empty_dims(kernel_device):
    """N = 0 and C_out = 0: an empty result, no launch; C_in = 0 (K = 0, TK = 0): y is the bias."""
    geom = ([3], [1], [1, 1], [1], "zeros")
    x = torch.randn(0, 2, 5, device=kernel_device)
    w = torch.randn(4, 2, 3, device=kernel_device)
    y = kernels.masked_conv(x, w, *kernels.dense_tile_lists(w, 1, (16, 16)), None, *geom, 1, (16, 16))
    assert y.shape == (0, 4, 5)
    x = torch.randn(2, 2, 5, device=kernel_device)
    w0 = torch.randn(0, 2, 3, device=kernel_device)
    y = kernels.masked_conv(x, w0, *kernels.dense_tile_lists(w0, 1, (16, 16)), None, *geom, 1, (16, 16))
    assert y.shape == (2, 0, 5)
    x = torch.randn(2, 0, 5, device=kernel_device)
    w = torch.randn(4, 0, 3, device=kernel_device)
    b = torch.randn(4, device=kernel_device)
    count, index = kernels.dense_tile_lists(w, 1, (16, 16))
    assert index.shape == (1, 1, 0)
    y = kernels.masked_conv(x, w, count, index, b, *geom, 1, (16, 16))
    torch.testing.assert_close(y, b[:, None].expand(2, 4, 5), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_configs_are_in_the_declared_space(dtype):
    """Every candidate and heuristic default (for each block) is one the table reader accepts, BLOCK_M a
    power of two and ≥ 16 where tl.dot runs (not fp64's broadcast-sum); the space holds no BLOCK_O / BLOCK_K
    (the block is a lookup dim, so no config can disagree with the tile lists)."""
    spec = autotune.get_spec("masked_conv_fwd")
    assert set(spec.space.tiles) == {"BLOCK_M"} and set(spec.dims) == {"M", "O", "K", "BO", "BK"}
    fam.check_config_space("masked_conv_fwd", kernels.BLOCK_SIZES, {"O": 256, "K": 1152}, dtype)


def test_every_candidate_config_runs(kernel_device):
    """Each of a problem's candidate BLOCK_M values (warps and stages do nothing in the interpreter)."""
    spec = autotune.get_spec("masked_conv_fwd")
    dims = {"M": 2 * 7 * 6, "O": 5, "K": 27, "BO": 16, "BK": 16}
    for bm in sorted({c.meta["BLOCK_M"] for c in spec.candidates(dims, torch.float32)}):
        _check("2d_K3_P1", 0.5, dtype=torch.float32, config=Config({"BLOCK_M": bm}, 4, 1), device=kernel_device)


def test_force_config_sets_block_m_only(kernel_device):
    with autotune.force_config("masked_conv_fwd", BLOCK_M=16):
        _check("1d_K3_S2_P1", 0.5, device=kernel_device)
    with pytest.raises(ValueError, match="BLOCK_O"), autotune.force_config("masked_conv_fwd", BLOCK_M=32, BLOCK_O=16):
        pass


def test_tune_problem_runs_and_matches(kernel_device):
    assert_tune_problems_match("masked_conv_fwd", kernel_device)


# ---------------------------------------------------------------------------------------------- bad input
def _good(device="cpu"):
    x = torch.randn(2, 4, 6, 6, device=device)
    w = torch.randn(6, 2, 3, 3, device=device)
    count, index = kernels.dense_tile_lists(w, 2, (16, 16))
    return dict(x=x, weight=w, count=count, index=index, bias=torch.randn(6, device=device), **fam.BAD_INPUT_GEOMETRY)


def _randn(a, *shape):
    return torch.randn(*shape, device=a["x"].device)


BAD = {
    "count_dtype": ({"count": lambda a: a["count"].long()}, TypeError, "count must be int32"),
    "index_shape": ({"index": lambda a: a["index"][..., :1]}, ValueError, r"index must have shape \(2, 1, 2\)"),
    "count_groups": ({"count": lambda a: a["count"][:1]}, ValueError, "count must have shape"),
    "block_not_pow2": ({"block": lambda a: (24, 16)}, ValueError, "block must be"),
    "block_8": ({"block": lambda a: (8, 16)}, ValueError, "block must be"),
    "block_triple": ({"block": lambda a: (16, 16, 16)}, TypeError, "block must be a pair"),
    "groups_divide_cout": ({"weight": lambda a: a["weight"][:5]}, ValueError, "groups=2 must divide the output"),
    "weight_channels": ({"weight": lambda a: _randn(a, 6, 4, 3, 3)}, ValueError, "weight.shape\\[1\\]=4"),
    "weight_kernel": ({"weight": lambda a: _randn(a, 6, 2, 3, 2)}, ValueError, "weight must be"),
    "weight_dtype": ({"weight": lambda a: a["weight"].double()}, TypeError, "weight has dtype"),
    "bias_shape": ({"bias": lambda a: _randn(a, 5)}, ValueError, "bias must be"),
    "groups_divide_cin": ({"groups": lambda a: 3}, ValueError, "groups=3 must divide"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, kernel_device):
    fam.assert_refuses(kernels.masked_conv, _good(kernel_device), BAD[case])


# ---------------------------------------------------------------------------------------------- the tap walk
# C_in/G with a power-of-two divisor ≥ 16 takes the tap walk (SUB > 0: sub-tiles of one tap, per-position
# validity, vector loads); the cases above (C_in/G ≤ 6) take the per-element gather. id: (x shape, C_out,
# kernel, stride, padding pairs, dilation, groups, mode, block)
TAP_CASES = {
    # SUB = BK = 32: one sub-tile per k-tile
    "2d_C32_K3_P1_b16x32": ((2, 32, 5, 6), 20, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 1, "zeros", (16, 32)),
    # SUB = 32 < BK = 64: two sub-tiles, K = 288 ends half-way through the last k-tile (its second half past K)
    "2d_C32_K3_S2_P1_b16x64": ((2, 32, 7, 6), 16, (3, 3), (2, 2), [(1, 1), (1, 1)], (1, 1), 1, "zeros", (16, 64)),
    # CG = 16 < BK = 32: the second sub-tile steps to the next tap; groups; reflect
    "2d_C16_G2_S2x1_D1x2_reflect": ((2, 32, 7, 8), 12, (3, 3), (2, 1), [(1, 1), (2, 2)], (1, 2), 2, "reflect",
                                    (16, 32)),
    "2d_C16_K2x3_replicate_asym": ((1, 16, 5, 6), 8, (2, 3), (1, 2), [(1, 0), (2, 1)], (1, 1), 1, "replicate",
                                   (16, 32)),
    "1d_C16_K5_D2_circular": ((2, 16, 13), 8, (5,), (1,), [(3, 1)], (2,), 1, "circular", (16, 16)),
    # 27 taps: the per-position tap bits, 3-d, KD > 1
    "3d_C16_K3_S2_P1": ((2, 16, 4, 5, 4), 16, (3, 3, 3), (2, 2, 2), [(1, 1)] * 3, (1, 1, 1), 1, "zeros", (16, 16)),
    # 35 taps (> 31 bits): 'zeros' with a bounds test per (position, tap)
    "2d_C16_K7x5_P3x2": ((1, 16, 6, 5), 8, (7, 5), (1, 1), [(3, 3), (2, 2)], (1, 1), 1, "zeros", (16, 32)),
    # a kernel-size-1 dim with padding: positions that read only padding still store their bias
    "2d_C16_K1x3_P2x1": ((2, 16, 3, 5), 8, (1, 3), (1, 1), [(2, 1), (1, 1)], (1, 1), 1, "zeros", (16, 16)),
}


def _tap_check(key, density, dtype=torch.float64, layout="contiguous", device="cpu", config=None):
    shape, co, kernel, stride, padding, dilation, groups, mode, block = TAP_CASES[key]
    x = torch.randn(shape, dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "sliced":
        x = torch.randn(shape[0], 2 * shape[1], *shape[2:-1], shape[-1] + 3, dtype=dtype, device=device)
        x = x[:, ::2, ..., 1:-2]
    w = torch.randn(co, shape[1] // groups, *kernel, dtype=dtype, device=device)
    b = torch.randn(co, dtype=dtype, device=device)
    assert kernels._tap_tile(shape[1] // groups, block[1])["SUB"] >= 16  # the tap walk, not the fallback
    mask = make_mask(w.shape, groups, block, density).to(device)
    y = run(x, w, mask, b, kernel, stride, padding, dilation, groups, mode, block, config)
    fam.assert_matches_reference(y, conv_ref(x, w * mask, b, stride, padding, dilation, groups, mode), dtype)


@pytest.mark.parametrize("key", sorted(TAP_CASES))
def test_tap_walk(key, kernel_device):
    """Dense, random and whole-tile masks through the tap walk, every padding mode, 1/2/3-d."""
    for density in ("one", 0.3, "block0.5"):
        _tap_check(key, density, device=kernel_device)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_tap_walk_layouts(layout, kernel_device):
    """Channels-last x is read in place (vector loads along C); other layouts are copied to it once."""
    for key in ("2d_C32_K3_S2_P1_b16x64", "3d_C16_K3_S2_P1"):
        _tap_check(key, 0.5, torch.float32, layout, kernel_device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tap_walk_16bit(dtype, kernel_device):
    _tap_check("2d_C16_G2_S2x1_D1x2_reflect", 0.5, dtype, device=kernel_device)
    _tap_check("2d_C32_K3_S2_P1_b16x64", "block0.5", dtype, device=kernel_device)


def test_tap_walk_position_tiles_cross_samples(kernel_device):
    """BLOCK_M 16 over N·L = 2·15 positions: tiles span both samples, the last is partial."""
    _tap_check("2d_C16_K1x3_P2x1", 0.5, config=Config({"BLOCK_M": 16}, 4, 1), device=kernel_device)


def test_tap_walk_omitted_tiles_are_never_read(kernel_device):
    """NaN in every omitted tile: the sub-tiles of a listed k-tile read only that tile's columns."""
    shape, co, kernel, stride, padding, dilation, groups, mode, block = TAP_CASES["2d_C16_G2_S2x1_D1x2_reflect"]
    x = torch.randn(shape, device=kernel_device)
    w = torch.randn(co, shape[1] // groups, *kernel, device=kernel_device)
    mask = block_mask(w.shape, groups, block, 0.5).to(kernel_device)
    count, index = tile_lists(mask, groups, block)
    assert (count > 0).any() and (count < index.shape[-1]).any()
    poisoned = torch.where(mask, w, torch.full_like(w, float("nan")))
    flat = [v for p in padding for v in p]
    y = kernels.masked_conv(x, poisoned, count.to(kernel_device), index.to(kernel_device), None, list(kernel),
                            list(dilation), flat, list(stride), mode, groups, block)
    assert torch.isfinite(y).all()
    want = conv_ref(x, w * mask, None, stride, padding, dilation, groups, mode)
    torch.testing.assert_close(y.double(), want, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])


def test_tap_tile():
    """SUB: the largest power of two dividing C_in/G and BK, when ≥ 16; NARROW: every (SUB - 1)·stride < 2^31."""
    assert kernels._tap_tile(128, 64, 1, 1) == {"SUB": 64, "NARROW": True}
    assert kernels._tap_tile(48, 64, 1, 1)["SUB"] == 16
    assert kernels._tap_tile(32, 64)["SUB"] == 32
    assert kernels._tap_tile(24, 64)["SUB"] == 0 and kernels._tap_tile(3, 16)["SUB"] == 0
    assert kernels._tap_tile(0, 16)["SUB"] == 0
    assert not kernels._tap_tile(64, 64, 1, 2**26)["NARROW"] and kernels._tap_tile(64, 64, 2**24)["NARROW"]
