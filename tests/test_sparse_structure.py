"""Structure that turns into skipped tiles: the layer's ``block`` is the kernels' tile, block masks stay block
masks through prune/regrow (issue 24, "The speed contradiction"); tested on the tile lists, not timings."""

import pytest
import torch
from compile_checks import assert_compiled_step_matches_eager

import convzoo
from convzoo import sparsity


def _fraction(layer) -> float:
    return float(sparsity.tile_fraction(layer.tile_lists()))


def test_readme_block_example_visits_density_of_tiles():
    torch.manual_seed(0)
    conv = convzoo.MaskedConv2d(64, 128, 3, padding=1, density=0.25, block=(32, 32))
    lists = conv.tile_lists()
    assert lists.block == (32, 32)
    assert _fraction(conv) == pytest.approx(0.25, abs=1 / lists.occupancy.numel())
    # the old lists (always the default 64 × 64) visited most tiles of the same mask
    assert float(sparsity.tile_fraction(sparsity.tile_lists(conv.mask, 1, (64, 64)))) > 0.5


def test_forward_builds_the_lists_in_the_layer_block():
    # the kernels (interpreter) use the layer's block: the cached lists after a forward are the layer's
    from convzoo.ops import masked_conv as ops

    torch.manual_seed(1)
    conv = convzoo.MaskedConv2d(32, 64, 3, padding=1, density=0.25, block=(16, 32))
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    y = conv(x)
    y.sum().backward()
    ref = torch.nn.functional.conv2d(x.detach(), conv.weight.detach() * conv.mask, conv.bias.detach(), padding=1)
    torch.testing.assert_close(y.detach(), ref, atol=1e-5, rtol=1e-5)
    if convzoo.ops._dispatch.use_triton(x):
        assert ops._LISTS[conv.mask][2].block == (16, 32)


@pytest.mark.parametrize("block, og, k, want", [
    ((32, 32), 128, 576, (32, 32)),
    ((256, 16), 512, 64, (128, 16)),   # capped at the kernels' largest tile, which divides the block
    ((64, 64), 16, 27, (16, 32)),      # a small matrix: the one tile that covers it
])
def test_kernel_tile_divides_the_layer_block(block, og, k, want):
    from convzoo.ops import masked_conv as ops

    got = ops._block((og, k), 1, block)
    assert got == want and all(b % g == 0 for b, g in zip(block, got))


@pytest.mark.parametrize("score, regrow", [("magnitude", "coactivation"), ("count", "coactivation"),
                                           ("magnitude", "random")])
@pytest.mark.parametrize("prune_dims", [(0,), ()])
def test_prune_regrow_keeps_whole_blocks(score, regrow, prune_dims):
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(3)
    layer = convzoo.DynamicSparseConv2d(64, 128, 3, padding=1, density=0.25, block=(64, 64), score=score,
                                        regrow=regrow, prune_fraction=0.5, prune_dims=prune_dims)
    start = layer.tile_lists()
    total = start.occupancy.numel()
    assert _fraction(layer) == pytest.approx(round(0.25 * total) / total)
    changed = 0
    for _ in range(4):
        layer(torch.randn(2, 64, 8, 8).relu())
        out = layer.prune_regrow(generator=g)
        changed += int(out.regrown.any())
        assert torch.equal(sparsity.block_mask(layer.mask, (64, 64)), layer.mask)  # whole blocks
        lists = layer.tile_lists()
        assert _fraction(layer) == pytest.approx(round(0.25 * total) / total)
        assert torch.equal(lists.count, start.count) if prune_dims else int(lists.count.sum()) == int(
            start.count.sum())
        # pruned entries' weights zeroed, the mask's entries are exactly those of the kept tiles
        assert not (layer.weight[out.pruned] != 0).any()
    assert changed  # the mask moved


def test_unblocked_prune_regrow_fills_every_tile():
    # the contradiction itself: without a block the same step scatters the kept entries over every tile
    torch.manual_seed(4)
    layer = convzoo.DynamicSparseConv2d(64, 128, 3, padding=1, density=0.25, score="magnitude", regrow="random")
    layer.prune_regrow(generator=torch.Generator().manual_seed(0))
    assert _fraction(layer) == 1.0


def test_schedule_keeps_the_tile_fraction():
    torch.manual_seed(5)
    model = torch.nn.Sequential(convzoo.DynamicSparseConv2d(16, 64, 3, padding=1, density=0.5, block=(16, 16)),
                                torch.nn.ReLU(),
                                convzoo.DynamicSparseConv2d(64, 64, 3, padding=1, density=0.25, block=(32, 32),
                                                            score="magnitude"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = convzoo.PruneRegrowSchedule(model, opt, every=1, fraction=0.3, generator=torch.Generator())
    want = [_fraction(m) for m in schedule.layers]
    for _ in range(3):
        model(torch.randn(2, 16, 6, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        assert schedule.step()
        assert [_fraction(m) for m in schedule.layers] == want


def test_block_prune_regrow_function_pools_per_tile():
    # one 32 × 32 group matrix of four 16 × 16 tiles: tile (0, 0) kept with the weakest mean |w|, tile (1, 1)
    # the highest regrowth sum: one swap moves the tile
    mask = torch.zeros(32, 32, 1, 1, dtype=torch.bool)
    mask[:16, :16] = True
    mask[16:, 16:] = True
    w = torch.ones(32, 32, 1, 1)
    w[:16, :16] = 0.1
    r = torch.zeros(32, 32, 1, 1)
    r[:16, 16:] = 1.0
    out = sparsity.prune_regrow(mask, w.abs(), r, 0.5, dims=(), block=(16, 16), pool=("mean", "sum"))
    want = torch.zeros_like(mask)
    want[:16, 16:] = True
    want[16:, 16:] = True
    assert torch.equal(out.mask, want)
    assert torch.equal(out.pruned, mask & ~want) and torch.equal(out.regrown, want & ~mask)


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(block=(48, 32)), ValueError, "block"),
    (dict(block=(32,)), ValueError, "block"),
    (dict(block="32"), TypeError, "block"),
    (dict(block=(32, 32), dims=(1,)), ValueError, "dims"),
    (dict(block=(16, 16), pool="max"), ValueError, "pool"),
    (dict(block=(16, 16), groups=3), ValueError, "groups"),
])
def test_block_prune_regrow_bad_arguments(kwargs, exc, word):
    mask = torch.ones(32, 32, 1, 1, dtype=torch.bool)
    with pytest.raises(exc, match=word):
        sparsity.prune_regrow(mask, torch.rand(mask.shape), torch.rand(mask.shape), 0.1, **kwargs)


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(block=(24, 32)), ValueError, "block"),
    (dict(block=(32, True)), TypeError, "block"),
    (dict(block=(32, 32), prune_dims=(0, 1)), ValueError, "prune_dims"),
])
def test_layer_bad_block_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        convzoo.DynamicSparseConv2d(32, 32, 3, density=0.5, **kwargs)


def test_functional_bad_block():
    x, w = torch.randn(1, 16, 5, 5), torch.randn(16, 16, 3, 3)
    with pytest.raises(ValueError, match="block"):
        convzoo.functional.masked_conv(x, w, None, block=(16, 20))


# ---------------------------------------------------------------------------------------------- N:M
def _nm_counts(mask: torch.Tensor, m: int, groups: int = 1) -> torch.Tensor:
    """Kept entries per group of m consecutive reduction (tap-major) entries."""
    return sparsity.weight_matrix(mask, groups).reshape(-1, m).sum(1)


def test_nm_mask_keeps_n_of_every_m_by_magnitude():
    w = torch.randn(8, 16, 3, 3)
    mask = sparsity.nm_mask(w, (2, 4))
    assert torch.equal(_nm_counts(mask, 4), torch.full((8 * 16 * 9 // 4,), 2))
    groups = sparsity.weight_matrix(w.abs(), 1).reshape(-1, 4)
    kept = sparsity.weight_matrix(mask, 1).reshape(-1, 4)
    # every kept entry is at least as large as every dropped one of its group
    assert (groups.masked_fill(~kept, float("inf")).amin(1) >= groups.masked_fill(kept, -1).amax(1)).all()


@pytest.mark.parametrize("score, regrow", [("count", "coactivation"), ("magnitude", "random")])
@pytest.mark.parametrize("prune_dims, groups", [((0,), 1), ((), 1), ((0,), 2)])
def test_prune_regrow_keeps_two_of_four(score, regrow, prune_dims, groups):
    torch.manual_seed(6)
    g = torch.Generator().manual_seed(7)
    layer = convzoo.DynamicSparseConv2d(16, 32, 3, padding=1, nm=(2, 4), score=score, regrow=regrow,
                                        prune_fraction=0.3, prune_dims=prune_dims, groups=groups)
    want = torch.full_like(_nm_counts(layer.mask, 4, groups), 2)
    assert torch.equal(_nm_counts(layer.mask, 4, groups), want)
    assert layer.density == 0.5
    moved = 0
    for _ in range(3):
        layer(torch.randn(2, 16, 6, 6).relu())
        before = layer.mask.clone()
        out = layer.prune_regrow(generator=g)
        moved += int((layer.mask != before).sum())
        assert torch.equal(_nm_counts(layer.mask, 4, groups), want)
        assert torch.equal(out.mask, (before & ~out.pruned) | out.regrown)
        assert int(out.pruned.sum()) == int(out.regrown.sum())
    assert moved


def test_nm_masked_conv_matches_reference_and_reset_keeps_structure():
    torch.manual_seed(8)
    conv = convzoo.MaskedConv2d(8, 16, 3, padding=1, nm=(2, 4))
    assert torch.equal(_nm_counts(conv.mask, 4), torch.full_like(_nm_counts(conv.mask, 4), 2))
    x = torch.randn(2, 8, 5, 5)
    ref = torch.nn.functional.conv2d(x, conv.weight * conv.mask, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), ref, atol=1e-5, rtol=1e-5)
    conv.reset_parameters()
    assert torch.equal(_nm_counts(conv.mask, 4), torch.full_like(_nm_counts(conv.mask, 4), 2))


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(nm=(2, 3)), ValueError, "nm"),           # M does not divide C_in = 8
    (dict(nm=(5, 4)), ValueError, "nm"),
    (dict(nm=(2,)), ValueError, "nm"),
    (dict(nm=(2.0, 4)), TypeError, "nm"),
    (dict(nm=(2, 4), density=0.25), ValueError, "density"),
    (dict(nm=(2, 4), block=(16, 16)), ValueError, "nm and block"),
    (dict(nm=(2, 4), prune_dims=(0, 1)), ValueError, "prune_dims"),
])
def test_nm_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        convzoo.DynamicSparseConv2d(8, 16, 3, **kwargs)


def test_nm_prune_regrow_function_bad_arguments():
    mask = sparsity.nm_mask(torch.rand(4, 8, 1, 1))
    s = torch.rand(mask.shape)
    with pytest.raises(ValueError, match="nm and block"):
        sparsity.prune_regrow(mask, s, s, 0.5, nm=(2, 4), block=(16, 16))
    with pytest.raises(ValueError, match="dims"):
        sparsity.prune_regrow(mask, s, s, 0.5, nm=(2, 4), dims=(1,))
    with pytest.raises(TypeError, match="nm"):
        sparsity.prune_regrow(mask, s, s, 0.5, nm="2:4")


# ---------------------------------------------------------------------------------------------- stored weights
def _sparse(layer) -> bool:
    return not (layer.weight[~layer.mask] != 0).any()


@pytest.mark.parametrize("make", [
    lambda: convzoo.MaskedConv2d(16, 32, 3, padding=1, density=0.25),
    lambda: convzoo.MaskedConv2d(16, 32, 3, padding=1, density=0.5, block=(16, 16)),
    lambda: convzoo.DynamicSparseConv2d(16, 32, 3, padding=1, density=0.1, prune_dims=(0, 1)),
    lambda: convzoo.DynamicSparseConv2d(16, 32, 3, padding=1, nm=(2, 4)),
], ids=["masked", "masked_block", "dynamic_per_filter", "dynamic_nm"])
def test_stored_weight_is_zero_where_masked(make):
    torch.manual_seed(9)
    layer = make()
    assert _sparse(layer)
    assert float((layer.weight != 0).float().mean()) == pytest.approx(layer.density)
    layer.reset_parameters()
    assert _sparse(layer)
    layer.set_mask(torch.rand(layer.weight.shape) < 0.3)
    assert _sparse(layer)
    # a dense checkpoint loaded into the masked layer: its weight zeroed where the layer's mask is off
    dense = torch.nn.Conv2d(16, 32, 3, padding=1)
    layer.load_state_dict(dense.state_dict(), strict=False)
    assert _sparse(layer)
    # and a plain nn.Conv2d loading the masked layer's state_dict is the sparse model
    plain = torch.nn.Conv2d(16, 32, 3, padding=1)
    plain.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(plain(x), layer(x), atol=1e-5, rtol=1e-5)


def test_meta_construction_then_to_empty_is_sparse():
    with torch.device("meta"):
        layer = convzoo.MaskedConv2d(16, 32, 3, density=0.25)
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert _sparse(layer)


@pytest.mark.parametrize("opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-1),
], ids=["sgd_momentum_wd", "adam_l2", "adamw"])
def test_training_keeps_the_weight_sparse(opt):
    # masked entries get an exactly zero gradient, so no optimizer step moves them off zero: no pass per step
    torch.manual_seed(10)
    model = torch.nn.Sequential(convzoo.DynamicSparseConv2d(8, 16, 3, padding=1, density=0.3, score="magnitude"),
                                torch.nn.ReLU(),
                                convzoo.DynamicSparseConv2d(16, 16, 3, padding=1, density=0.25, block=(16, 16)))
    optimizer = opt(model.parameters())
    schedule = convzoo.PruneRegrowSchedule(model, optimizer, every=2, fraction=0.3, generator=torch.Generator())
    for _ in range(4):
        model(torch.randn(2, 8, 5, 5)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        assert all(_sparse(layer) for layer in schedule.layers)


# ---------------------------------------------------------------------------------------------- the op's block
def test_opcheck_with_block():
    torch.manual_seed(11)
    x, w = torch.randn(2, 32, 5, 6), torch.randn(32, 16, 3, 3)
    mask = sparsity.block_mask(torch.rand(w.shape), (16, 16), density=0.5, groups=2)
    geom = ([1, 1], [1, 1, 1, 1], [1, 1], 2, "zeros", [16, 16])
    torch.library.opcheck(torch.ops.convzoo.masked_conv, (x, w, mask, None, *geom))
    torch.library.opcheck(torch.ops.convzoo.masked_conv, (x.requires_grad_(), w.requires_grad_(), mask, None, *geom))
    gy = torch.randn(2, 32, 5, 6)
    torch.library.opcheck(torch.ops.convzoo.masked_conv_grad_input, (gy, w.detach(), mask, [5, 6], *geom))
    torch.library.opcheck(torch.ops.convzoo.masked_conv_grad_weight, (gy, x.detach(), mask, list(w.shape), *geom))


@torch.fx.experimental._config.patch(use_duck_shape=False)
@torch._dynamo.config.patch(error_on_recompile=True)
def test_block_layer_training_step_compiles():
    # the block is a constant op argument: one graph for two batch sizes, the same gradients as eager
    torch.manual_seed(12)
    conv = convzoo.MaskedConv2d(16, 32, 3, padding=1, density=0.5, block=(16, 16))
    params = list(conv.parameters())

    def step(x):
        return torch.autograd.grad(conv(x).square().mean(), params)

    def masked_zero(got):
        assert not (got[0][~conv.mask] != 0).any()

    assert_compiled_step_matches_eager(step, [torch.randn(n, 16, 5, 5) for n in (2, 3)], masked_zero)
