"""convzoo.sparsity: the tile-occupancy map and tile lists against a brute-force map built entry by entry from the
mask's nonzeros (odd sizes, partial edge tiles, groups incl. depthwise, 1-3 kernel dims, densities 1 / 0.5 / 0.1
/ 0 / block-structured), block masks against a brute-force tile ranking, random masks' exact per-slice counts,
meta tensors and torch.compile(fullgraph=True) (no host sync, no data-dependent shapes), and bad input."""

import math
import zlib

import pytest
import torch

from convzoo import sparsity
from convzoo.sparsity import TileLists, block_mask, random_mask, tile_lists


# ---------------------------------------------------------------------------------------------- references
def _ref_occupancy(mask: torch.Tensor, groups: int, block) -> list:
    """``occ[g][to][tk]`` as nested lists, set from each nonzero entry's column in ``W_g``, tap-major:
    ``k = tap·C_in/G + c`` (no padding, no views: an independent route to the same map)."""
    bo, bk = block
    og, k = mask.shape[0] // groups, math.prod(mask.shape[1:])
    to, tk = -(-og // bo), -(-k // bk)
    occ = [[[False] * tk for _ in range(to)] for _ in range(groups)]
    for o, c, *taps in (mask != 0).nonzero().tolist():
        col = _tap(taps, mask.shape[2:]) * mask.shape[1] + c
        occ[o // og][(o % og) // bo][col // bk] = True
    return occ


def _ref_input_occupancy(mask: torch.Tensor, groups: int, block) -> list:
    """``occ[g][tc][tap·TO + to]``: the grad-input's blocks (o-tile × c-tile at one tap), entry by entry."""
    bo, bk = block
    og, cg, kt = mask.shape[0] // groups, mask.shape[1], math.prod(mask.shape[2:])
    to, tc = -(-og // bo), -(-cg // bk)
    occ = [[[False] * (kt * to) for _ in range(tc)] for _ in range(groups)]
    for o, c, *taps in (mask != 0).nonzero().tolist():
        occ[o // og][c // bk][_tap(taps, mask.shape[2:]) * to + (o % og) // bo] = True
    return occ


def _tap(taps: list, kernel: tuple) -> int:
    """The kernel tap's row-major index."""
    t = 0
    for i, n in zip(taps, kernel):
        t = t * n + i
    return t


def _matrix(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``W_g`` ``[G, C_out/G, K]`` entry by entry, tap-major columns (loops, not the library's views)."""
    co, cg, kernel = x.shape[0], x.shape[1], x.shape[2:]
    kt = math.prod(kernel)
    w = torch.empty(groups, co // groups, kt * cg, dtype=x.dtype)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in x.shape)).view(-1, x.dim()).tolist():
        o, c, *taps = idx
        w[o // (co // groups), o % (co // groups), _tap(taps, kernel) * cg + c] = x[tuple(idx)]
    return w


def _unmatrix(w: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of :func:`_matrix`, entry by entry."""
    og, cg, kernel = w.shape[1], shape[1], shape[2:]
    x = torch.empty(shape, dtype=w.dtype)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in shape)).view(-1, len(shape)).tolist():
        o, c, *taps = idx
        x[tuple(idx)] = w[o // og, o % og, _tap(taps, kernel) * cg + c]
    return x


def _ref_lists(occ_rows: list) -> tuple[list, list]:
    """Per row: the count of True, and the True positions ascending followed by the False ones ascending."""
    counts = [sum(row) for row in occ_rows]
    index = [[i for i, v in enumerate(row) if v] + [i for i, v in enumerate(row) if not v] for row in occ_rows]
    return counts, index


def _block_structured(shape, groups, block, density, gen) -> torch.Tensor:
    """A mask that is all-ones on a random subset of tiles, zero elsewhere (built with Python loops)."""
    bo, bk = block
    og, k = shape[0] // groups, math.prod(shape[1:])
    w = torch.zeros(groups, og, k, dtype=torch.bool)
    for g in range(groups):
        for r in range(0, og, bo):
            for c in range(0, k, bk):
                if torch.rand((), generator=gen) < density:
                    w[g, r:r + bo, c:c + bk] = True
    return _unmatrix(w, shape)


# (id, mask shape [C_out, C_in/G, *kernel], groups, block)
SHAPES = [
    ("C40_c5_K3x3_G1_b16x16", (40, 5, 3, 3), 1, (16, 16)),     # TO=3 (last partial), K=45: TK=3 (last partial)
    ("C40_c5_K3x3_G2_b16x32", (40, 5, 3, 3), 2, (16, 32)),     # C_out/G=20
    ("C33_c7_K5_G3_b32x16", (33, 7, 5), 3, (32, 16)),          # 1-d kernel, C_out/G=11 < BO
    ("C24_c3_K2x3x2_G1_b16x16", (24, 3, 2, 3, 2), 1, (16, 16)),  # 3-d kernel, K=36
    ("C6_c1_K3x3_depthwise_b16x16", (6, 1, 3, 3), 6, (16, 16)),  # depthwise: one row, K=9, per group
    ("C64_c8_K1x1_G1_b32x64", (64, 8, 1, 1), 1, (32, 64)),     # 1x1 kernel, K=8 < BK
    ("C48_c16_K3x3_G1_b16x16", (48, 16, 3, 3), 1, (16, 16)),   # K=144 = 9 full tiles
    ("C32_c32_K3_G2_b16x16", (32, 32, 3), 2, (16, 16)),        # BK | C_in/G: TC=2, k-tile = one tap
]
DENSITIES = ["1.0", "0.5", "0.1", "0", "block"]


def _mask(shape, groups, block, density: str, gen) -> torch.Tensor:
    if density == "block":
        return _block_structured(shape, groups, block, 0.4, gen)
    return torch.rand(shape, generator=gen) < float(density)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize(("shape", "groups", "block"), [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_tile_lists_match_brute_force(shape, groups, block, density):
    """Occupancy, count/index and the transposed t_count/t_index equal the brute-force map and lists, with the
    documented padding (the empty tiles, ascending) and the documented dtypes/shapes."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, groups, density)).encode()))
    mask = _mask(shape, groups, block, density, gen)
    t = tile_lists(mask, groups=groups, block=block)
    occ = _ref_occupancy(mask, groups, block)
    assert isinstance(t, TileLists)
    assert t.block == block and t.groups == groups and t.shape == shape
    assert t.occupancy.dtype == torch.bool and t.occupancy.tolist() == occ
    g, to, tk = len(occ), len(occ[0]), len(occ[0][0])
    assert t.count.dtype == t.index.dtype == t.t_count.dtype == t.t_index.dtype == torch.int32
    in_occ = _ref_input_occupancy(mask, groups, block)
    tc, pairs = len(in_occ[0]), len(in_occ[0][0])
    assert t.index.shape == (g, to, tk) and t.t_index.shape == (g, tc, pairs)
    counts, index = zip(*(_ref_lists(rows) for rows in occ))
    assert t.count.tolist() == list(counts) and t.index.tolist() == list(index)
    t_counts, t_index = zip(*(_ref_lists(rows) for rows in in_occ))
    assert t.t_count.tolist() == list(t_counts) and t.t_index.tolist() == list(t_index)
    if shape[1] % block[1] == 0:  # BK divides C_in/G: the grad-input's blocks are the forward's tiles
        kt = math.prod(shape[2:])
        assert all(in_occ[gi][c][tap * to + r] == occ[gi][r][tap * (shape[1] // block[1]) + c]
                   for gi in range(g) for c in range(tc) for tap in range(kt) for r in range(to))
    if density == "0":
        assert not t.occupancy.any() and (t.count == 0).all()
    if density == "1.0":
        assert t.occupancy.all() and (t.count == tk).all()


def test_tile_lists_single_entry_lands_in_its_edge_tile():
    """One kept entry in the last (partial) tile of the last group: exactly that tile is occupied."""
    mask = torch.zeros(40, 5, 3, 3, dtype=torch.bool)  # G=2: rows 20 each (tiles 0-15, 16-19); K=45 (0-31, 32-44)
    mask[39, 4, 2, 2] = True                           # group 1, row 19 -> to=1; col 44 -> tk=1
    t = tile_lists(mask, groups=2, block=(16, 32))
    expected = torch.zeros(2, 2, 2, dtype=torch.bool)
    expected[1, 1, 1] = True
    assert torch.equal(t.occupancy, expected)
    assert t.count.tolist() == [[0, 0], [0, 1]]
    assert t.index[1, 1].tolist() == [1, 0]  # the non-empty tile first, then the padding (the empty ones)


def test_tile_lists_float_mask_equals_bool():
    mask = torch.rand(40, 5, 3, 3) < 0.05
    a, b = tile_lists(mask, 2, (16, 16)), tile_lists(mask.double(), 2, (16, 16))
    for name in ("occupancy", "count", "index", "t_count", "t_index"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_tile_lists_on_meta(dtype):
    """Shapes and dtypes only: a meta tensor has no values, so nothing here may read one (.item(), nonzero)."""
    t = tile_lists(torch.empty(40, 5, 3, 3, device="meta", dtype=dtype), groups=2, block=(16, 32))
    for name, shape, dt in [("occupancy", (2, 2, 2), torch.bool), ("count", (2, 2), torch.int32),
                            ("index", (2, 2, 2), torch.int32), ("t_count", (2, 1), torch.int32),
                            ("t_index", (2, 1, 9 * 2), torch.int32)]:
        v = getattr(t, name)
        assert v.device.type == "meta" and v.shape == shape and v.dtype == dt, name


def test_tile_lists_and_block_mask_compile_fullgraph():
    """A host sync (.item()) or a data-dependent shape (nonzero()) breaks a fullgraph compile: both functions
    trace into one graph and give the eager results."""
    mask = torch.rand(40, 5, 3, 3) < 0.1
    scores = torch.randn(40, 5, 3, 3)

    def f(m, s):
        t = tile_lists(m, 2, (16, 16))
        return t.occupancy, t.count, t.index, t.t_count, t.t_index, block_mask(m, (16, 16), 0.5, 2), \
            block_mask(s, (16, 16), 0.3, 2)

    got, want = torch.compile(f, fullgraph=True, backend="eager")(mask, scores), f(mask, scores)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    """On CUDA, torch's sync debug mode turns any device->host sync into an error."""
    mask = torch.rand(64, 8, 3, 3, device="cuda") < 0.1
    scores = torch.randn(64, 8, 3, 3, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tile_lists(mask, 2, (16, 32))
        block_mask(mask, (16, 32), None, 2)
        block_mask(scores, (16, 32), 0.25, 2)
        random_mask((64, 8, 3, 3), 0.3, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)


BAD_TILE_ARGS = [
    ("float_not_01", lambda: (torch.full((16, 2, 3), 0.5), 1, (16, 16)), ValueError, "mask"),
    ("float_nan", lambda: (torch.full((16, 2, 3), float("nan")), 1, (16, 16)), ValueError, "mask"),
    ("int_dtype", lambda: (torch.ones(16, 2, 3, dtype=torch.int64), 1, (16, 16)), TypeError, "mask"),
    ("not_tensor", lambda: ([[[1]]], 1, (16, 16)), TypeError, "mask"),
    ("ndim_1", lambda: (torch.ones(16, dtype=torch.bool), 1, (16, 16)), ValueError, "mask"),
    ("ndim_6", lambda: (torch.ones(2, 2, 2, 2, 2, 2, dtype=torch.bool), 1, (16, 16)), ValueError, "mask"),
    ("groups_not_dividing", lambda: (torch.ones(10, 2, 3, dtype=torch.bool), 3, (16, 16)), ValueError, "groups"),
    ("groups_zero", lambda: (torch.ones(10, 2, 3, dtype=torch.bool), 0, (16, 16)), ValueError, "groups"),
    ("groups_bool", lambda: (torch.ones(10, 2, 3, dtype=torch.bool), True, (16, 16)), TypeError, "groups"),
    ("block_not_pow2", lambda: (torch.ones(10, 2, 3, dtype=torch.bool), 1, (24, 16)), ValueError, "block"),
    ("block_too_small", lambda: (torch.ones(10, 2, 3, dtype=torch.bool), 1, (16, 8)), ValueError, "block"),
    ("block_one_entry", lambda: (torch.ones(10, 2, 3, dtype=torch.bool), 1, (16,)), ValueError, "block"),
    ("block_int", lambda: (torch.ones(10, 2, 3, dtype=torch.bool), 1, 16), TypeError, "block"),
    ("block_float", lambda: (torch.ones(10, 2, 3, dtype=torch.bool), 1, (16.0, 16)), TypeError, "block"),
]


@pytest.mark.parametrize(("make", "exc", "name"), [b[1:] for b in BAD_TILE_ARGS], ids=[b[0] for b in BAD_TILE_ARGS])
def test_tile_lists_bad_input(make, exc, name):
    mask, groups, block = make()
    with pytest.raises(exc, match=name):
        tile_lists(mask, groups=groups, block=block)


# ---------------------------------------------------------------------------------------------- block_mask
def _ref_tile_scores(x: torch.Tensor, groups: int, block) -> list:
    """``[(score, flat tile index)]`` summed entry by entry (counts for bool, Σ|x| in float64 otherwise)."""
    bo, bk = block
    og, k = x.shape[0] // groups, math.prod(x.shape[1:])
    to, tk = -(-og // bo), -(-k // bk)
    w = _matrix(x, groups)
    w = w.long() if w.dtype == torch.bool else w.double().abs()
    out = []
    for g in range(groups):
        for r in range(to):
            for c in range(tk):
                out.append((w[g, r * bo:(r + 1) * bo, c * bk:(c + 1) * bk].sum().item(), (g * to + r) * tk + c))
    return out


def _ref_block_mask(x, groups, block, density) -> torch.Tensor:
    scores = _ref_tile_scores(x, groups, block)
    ranked = sorted(scores, key=lambda s: (-s[0], s[1]))  # highest first, lowest index on ties
    chosen = ranked if density is None else ranked[:round(density * len(scores))]
    kept = {i for s, i in chosen if s != 0}
    bo, bk = block
    og, k = x.shape[0] // groups, math.prod(x.shape[1:])
    to, tk = -(-og // bo), -(-k // bk)
    out = torch.zeros(groups, og, k, dtype=torch.bool)
    for i in kept:
        g, r, c = i // (to * tk), i // tk % to, i % tk
        out[g, r * bo:(r + 1) * bo, c * bk:(c + 1) * bk] = True
    return _unmatrix(out, x.shape)


def _is_tile_structured(out: torch.Tensor, groups: int, block) -> bool:
    """Every tile all-True or all-False: the mask equals its own occupancy map expanded back, entry by entry."""
    occ = _ref_occupancy(out, groups, block)
    bo, bk = block
    og = out.shape[0] // groups
    w = _matrix(out, groups)
    return all(bool(w[g, r, c]) == occ[g][r // bo][c // bk]
               for g in range(groups) for r in range(og) for c in range(w.shape[2]))


@pytest.mark.parametrize("density", [None, 0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize(("shape", "groups", "block"), [s[1:] for s in SHAPES[:4]], ids=[s[0] for s in SHAPES[:4]])
def test_block_mask_of_mask_matches_brute_force(shape, groups, block, density):
    """Mask input: the result is tile-structured, keeps the densest tiles (ties: lowest index), never an empty
    one, and with density=None is the occupancy map expanded (so it contains the input mask)."""
    mask = torch.rand(shape) < 0.05  # sparse enough that some tiles are empty, and tile counts differ
    out = block_mask(mask, block, density, groups)
    assert out.dtype == torch.bool and out.shape == mask.shape
    assert torch.equal(out, _ref_block_mask(mask, groups, block, density))
    assert _is_tile_structured(out, groups, block)
    occ = tile_lists(out, groups, block).occupancy
    assert not (occ & ~tile_lists(mask, groups, block).occupancy).any()  # no empty tile revived
    if density is None:
        assert (out | ~mask).all()


def test_block_mask_ties_lowest_index_first():
    """An all-ones mask: every full tile has the same count, so the kept ones are the lowest-indexed full ones
    (the partial edge tiles count fewer entries and rank last)."""
    mask = torch.ones(40, 5, 3, 3, dtype=torch.bool)  # G=1, rows 40: tiles 16,16,8; K=45: 16,16,13
    out = block_mask(mask, (16, 16), density=3 / 9)
    occ = tile_lists(out, 1, (16, 16)).occupancy[0]
    expected = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    assert torch.equal(occ, expected)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize(("shape", "groups", "block"), [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_block_mask_of_scores_keeps_top_tiles(shape, groups, block, density):
    """Score input: exactly round(density·T) tiles kept (over all groups), those with the highest Σ|score|."""
    scores = torch.randn(shape, dtype=torch.float64)
    out = block_mask(scores, block, density, groups)
    n_tiles = len(_ref_tile_scores(scores, groups, block))
    assert out.dtype == torch.bool and out.shape == scores.shape
    assert int(tile_lists(out, groups, block).occupancy.sum()) == round(density * n_tiles)
    assert torch.equal(out, _ref_block_mask(scores, groups, block, density))
    assert _is_tile_structured(out, groups, block)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_block_mask_scores_low_precision(dtype):
    """Half-precision scores are summed in fp32: the ranking is that of the fp64 sums of the same values."""
    scores = (torch.randn(64, 8, 3, 3) * 1e3).to(dtype)
    out = block_mask(scores, (16, 16), 0.4)
    assert torch.equal(out, _ref_block_mask(scores, 1, (16, 16), 0.4))


def test_block_mask_float_01_mask_with_density_equals_bool():
    mask = torch.rand(40, 5, 3, 3) < 0.1
    a = block_mask(mask, (16, 16), 0.5, groups=2)
    assert torch.equal(a, block_mask(mask.float(), (16, 16), 0.5, groups=2))
    assert torch.equal(block_mask(mask, (16, 16), None, 2), block_mask(mask.half(), (16, 16), None, 2))


def test_block_mask_nan_score_tile_is_kept():
    """A NaN score ranks first: its tile stays in the mask, so the NaN weight stays visible."""
    scores = torch.rand(40, 5, 3, 3)
    scores[39, 4, 2, 2] = float("nan")  # in the last (smallest) tile
    occ = tile_lists(block_mask(scores, (16, 16), 1 / 9), 1, (16, 16)).occupancy
    assert occ[0, 2, 2] and int(occ.sum()) == 1


def test_block_mask_on_meta():
    for dtype in (torch.bool, torch.float32):
        out = block_mask(torch.empty(40, 5, 3, 3, device="meta", dtype=dtype), (16, 32), 0.5, 2)
        assert out.device.type == "meta" and out.shape == (40, 5, 3, 3) and out.dtype == torch.bool


def test_unstructured_mask_gives_no_empty_tiles():
    """The documented trade-off: a 10%-dense unstructured mask empties no 32x32 tile (P = 0.9^1024 ≈ 1.4e-47)."""
    assert 0.9**1024 < 1e-46
    mask = random_mask((256, 64, 3, 3), 0.1)
    assert tile_lists(mask, 1, (32, 32)).occupancy.all()


BAD_BLOCK_MASK = [
    ("density_neg", lambda: (torch.randn(16, 2, 3), -0.1, 1), ValueError, "density"),
    ("density_above_1", lambda: (torch.randn(16, 2, 3), 1.5, 1), ValueError, "density"),
    ("density_nan", lambda: (torch.randn(16, 2, 3), float("nan"), 1), ValueError, "density"),
    ("density_bool", lambda: (torch.randn(16, 2, 3), True, 1), TypeError, "density"),
    ("density_tensor", lambda: (torch.randn(16, 2, 3), torch.tensor(0.5), 1), TypeError, "density"),
    ("density_str", lambda: (torch.randn(16, 2, 3), "0.5", 1), TypeError, "density"),
    ("scores_without_density", lambda: (torch.randn(16, 2, 3), None, 1), ValueError, "mask_or_scores"),
    ("int_dtype", lambda: (torch.ones(16, 2, 3, dtype=torch.int32), 0.5, 1), TypeError, "mask_or_scores"),
    ("ndim_1", lambda: (torch.randn(16), 0.5, 1), ValueError, "mask_or_scores"),
    ("groups_not_dividing", lambda: (torch.randn(16, 2, 3), 0.5, 3), ValueError, "groups"),
]


@pytest.mark.parametrize(("make", "exc", "name"), [b[1:] for b in BAD_BLOCK_MASK], ids=[b[0] for b in BAD_BLOCK_MASK])
def test_block_mask_bad_input(make, exc, name):
    x, density, groups = make()
    with pytest.raises(exc, match=name):
        block_mask(x, (16, 16), density, groups)


def test_block_mask_bad_block():
    with pytest.raises(ValueError, match="block"):
        block_mask(torch.randn(16, 2, 3), (16, 48), 0.5)


# ---------------------------------------------------------------------------------------------- random_mask
@pytest.mark.parametrize("density", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize(("shape", "dims"), [((12, 5, 3, 3), (0,)), ((12, 5, 3, 3), (0, 1)), ((7, 4, 5), ()),
                                             ((4, 6, 5), (-1,)), ((3, 1, 2, 2, 2), (0,))],
                         ids=["per_out_channel", "per_out_in_pair", "whole_tensor", "last_dim", "3d_kernel"])
def test_random_mask_exact_count_per_slice(shape, dims, density):
    m = random_mask(shape, density, dims=dims)
    assert m.dtype == torch.bool and m.shape == shape and m.is_contiguous()
    nd = len(shape)
    dims = tuple(d % nd for d in dims)
    rest = tuple(d for d in range(nd) if d not in dims)
    n = math.prod(shape[d] for d in rest)
    counts = m.sum(dim=rest) if rest else m.long()
    assert (counts == round(density * n)).all()
    if density == 0.0:
        assert not m.any()
    if density == 1.0:
        assert m.all()


def test_random_mask_is_uniform_over_positions():
    """Every position of a channel is kept with frequency ≈ density (a biased draw, e.g. always the first k,
    fails): 4000 channels, std of each frequency ≈ 0.007, bound at 0.04."""
    m = random_mask((4000, 2, 5), 0.3, generator=torch.Generator().manual_seed(1))
    freq = m.double().mean(0)
    assert (freq - 0.3).abs().max() < 0.04


def test_random_mask_seeded_generator_is_deterministic():
    a = random_mask((16, 4, 3, 3), 0.25, generator=torch.Generator().manual_seed(7))
    b = random_mask((16, 4, 3, 3), 0.25, generator=torch.Generator().manual_seed(7))
    c = random_mask((16, 4, 3, 3), 0.25, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_mask_device_and_meta():
    m = random_mask((16, 4, 3), 0.5, device="meta")
    assert m.device.type == "meta" and m.shape == (16, 4, 3) and m.dtype == torch.bool
    assert random_mask((0, 4, 3), 0.5).shape == (0, 4, 3)


BAD_RANDOM = [
    ("density_nan", dict(shape=(4, 3), density=float("nan")), ValueError, "density"),
    ("density_above_1", dict(shape=(4, 3), density=1.01), ValueError, "density"),
    ("density_bool", dict(shape=(4, 3), density=False), TypeError, "density"),
    ("shape_negative", dict(shape=(4, -3), density=0.5), ValueError, "shape"),
    ("shape_float", dict(shape=(4, 3.0), density=0.5), TypeError, "shape"),
    ("dims_out_of_range", dict(shape=(4, 3), density=0.5, dims=(2,)), ValueError, "dims"),
    ("dims_repeated", dict(shape=(4, 3), density=0.5, dims=(0, -2)), ValueError, "dims"),
    ("dims_int", dict(shape=(4, 3), density=0.5, dims=0), TypeError, "dims"),
    ("generator_seed", dict(shape=(4, 3), density=0.5, generator=0), TypeError, "generator"),
]


@pytest.mark.parametrize(("kwargs", "exc", "name"), [b[1:] for b in BAD_RANDOM], ids=[b[0] for b in BAD_RANDOM])
def test_random_mask_bad_input(kwargs, exc, name):
    kwargs = dict(kwargs)
    shape, density = kwargs.pop("shape"), kwargs.pop("density")
    with pytest.raises(exc, match=name):
        random_mask(shape, density, **kwargs)


def test_exported():
    import convzoo

    assert convzoo.sparsity is sparsity


# ---------------------------------------------------------------------------------------------- prune_regrow
def _ref_prune_regrow(mask, prune_score, regrow_score, fraction, dims, regrow_pruned):
    """Per slice with Python lists: the k lowest-scoring kept entries out, the k highest-scoring candidates in
    (NaN lowest, ties by position), k = min(round(fraction·kept), candidates)."""
    nd = mask.dim()
    rest = [d for d in range(nd) if d not in dims]
    pm, pp, pr = (t.permute(list(dims) + rest).reshape(math.prod(mask.shape[d] for d in dims), -1)
                  for t in (mask, prune_score, regrow_score))
    new, pruned, regrown = pm.clone(), torch.zeros_like(pm), torch.zeros_like(pm)
    low = float("-inf")
    for s in range(pm.shape[0]):
        kept = [i for i in range(pm.shape[1]) if pm[s, i]]
        k = round(fraction * len(kept))
        pool_before = [i for i in range(pm.shape[1]) if not pm[s, i]]
        k = min(k, len(pool_before) + (k if regrow_pruned else 0))
        key = [low if math.isnan(v) else v for v in pp[s].tolist()]
        out = sorted(kept, key=lambda i: (key[i], i))[:k]
        pool = pool_before + (out if regrow_pruned else [])
        rkey = [low if math.isnan(v) else v for v in pr[s].tolist()]
        inn = sorted(pool, key=lambda i: (-rkey[i], i))[:k]
        for i in out:
            new[s, i], pruned[s, i] = False, True
        for i in inn:
            new[s, i], regrown[s, i] = True, True
    shape = [mask.shape[d] for d in list(dims) + rest]
    inv = sorted(range(nd), key=(list(dims) + rest).__getitem__)
    return tuple(t.view(shape).permute(inv) for t in (new, pruned, regrown))


@pytest.mark.parametrize("regrow_pruned", [False, True])
@pytest.mark.parametrize("dims", [(0,), (0, 1), (), (1,)])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_prune_regrow_matches_brute_force(density, fraction, dims, regrow_pruned):
    """Exact counts per slice, the lowest out and highest in, ties by position (integer scores make many), NaN
    lowest, and a dense slice (density 0.9: fewer candidates than round(fraction·kept)) capped."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((density, fraction, dims, regrow_pruned)).encode()))
    shape = (5, 3, 3, 2)
    mask = torch.rand(shape, generator=gen) < density
    ps = torch.randint(0, 4, shape, generator=gen).float()
    rs = torch.randint(0, 4, shape, generator=gen).double()
    ps[0, 0, 0, 0] = rs[1, 1, 1, 1] = float("nan")
    got = sparsity.prune_regrow(mask, ps, rs, fraction, dims=dims, regrow_pruned=regrow_pruned)
    want = _ref_prune_regrow(mask, ps, rs, fraction, dims, regrow_pruned)
    for name, g, w in zip(("mask", "pruned", "regrown"), (got.mask, got.pruned, got.regrown), want):
        assert g.dtype == torch.bool and g.shape == mask.shape and torch.equal(g, w), name
    def slices(t):
        return (t.permute(list(dims) + [d for d in range(4) if d not in dims]).reshape(
            math.prod(shape[d] for d in dims), -1).sum(1))
    assert torch.equal(slices(got.mask), slices(mask))
    assert not (got.pruned & ~mask).any()
    if not regrow_pruned:
        assert not (got.regrown & mask).any() and not (got.regrown & got.pruned).any()


def test_prune_regrow_random_ties_keep_the_score_order_and_follow_the_generator():
    """ties='random': scores still decide (every pruned entry scores at most every kept survivor, every regrown one
    at least every candidate left out), only equal scores are ordered by the generator: the same seed gives the
    same step, and the ties are not broken by position (the index order is not what comes out)."""
    gen = torch.Generator().manual_seed(0)
    shape = (8, 6, 3, 3)
    mask = torch.rand(shape, generator=gen) < 0.3
    ps = torch.randint(0, 3, shape, generator=gen).float()
    rs = torch.randint(0, 3, shape, generator=gen).float()

    def step(seed):
        return sparsity.prune_regrow(mask, ps, rs, 0.5, dims=(0,), ties="random",
                                     generator=torch.Generator().manual_seed(seed))

    out = step(1)
    by_index = sparsity.prune_regrow(mask, ps, rs, 0.5, dims=(0,))
    assert torch.equal(out.mask.flatten(1).sum(1), mask.flatten(1).sum(1))
    assert torch.equal(out.pruned.flatten(1).sum(1), by_index.pruned.flatten(1).sum(1))
    for o in range(shape[0]):
        kept, pruned, regrown = mask[o], out.pruned[o], out.regrown[o]
        assert ps[o][pruned].max() <= ps[o][kept & ~pruned].min()
        assert rs[o][regrown].min() >= rs[o][~kept & ~regrown].max()
    again = step(1)
    assert torch.equal(again.mask, out.mask) and torch.equal(again.regrown, out.regrown)
    assert not torch.equal(out.mask, by_index.mask) and not torch.equal(step(2).mask, out.mask)


def test_prune_regrow_compiles_fullgraph_without_host_sync():
    """No .item()/nonzero(): a fullgraph compile succeeds and agrees with eager."""
    mask = torch.rand(6, 4, 3) < 0.5
    ps, rs = torch.randn(6, 4, 3), torch.rand(6, 4, 3)

    def step(m, p, r):
        out = sparsity.prune_regrow(m, p, r, 0.25, dims=(0,))
        return out.mask, out.pruned, out.regrown

    got = torch.compile(step, fullgraph=True, dynamic=True)(mask, ps, rs)
    for g, w in zip(got, step(mask, ps, rs)):
        assert torch.equal(g, w)


@pytest.mark.parametrize(("kwargs", "exc", "name"), [
    ({"mask": torch.ones(2, 3)}, TypeError, "mask"),
    ({"prune_score": torch.ones(2, 3, dtype=torch.int64)}, TypeError, "prune_score"),
    ({"regrow_score": torch.ones(3, 2)}, ValueError, "regrow_score"),
    ({"fraction": 1.5}, ValueError, "fraction"),
    ({"fraction": True}, TypeError, "fraction"),
    ({"dims": (2,)}, ValueError, "dims"),
    ({"dims": (0, 0)}, ValueError, "dims"),
    ({"dims": 0}, TypeError, "dims"),
    ({"ties": "first"}, ValueError, "ties"),
    ({"generator": 1}, TypeError, "generator"),
])
def test_prune_regrow_bad_input(kwargs, exc, name):
    args = {"mask": torch.ones(2, 3, dtype=torch.bool), "prune_score": torch.ones(2, 3),
            "regrow_score": torch.ones(2, 3), "fraction": 0.5, "dims": (0,)}
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        sparsity.prune_regrow(args.pop("mask"), args.pop("prune_score"), args.pop("regrow_score"),
                              args.pop("fraction"), **args)
