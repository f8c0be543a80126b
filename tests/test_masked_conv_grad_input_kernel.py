"""The masked-conv grad-input kernel (convzoo.kernels.masked_conv.masked_conv_grad_input) against the float64
autograd of ``F.convNd(F.pad(x), weight * mask)`` w.r.t. ``x`` (the padding's adjoint through ``F.pad``'s own
backward): densities from all-zero to dense, random and block-structured masks, 1/2/3-d, strides (also larger
than the kernel), dilation, (lo, hi) padding in every mode, groups incl. depthwise and a depthwise multiplier,
odd sizes (C_out/G not a multiple of BO, C_in/G not a multiple of BK, and a multiple of it), several position
tiles crossing sample boundaries, every dtype, channels-last and strided grad and weight; that unlisted blocks
are never read (NaN-poisoned); empty dims; the config space; bad input. The grad-input lists are built here by
a brute-force loop over the blocks, independent of ``convzoo.sparsity`` (one test checks the two agree)."""

import math

import _families as fam
import pytest
import torch
import torch.nn.functional as F
from problems import TOL, assert_tune_problems_match

from convzoo import autotune, sparsity
from convzoo.autotune import Config
from convzoo.kernels import masked_conv as kernels

# ---------------------------------------------------------------------------------------------- helpers


def grad_input_lists(mask: torch.Tensor, groups: int, block) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_count, t_index)`` of ``mask`` (weight-shaped, nonzero = kept) for ``block = (BO, BK)``, by brute
    force: per group ``g`` and channel tile ``tc``, entry ``e = t·TO + to`` is non-empty iff the block
    ``mask[g·OG + to·BO .., tc·BK .., tap t]`` holds a kept entry; the non-empty entries first, ascending, then
    the empty ones (which the kernel must never read: a test poisons their blocks)."""
    bo, bk = block
    co, cg = mask.shape[:2]
    og, kt = co // groups, math.prod(mask.shape[2:])
    to, tc = -(-og // bo), -(-cg // bk)
    m = mask.reshape(co, cg, kt) != 0
    count = torch.zeros(groups, tc, dtype=torch.int32)
    index = torch.zeros(groups, tc, kt * to, dtype=torch.int32)
    for g in range(groups):
        for c in range(tc):
            occupied = [bool(m[g * og + o * bo:g * og + min((o + 1) * bo, og), c * bk:(c + 1) * bk, t].any())
                        for t in range(kt) for o in range(to)]
            full = [e for e, v in enumerate(occupied) if v]
            count[g, c] = len(full)
            index[g, c] = torch.tensor(full + [e for e, v in enumerate(occupied) if not v], dtype=torch.int32)
    return count, index


def input_block_mask(shape, groups: int, block, density: float) -> torch.Tensor:
    """A mask whose kept entries fill whole random grad-input blocks (``BO`` output × ``BK`` input channels at
    one tap; ``round(density · blocks)`` of them), so that it lists exactly the blocks it keeps."""
    bo, bk = block
    co, cg = shape[:2]
    og, kt = co // groups, math.prod(shape[2:])
    to, tc = -(-og // bo), -(-cg // bk)
    n_blocks = groups * to * tc * kt
    keep = torch.zeros(n_blocks, dtype=torch.bool)
    keep[torch.randperm(n_blocks)[:round(density * n_blocks)]] = True
    full = keep.reshape(groups, to, 1, tc, 1, kt).expand(groups, to, bo, tc, bk, kt)
    full = full.reshape(groups, to * bo, tc * bk, kt)[:, :og, :cg]
    return full.reshape(co, cg, *shape[2:]).clone()


def make_mask(shape, groups, block, density) -> torch.Tensor:
    """``density``: a float (random elements), ``"block0.5"`` (whole grad-input blocks), ``"zero"`` or ``"one"``."""
    return fam.density_mask(shape, density, lambda share: input_block_mask(shape, groups, block, share))


def grad_input_ref(grad, weight, input_size, stride, padding, dilation, groups, mode):
    """d/dx of ``<grad, F.convNd(F.pad(x, padding, mode), weight)>`` in float64 (``padding`` per-dim (lo, hi)
    pairs): torch's own backward of F.pad (the padding's adjoint) and of the convolution."""
    nd = len(input_size)
    x = torch.zeros(grad.shape[0], weight.shape[1] * groups, *input_size, dtype=torch.float64, device=grad.device,
                    requires_grad=True)
    flat = [v for lo, hi in reversed(padding) for v in (lo, hi)]
    xp = F.pad(x, flat, mode="constant" if mode == "zeros" else mode)
    y = (F.conv1d, F.conv2d, F.conv3d)[nd - 1](xp, weight.double(), None, stride, 0, dilation, groups)
    return torch.autograd.grad(y, x, grad.double())[0]


def run(grad, weight, mask, input_size, kernel, stride, padding, dilation, groups, mode, block, config=None):
    """The launcher on ``weight * mask`` with ``mask``'s grad-input lists (``padding``: (lo, hi) pairs)."""
    count, index = grad_input_lists(mask.cpu(), groups, block)
    flat = [v for p in padding for v in p]
    w = weight * mask.to(weight.dtype)
    return kernels.masked_conv_grad_input(grad, w, count.to(grad.device), index.to(grad.device), list(input_size),
                                          list(kernel), list(dilation), flat, list(stride), mode, groups, block,
                                          config=config)


def out_size(size, kernel, stride, padding, dilation):
    return tuple((n + lo + hi - d * (k - 1) - 1) // s + 1
                 for n, k, s, (lo, hi), d in zip(size, kernel, stride, padding, dilation))


# id: (x shape, C_out, kernel, stride, padding pairs, dilation, groups, mode)
CASES = {
    "1d_K3_S2_P1": ((2, 4, 11), 6, (3,), (2,), [(1, 1)], (1,), 1, "zeros"),
    "1d_K5_D2_G2_lohi_circular": ((2, 4, 13), 4, (5,), (1,), [(3, 1)], (2,), 2, "circular"),
    "1d_K2_S5_replicate_lohi": ((2, 3, 12), 5, (2,), (5,), [(2, 1)], (1,), 1, "replicate"),  # stride > kernel
    "1d_K3_reflect_N1": ((1, 2, 9), 3, (3,), (1,), [(2, 1)], (1,), 1, "reflect"),
    "2d_K3_P1": ((2, 3, 7, 6), 5, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 1, "zeros"),
    "2d_K3x2_S2x1_D1x2_reflect": ((2, 4, 7, 8), 6, (3, 2), (2, 1), [(1, 1), (2, 1)], (1, 2), 2, "reflect"),
    "2d_K2x3_S3x4_replicate_asym_N1": ((1, 3, 8, 9), 4, (2, 3), (3, 4), [(1, 0), (2, 1)], (1, 1), 1, "replicate"),
    "2d_K3_depthwise": ((2, 5, 6, 6), 5, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 5, "zeros"),
    "2d_K3x2_depthwise_x2_circular": ((2, 3, 5, 5), 6, (3, 2), (2, 2), [(2, 1), (1, 0)], (1, 1), 3, "circular"),
    "2d_K1_S3": ((2, 6, 7, 5), 20, (1, 1), (3, 3), [(0, 0), (0, 0)], (1, 1), 1, "zeros"),  # stride > kernel
    "3d_K3_S2_P1_G2": ((2, 4, 4, 5, 4), 4, (3, 3, 3), (2, 2, 2), [(1, 1)] * 3, (1, 1, 1), 2, "zeros"),
    "3d_K2x1x3_reflect": ((1, 2, 3, 4, 5), 3, (2, 1, 3), (1, 1, 2), [(1, 0), (0, 1), (1, 1)], (1, 1, 1), 1,
                          "reflect"),
    "3d_K2_D2_circular": ((1, 2, 3, 4, 3), 3, (2, 2, 1), (1, 2, 1), [(1, 0), (0, 2), (0, 1)], (2, 1, 1), 1,
                          "circular"),
}


def _inputs(key, dtype=torch.float64, device="cpu"):
    shape, co, kernel, stride, padding, dilation, groups, mode = CASES[key]
    size = shape[2:]
    grad = torch.randn(shape[0], co, *out_size(size, kernel, stride, padding, dilation), dtype=dtype, device=device)
    w = torch.randn(co, shape[1] // groups, *kernel, dtype=dtype, device=device)
    return grad, w, dict(input_size=size, kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, mode=mode)


def _geo_args(geo):
    return (geo["input_size"], geo["kernel"], geo["stride"], geo["padding"], geo["dilation"], geo["groups"],
            geo["mode"])


def _ref(grad, w, geo):
    return grad_input_ref(grad, w, geo["input_size"], geo["stride"], geo["padding"], geo["dilation"], geo["groups"],
                          geo["mode"])


def _check(key, density, block=(16, 16), dtype=torch.float64, config=None, device="cpu"):
    grad, w, geo = _inputs(key, dtype, device)
    mask = make_mask(w.shape, geo["groups"], block, density).to(device)
    dx = run(grad, w, mask, *_geo_args(geo), block, config)
    want = _ref(grad, w * mask, geo)
    fam.assert_matches_reference(dx, want, dtype)
    return dx, want


# ---------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("key", sorted(CASES))
def test_dense_and_random_masks(key, kernel_device):
    """Densities 1.0 and 0.5 / 0.1 random elements, float64, over the geometry cases (every padding mode, 1/2/3-d,
    stride > kernel, dilation, (lo, hi) padding, groups, depthwise, N = 1)."""
    for density in ("one", 0.5, 0.1):
        _check(key, density, device=kernel_device)


@pytest.mark.parametrize("key", ["1d_K5_D2_G2_lohi_circular", "2d_K3x2_S2x1_D1x2_reflect", "3d_K3_S2_P1_G2"])
@pytest.mark.parametrize("density", ["block0.5", "block0.25"])
def test_block_structured_masks(key, density, kernel_device):
    """Whole grad-input blocks kept or dropped: the lists really skip blocks (count < E), and rows differ."""
    _, w, geo = _inputs(key)
    mask = make_mask(w.shape, geo["groups"], (16, 16), density)
    count, index = grad_input_lists(mask, geo["groups"], (16, 16))
    assert (count < index.shape[-1]).any() and (count > 0).any()
    _check(key, density, device=kernel_device)


@pytest.mark.parametrize("block", [(16, 16), (16, 32)], ids=str)
def test_sparsity_block_mask(block, kernel_device):
    """``sparsity.block_mask`` (the forward's tiling) with C_in/G = 32 a multiple of BK: a forward k-tile is one
    tap of BK channels, so its tiles are grad-input blocks and the lists skip exactly the dropped ones."""
    grad = torch.randn(2, 20, 5, 6, dtype=torch.float64, device=kernel_device)
    w = torch.randn(20, 32, 3, 3, dtype=torch.float64, device=kernel_device)
    mask = sparsity.block_mask(torch.randn(w.shape), block, density=0.3)
    count, _ = grad_input_lists(mask, 1, block)
    tiles = 2 * (32 * 9 // block[1])  # the forward's TO · TK
    assert count.sum() == round(0.3 * tiles)  # one grad-input block per kept forward tile, none per dropped one
    dx = run(grad, w, mask.to(kernel_device), (5, 6), (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 1, "zeros", block)
    want = grad_input_ref(grad, w * mask.to(kernel_device), (5, 6), (1, 1), [(1, 1), (1, 1)], (1, 1), 1, "zeros")
    torch.testing.assert_close(dx, want, atol=1e-12, rtol=1e-12)


def test_all_zero_mask_gives_zeros(kernel_device):
    """count all 0: no k-step runs, dx is exactly zero (also where the weight is NaN: nothing is read)."""
    grad, w, geo = _inputs("2d_K3x2_S2x1_D1x2_reflect", torch.float32, kernel_device)
    mask = torch.zeros_like(w, dtype=torch.bool)
    count, index = grad_input_lists(mask, geo["groups"], (16, 16))
    assert count.sum() == 0
    flat = [v for p in geo["padding"] for v in p]
    dx = kernels.masked_conv_grad_input(grad, torch.full_like(w, float("nan")), count.to(kernel_device),
                                        index.to(kernel_device), list(geo["input_size"]), list(geo["kernel"]),
                                        list(geo["dilation"]), flat, list(geo["stride"]), geo["mode"], geo["groups"],
                                        (16, 16))
    torch.testing.assert_close(dx, torch.zeros_like(dx), atol=0, rtol=0)


@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 32), (16, 64)], ids=str)
def test_blocks_and_odd_sizes(block, kernel_device):
    """C_out/G = 20 and C_in/G = 20 are multiples of neither side: partial o- and channel tiles at every block,
    two groups, both poles of the o-tile and channel-tile grid."""
    grad = torch.randn(2, 40, 6, 3, dtype=torch.float64, device=kernel_device)
    w = torch.randn(40, 20, 3, 2, dtype=torch.float64, device=kernel_device)
    geom = ((6, 5), (3, 2), (1, 2), [(1, 1), (0, 2)], (1, 1), 2, "zeros")
    for density in (1.0, 0.3, "block0.5"):
        mask = make_mask(w.shape, 2, block, density).to(kernel_device)
        dx = run(grad, w, mask, *geom, block)
        torch.testing.assert_close(dx, grad_input_ref(grad, w * mask, *(geom[i] for i in (0, 2, 3, 4, 5, 6))),
                                   atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("key", ["1d_K3_S2_P1", "1d_K5_D2_G2_lohi_circular", "2d_K2x3_S3x4_replicate_asym_N1",
                                 "3d_K3_S2_P1_G2"])
def test_position_tiles_cross_samples(key, kernel_device):
    """BLOCK_M 16 over N·∏in positions that are not a multiple of it: tiles span two samples, the last is
    partial, and (non-'zeros' modes) interior tiles skip the border candidates that border tiles run."""
    _check(key, 0.5, config=Config({"BLOCK_M": 16}, 4, 1), device=kernel_device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("key", ["1d_K5_D2_G2_lohi_circular", "2d_K3_P1", "3d_K3_S2_P1_G2"])
def test_dtypes(key, dtype, kernel_device):
    """fp32 (exact products under the interpreter; TF32 on a GPU only where torch's precision allows), fp16
    and bf16 (upcast for tl.dot under the interpreter; the result rounded to nearest even) within the
    dtype's tolerance of the float64 reference of the same (rounded) inputs."""
    _check(key, 0.5, dtype=dtype, device=kernel_device)


def test_fp32_follows_torch_matmul_precision(kernel_device):
    """'highest' asks for IEEE fp32 products: within fp32's tolerance of the float64 reference."""
    with fam.float32_matmul_precision("highest"):
        _check("2d_K3_P1", 1.0, dtype=torch.float32, device=kernel_device)


@pytest.mark.parametrize("layout", ["grad_channels_last", "grad_sliced", "grad_expanded", "weight_channels_last",
                                    "weight_permuted"])
def test_grad_and_weight_layouts(layout, kernel_device):
    """grad channels-last (2-d and 3-d), a strided slice, or a stride-0 broadcast; a channels-last weight (the
    tap-major matrix is a view) or one whose strides have no [C_out, K] view (a copy)."""
    for key in ("2d_K3_P1", "3d_K3_S2_P1_G2"):
        grad, w, geo = _inputs(key, torch.float32, device=kernel_device)
        cl = torch.channels_last if grad.dim() == 4 else torch.channels_last_3d
        if layout == "grad_channels_last":
            grad = grad.to(memory_format=cl)
        elif layout == "grad_sliced":
            big = torch.randn(grad.shape[0], 2 * grad.shape[1], *grad.shape[2:-1], grad.shape[-1] + 3,
                              device=kernel_device)
            grad = big[:, ::2, ..., 1:-2]
        elif layout == "grad_expanded":
            grad = grad[:1].expand_as(grad)
        elif layout == "weight_channels_last":
            w = w.to(memory_format=cl)
        else:
            w = w.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not grad.is_contiguous() or not w.is_contiguous()
        mask = make_mask(w.shape, geo["groups"], (16, 16), 0.5).to(kernel_device)
        dx = run(grad, w, mask, *_geo_args(geo), (16, 16))
        want = _ref(grad, w * mask, geo)
        torch.testing.assert_close(dx.double(), want, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])


@pytest.mark.parametrize("key", ["2d_K3x2_S2x1_D1x2_reflect", "1d_K5_D2_G2_lohi_circular"])
def test_unlisted_blocks_are_never_read(key, kernel_device):
    """NaN in every block the lists omit (and the lists' padding entries point at those blocks): dx stays
    finite and equals the reference with those blocks zeroed, so neither an unlisted block nor an entry past
    ``count`` is read; with dense lists the same weight gives NaN, so the check can fail."""
    grad, w, geo = _inputs(key, torch.float32, device=kernel_device)
    block = (16, 16)
    mask = input_block_mask(w.shape, geo["groups"], block, 0.5)
    count, index = grad_input_lists(mask, geo["groups"], block)
    assert (count > 0).any() and (count < index.shape[-1]).any()  # both kinds of block in some row
    mask = mask.to(kernel_device)
    poisoned = torch.where(mask, w, torch.full_like(w, float("nan")))
    flat = [v for p in geo["padding"] for v in p]
    args = (list(geo["input_size"]), list(geo["kernel"]), list(geo["dilation"]), flat, list(geo["stride"]),
            geo["mode"], geo["groups"], block)
    dx = kernels.masked_conv_grad_input(grad, poisoned, count.to(kernel_device), index.to(kernel_device), *args)
    assert torch.isfinite(dx).all()
    torch.testing.assert_close(dx.double(), _ref(grad, w * mask, geo), atol=TOL[torch.float32][0],
                               rtol=TOL[torch.float32][1])
    dense = kernels.dense_grad_input_lists(w, geo["groups"], block)
    dx = kernels.masked_conv_grad_input(grad, poisoned, *(t.to(kernel_device) for t in dense), *args)
    assert torch.isnan(dx).any()


def test_count_past_the_row_is_clamped(kernel_device):
    """A malformed count larger than the row (E entries) reads no index past it: as the dense lists."""
    grad, w, geo = _inputs("2d_K3_P1", device=kernel_device)
    count, index = kernels.dense_grad_input_lists(w, 1, (16, 16))
    flat = [v for p in geo["padding"] for v in p]
    args = (list(geo["input_size"]), list(geo["kernel"]), list(geo["dilation"]), flat, list(geo["stride"]),
            geo["mode"], 1, (16, 16))
    dx = kernels.masked_conv_grad_input(grad, w, count + 1000, index, *args)
    torch.testing.assert_close(dx, _ref(grad, w, geo), atol=1e-12, rtol=1e-12)


def test_lists_agree_with_sparsity():
    """The brute-force lists here are ``sparsity.tile_lists(...).t_count / .t_index`` (the op's lists), for odd
    sizes, groups and 1/2/3-d kernels."""
    for shape, groups, block in (((20, 6, 3, 3), 2, (16, 16)), ((40, 20, 3), 1, (32, 16)),
                                 ((6, 3, 2, 1, 3), 3, (16, 16)), ((33, 40, 2, 2), 1, (16, 32))):
        mask = torch.rand(shape) < 0.02
        lists = sparsity.tile_lists(mask, groups, block)
        count, index = grad_input_lists(mask, groups, block)
        assert torch.equal(lists.t_count, count) and torch.equal(lists.t_index, index)


def test_empty_dims(kernel_device):
    """N = 0, C_in = 0 and an empty input dim: an empty dx, no launch; C_out = 0: dx all zeros (no launch)."""
    geom = ([3], [1], [1, 1], [1], "zeros")
    d = kernel_device
    w = torch.randn(4, 2, 3, device=d)
    dx = kernels.masked_conv_grad_input(torch.randn(0, 4, 5, device=d), w, *kernels.dense_grad_input_lists(w, 1,
                                        (16, 16)), [5], *geom, 1, (16, 16))
    assert dx.shape == (0, 2, 5)
    w0 = torch.randn(4, 0, 3, device=d)
    count, index = kernels.dense_grad_input_lists(w0, 1, (16, 16))
    assert count.shape == (1, 0)
    dx = kernels.masked_conv_grad_input(torch.randn(2, 4, 5, device=d), w0, count, index, [5], *geom, 1, (16, 16))
    assert dx.shape == (2, 0, 5)
    dx = kernels.masked_conv_grad_input(torch.randn(2, 4, 2, device=d), w, *kernels.dense_grad_input_lists(w, 1,
                                        (16, 16)), [0], [3], [1], [2, 2], [1], "zeros", 1, (16, 16))
    assert dx.shape == (2, 2, 0)
    w0 = torch.randn(0, 2, 3, device=d)
    count, index = kernels.dense_grad_input_lists(w0, 2, (16, 16))
    assert index.shape == (2, 1, 0)
    dx = kernels.masked_conv_grad_input(torch.randn(2, 0, 5, device=d), w0, count, index, [5], *geom, 2, (16, 16))
    torch.testing.assert_close(dx, torch.zeros(2, 4, 5, device=d), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- configs
SPEC = "masked_conv_grad_input"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_configs_are_in_the_declared_space(dtype):
    """Every candidate and heuristic default (for each block) is one the table reader accepts, BLOCK_M a power
    of two and ≥ 16 where tl.dot runs (not fp64's broadcast-sum), within the shared-memory and register
    budget of its tiles (BLOCK_M × BK accumulator, (BLOCK_M + BK)·BO staged); the space holds no BLOCK_O /
    BLOCK_K (the block is a lookup dim, so no config can disagree with the lists)."""
    spec = autotune.get_spec(SPEC)
    assert set(spec.space.tiles) == {"BLOCK_M"} and set(spec.dims) == {"M", "C", "K", "BO", "BK"}

    def budget(cfg, bo, bk):
        bm = cfg.meta["BLOCK_M"]
        if dtype == torch.float64:
            assert bm * bo * bk <= 8192 or bm == 1, cfg
        else:
            elem = 4 if dtype == torch.float32 else 2
            assert bm * bk <= 64 * 32 * cfg.num_warps, cfg
            assert cfg.num_stages * (bm + bk) * bo * elem <= 160 * 1024, cfg

    fam.check_config_space(SPEC, kernels.BLOCK_SIZES, {"C": 256, "K": 1152}, dtype, budget)


def test_every_candidate_config_runs(kernel_device):
    """Each of a problem's candidate BLOCK_M values (warps and stages do nothing in the interpreter)."""
    spec = autotune.get_spec(SPEC)
    dims = {"M": 2 * 7 * 6, "C": 3, "K": 45, "BO": 16, "BK": 16}
    for bm in sorted({c.meta["BLOCK_M"] for c in spec.candidates(dims, torch.float32)}):
        _check("2d_K3_P1", 0.5, dtype=torch.float32, config=Config({"BLOCK_M": bm}, 4, 1), device=kernel_device)


def test_force_config_sets_block_m_only(kernel_device):
    with autotune.force_config(SPEC, BLOCK_M=16):
        _check("1d_K3_S2_P1", 0.5, device=kernel_device)
    with pytest.raises(ValueError, match="BLOCK_O"), autotune.force_config(SPEC, BLOCK_M=32, BLOCK_O=16):
        pass


def test_tune_problem_runs_and_matches(kernel_device):
    assert_tune_problems_match(SPEC, kernel_device, layers=None)  # every layer of the small grid


# ---------------------------------------------------------------------------------------------- bad input
def _good(device="cpu"):
    grad = torch.randn(2, 6, 6, 6, device=device)
    w = torch.randn(6, 2, 3, 3, device=device)
    count, index = kernels.dense_grad_input_lists(w, 2, (16, 16))
    return dict(grad=grad, weight=w, t_count=count, t_index=index, input_size=[6, 6], **fam.BAD_INPUT_GEOMETRY)


def _randn(a, *shape):
    return torch.randn(*shape, device=a["grad"].device)


BAD = {
    "grad_not_tensor": ({"grad": lambda a: a["grad"].tolist()}, TypeError, "grad must be a torch.Tensor"),
    "grad_int": ({"grad": lambda a: a["grad"].long()}, TypeError, "grad must have a floating dtype"),
    "weight_dtype": ({"weight": lambda a: a["weight"].double()}, TypeError, "weight has dtype"),
    "t_count_dtype": ({"t_count": lambda a: a["t_count"].long()}, TypeError, "t_count must be int32"),
    "t_index_not_tensor": ({"t_index": lambda a: a["t_index"].tolist()}, TypeError, "t_index must be a tensor"),
    "t_index_shape": ({"t_index": lambda a: a["t_index"][..., :1]}, ValueError, r"t_index must have shape \(2, 1, 9\)"),
    "t_count_groups": ({"t_count": lambda a: a["t_count"][:1]}, ValueError, r"t_count must have shape \(2, 1\)"),
    "t_count_device": ({"t_count": lambda a: a["t_count"].to("meta")}, ValueError, "t_count is on meta"),
    "weight_device": ({"weight": lambda a: a["weight"].to("meta")}, ValueError, "weight is on meta"),
    "block_not_pow2": ({"block": lambda a: (24, 16)}, ValueError, "block must be"),
    "block_8": ({"block": lambda a: (8, 16)}, ValueError, "block must be"),
    "block_triple": ({"block": lambda a: (16, 16, 16)}, TypeError, "block must be a pair"),
    "groups_divide_cout": ({"weight": lambda a: a["weight"][:5], "grad": lambda a: a["grad"][:, :5]}, ValueError,
                           "groups=2 must divide the output"),
    "groups_float": ({"groups": lambda a: 2.0}, TypeError, "groups must be an int"),
    "groups_zero": ({"groups": lambda a: 0}, ValueError, "groups must be positive"),
    "grad_channels": ({"grad": lambda a: _randn(a, 2, 4, 6, 6)}, ValueError, r"grad.shape\[1\]=4 must be C_out"),
    "grad_spatial": ({"grad": lambda a: _randn(a, 2, 6, 5, 6)}, ValueError, "grad spatial size"),
    "grad_rank": ({"grad": lambda a: _randn(a, 2, 6, 36)}, ValueError, "grad must be"),
    "weight_kernel": ({"weight": lambda a: _randn(a, 6, 2, 3, 2)}, ValueError, "weight must be"),
    "input_size_negative": ({"input_size": lambda a: [6, -1]}, ValueError, "input_size must be non-negative"),
    "input_size_float": ({"input_size": lambda a: [6.0, 6]}, TypeError, "input_size must be a sequence of ints"),
    "padding_mode": ({"padding_mode": lambda a: "mirror"}, ValueError, "padding_mode must be one of"),
    "padding_length": ({"padding": lambda a: [1, 1]}, ValueError, "padding must have 4"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, kernel_device):
    fam.assert_refuses(kernels.masked_conv_grad_input, _good(kernel_device), BAD[case])
