"""Regrowth rules of DynamicSparseConv and global pruning, against brute-force references.

- RigL (``regrow='gradient'``): the dense gradient the backward taps at the masked entries is autograd's gradient
  of a plain ``F.convNd`` on ``weight·mask``; the regrown connections are, per slice, the top-k of its ``|·|``
  among the inactive ones, chosen by hand (continuous random data: no ties); with a block, whole blocks by summed
  ``|grad|``; with N:M, per group. On both paths (kernels under the interpreter, plain torch), and compiled.
- SET (``regrow='random'``): magnitude pruning exactly, regrowth only among the inactive connections, uniform.
- ``PruneRegrowSchedule(scope='global')``: the globally smallest ``|w|`` go (by hand), each layer regrows as many,
  the total count is exact at every step.
"""

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from _families import check_rigl_period, cubic_loss, topk_by_hand
from torch import nn

import convzoo
from convzoo import sparsity
from convzoo.layers.dynamic_sparse import PruneRegrowSchedule

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
LAYER = {1: convzoo.DynamicSparseConv1d, 2: convzoo.DynamicSparseConv2d, 3: convzoo.DynamicSparseConv3d}


def _dense_grad(layer, x):
    """Autograd's dense weight gradient of the same model as a plain convolution of ``weight·mask``."""
    w = (layer.weight.detach() * layer.mask).requires_grad_()
    y = CONV[w.dim() - 2](x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    cubic_loss(y).backward()
    return w.grad


# ---------------------------------------------------------------------------------------------- RigL
@pytest.mark.parametrize("nd, groups, prune_dims", [(2, 1, (0,)), (2, 2, ()), (1, 1, (0,)), (3, 1, ())],
                         ids=["2d", "2d_G2_all", "1d", "3d_all"])
def test_gradient_regrowth_matches_the_brute_force_dense_gradient(nd, groups, prune_dims, path):
    torch.manual_seed(1)
    layer = LAYER[nd](4, 6, 3, padding=1, groups=groups, density=0.4, score="magnitude", regrow="gradient",
                      update_every=3, prune_dims=prune_dims, device=path)
    size = {1: (9,), 2: (5, 6), 3: (4, 3, 5)}[nd]
    # x requires grad: the plain-torch path's backward is then one fused convolution_backward (dx and the dense dW)
    xs = [torch.randn(3, 4, *size, device=path, requires_grad=True) for _ in range(4)]
    check_rigl_period(layer, xs, _dense_grad, prune_dims)


@pytest.mark.parametrize("run", [True, False])
def test_dense_grad_tap_op_both_steps_and_opcheck(run, path):
    """The autograd rule on both kinds of step (the compiled schedule runs both through it): ``weight`` gets the
    masked gradient exactly, the tap the dense one off the mask or exactly 0; a block mask with partial tiles
    (entries off the mask inside a listed tile are computed, then dropped). And opcheck of the tap's op."""
    from convzoo.ops import masked_conv as ops

    torch.manual_seed(9)
    w = torch.randn(32, 16, 3, 3, device=path, requires_grad=True)
    mask = sparsity.block_mask(torch.rand(32, 16, 3, 3, device=path), block=(16, 16), density=0.5)
    mask &= torch.rand(mask.shape, device=path) < 0.7  # partial tiles
    x = torch.randn(2, 16, 5, 5, device=path)
    probe = torch.zeros_like(w, requires_grad=True)
    geom = ([1, 1], [1, 1, 1, 1], [1, 1], 1, "zeros", [16, 16])
    y = ops.masked_conv_dense_grad(x, w, probe, mask, torch.tensor(run, device=path), None, *geom)
    cubic_loss(y).backward()
    wd = (w.detach() * mask).requires_grad_()
    cubic_loss(F.conv2d(x, wd, None, 1, 1)).backward()
    torch.testing.assert_close(w.grad, wd.grad * mask, rtol=1e-5, atol=1e-6)
    assert torch.equal(w.grad[~mask], torch.zeros_like(w.grad[~mask]))
    torch.testing.assert_close(probe.grad, wd.grad * ~mask if run else torch.zeros_like(w), rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    torch.library.opcheck(torch.ops.convzoo.masked_conv_grad_weight_tap,
                          (g, x, mask, torch.tensor(run, device=path), [32, 16, 3, 3], *geom))


def test_gradient_regrowth_with_blocks_pools_summed_abs_grad(path):
    torch.manual_seed(2)
    layer = convzoo.DynamicSparseConv2d(16, 32, 3, padding=1, block=(16, 16), density=0.5, score="magnitude",
                                        regrow="gradient", prune_dims=(), device=path)
    x = torch.randn(2, 16, 5, 5, device=path)
    cubic_loss(layer(x)).backward()
    g = _dense_grad(layer, x)
    torch.testing.assert_close(layer.dense_grad, g * ~layer.mask, rtol=1e-5, atol=1e-6)

    def blocks(t):  # [TO, TK] tiles of the tap-major matrix [C_out, 9·C_in]
        return t.permute(0, 2, 3, 1).reshape(2, 16, 9, 16).transpose(1, 2)

    mask, w = layer.mask.clone(), layer.weight.detach().clone()
    out = layer.prune_regrow(fraction=0.25)
    kept = blocks(mask).any(-1).any(-1)
    p, r = blocks(w.abs()).mean((-1, -2)), blocks(g.abs()).sum((-1, -2))
    pruned, regrown = topk_by_hand(kept, p, r, 0.25, ())
    assert regrown.sum() == 2
    assert torch.equal(blocks(out.mask).all(-1).all(-1), (kept & ~pruned) | regrown)
    assert torch.equal(blocks(out.mask).any(-1).any(-1), (kept & ~pruned) | regrown)  # whole blocks


def test_gradient_regrowth_keeps_nm():
    torch.manual_seed(3)
    layer = convzoo.DynamicSparseConv2d(8, 4, 3, padding=1, nm=(2, 4), score="magnitude", regrow="gradient")
    x = torch.randn(2, 8, 5, 5)
    cubic_loss(layer(x)).backward()
    g = _dense_grad(layer, x)
    mask = layer.mask.clone()
    out = layer.prune_regrow(fraction=0.5)
    groups = out.mask.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(groups.sum(1), torch.full((groups.shape[0],), 2))
    # each regrown entry is its group's highest |grad| among the ones dropped before
    score = torch.where(mask, float("-inf"), g.abs()).permute(0, 2, 3, 1).reshape(-1, 4)
    reg = out.regrown.permute(0, 2, 3, 1).reshape(-1, 4)
    one = reg.sum(1) == 1
    assert one.any() and torch.equal(reg[one].float().argmax(1), score[one].argmax(1))


def test_regrow_init_and_bad_arguments():
    torch.manual_seed(4)
    assert convzoo.DynamicSparseConv2d(4, 4, 3, regrow="gradient").regrow_init == "zeros"
    assert convzoo.DynamicSparseConv2d(4, 4, 3, regrow="random").regrow_init == "init"
    layer = convzoo.DynamicSparseConv2d(4, 8, 3, density=0.5, regrow="gradient", regrow_init="init",
                                        score="magnitude")
    cubic_loss(layer(torch.randn(2, 4, 6, 6))).backward()
    out = layer.prune_regrow(fraction=0.5)
    bound = 1 / (4 * 9) ** 0.5
    fresh = layer.weight[out.regrown]
    assert (fresh != 0).all() and (fresh.abs() <= bound).all()
    assert "regrow_init='init'" in repr(layer)
    # no update step's backward yet: every |grad| is 0, the tie order (random) picks; counts still exact
    idle = convzoo.DynamicSparseConv2d(4, 8, 3, density=0.5, regrow="gradient", score="magnitude")
    before = idle.mask.sum((1, 2, 3))
    out = idle.prune_regrow(fraction=0.5)
    assert out.regrown.any() and torch.equal(idle.mask.sum((1, 2, 3)), before)
    with pytest.raises(ValueError, match="regrow_init"):
        convzoo.DynamicSparseConv2d(4, 4, 3, regrow_init="normal")
    with pytest.raises(ValueError, match="regrow must"):
        convzoo.DynamicSparseConv2d(4, 4, 3, regrow="grad")
    with pytest.raises(TypeError, match="count"):
        sparsity.prune_regrow(layer.mask, layer.weight.abs(), layer.weight.abs(), 0.1, count=torch.tensor(1.0))
    with pytest.raises(ValueError, match="count"):
        sparsity.prune_regrow(layer.mask, layer.weight.abs(), layer.weight.abs(), 0.1, count=torch.tensor([1, 2]))


def test_gradient_tap_is_off_in_eval_no_grad_and_unbatched():
    torch.manual_seed(5)
    layer = convzoo.DynamicSparseConv2d(4, 8, 3, density=0.5, regrow="gradient", score="magnitude")
    x = torch.randn(4, 6, 6)
    with torch.no_grad():
        layer(x)  # a training forward (counted), with nothing to differentiate: no tap
    layer.eval()
    cubic_loss(layer(x)).backward()  # eval: not counted, no tap
    assert layer.dense_grad is None and int(layer.calls) == 1
    layer.train()
    cubic_loss(layer(x)).backward()  # unbatched: a batch of one
    torch.testing.assert_close(layer.dense_grad, _dense_grad(layer, x[None]) * ~layer.mask, rtol=1e-5, atol=1e-6)


def test_gradient_tap_compiled_without_recompiles():
    torch.manual_seed(6)
    layer = convzoo.DynamicSparseConv2d(4, 8, 3, padding=1, density=0.5, regrow="gradient", score="magnitude",
                                        update_every=2)
    eager = convzoo.DynamicSparseConv2d(4, 8, 3, padding=1, density=0.5, regrow="gradient", score="magnitude",
                                        update_every=2)
    eager.load_state_dict(layer.state_dict())
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    xs = [torch.randn(2, 4, 6, 6) for _ in range(4)]
    for x in xs:
        cubic_loss(compiled(x)).backward()
        cubic_loss(eager(x)).backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(layer.dense_grad, eager.dense_grad, rtol=1e-5, atol=1e-6)
    # steps 2 and 4 tapped: the sum of their dense gradients at the masked entries
    torch.testing.assert_close(layer.weight.grad, eager.weight.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- SET
def test_set_prunes_by_magnitude_and_regrows_uniformly_among_inactive():
    torch.manual_seed(7)
    layer = convzoo.DynamicSparseConv2d(3, 4, 3, density=0.5, score="magnitude", regrow="random")
    mask, w = layer.mask.clone(), layer.weight.detach().clone()
    out = layer.prune_regrow(fraction=0.4, generator=torch.Generator().manual_seed(0))
    pruned, _ = topk_by_hand(mask, w.abs(), torch.zeros_like(w), 0.4, (0,))
    assert torch.equal(out.pruned, pruned)
    assert not (out.regrown & mask).any() and torch.equal(out.regrown.sum((1, 2, 3)), pruned.sum((1, 2, 3)))
    # uniform among the inactive: over many draws from the same state every inactive entry is chosen about
    # equally often (each with probability k/(n-a) per draw)
    hits = torch.zeros(mask.shape)
    for seed in range(300):
        hits += sparsity.prune_regrow(mask, w.abs(), torch.rand(w.shape, generator=torch.Generator().manual_seed(seed)),
                                      0.4, ties="random").regrown
    rate = hits[~mask] / 300
    want = (pruned.sum((1, 2, 3), keepdim=True) / (~mask).sum((1, 2, 3), keepdim=True)).expand_as(mask)[~mask]
    assert (rate - want).abs().max() < 0.12


# ---------------------------------------------------------------------------------------------- global scope
def _model(**kwargs):
    return nn.Sequential(convzoo.DynamicSparseConv2d(3, 8, 3, density=0.3, score="magnitude", **kwargs), nn.ReLU(),
                         convzoo.DynamicSparseConv2d(8, 6, 3, density=0.6, score="magnitude", **kwargs))


@pytest.mark.parametrize("regrow", ["random", "gradient"])
def test_global_scope_prunes_the_globally_smallest_and_keeps_every_count(regrow):
    torch.manual_seed(8)
    model = _model(regrow=regrow)
    layers = [model[0], model[2]]
    sched = PruneRegrowSchedule(model, every=1, fraction=0.3, scope="global", generator=torch.Generator())
    total = sum(int(m.mask.sum()) for m in layers)
    for _step in range(3):
        if regrow == "gradient":
            cubic_loss(model(torch.randn(2, 3, 7, 7))).backward()
        masks = [m.mask.clone() for m in layers]
        mags = torch.cat([m.weight.detach().abs().flatten() for m in layers])
        kept = torch.cat([m.flatten() for m in masks])
        k = round(0.3 * int(kept.sum()))
        # by hand: the k smallest |w| among the kept, over both layers (continuous: no ties)
        order = sorted(kept.nonzero().flatten().tolist(), key=lambda i: mags[i].item())
        want = torch.zeros_like(kept)
        want[order[:k]] = True
        outs = sched.global_prune_regrow(0.3)
        got = torch.cat([o.pruned.flatten() for o in outs])
        assert torch.equal(got, want)
        for m, o, old in zip(layers, outs, masks):
            assert o.regrown.sum() == o.pruned.sum() and not (o.regrown & old).any()
            assert m.mask.sum() == old.sum()  # each layer keeps its count
        assert sum(int(m.mask.sum()) for m in layers) == total
    assert sched.step()  # every=1: the schedule runs the global step too
    assert sum(int(m.mask.sum()) for m in layers) == total


def test_global_scope_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="scope must"):
        PruneRegrowSchedule(_model(), scope="world")
    # a block layer with partial edge tiles (24 = 16 + 8 outputs): a regrown tile would not replace a pruned one
    blocky = nn.Sequential(convzoo.DynamicSparseConv2d(16, 24, 1, block=(16, 16), score="magnitude"))
    with pytest.raises(ValueError, match="whole tiles"):
        PruneRegrowSchedule(blocky, scope="global")
    with pytest.raises(ValueError, match="score"):
        PruneRegrowSchedule(nn.Sequential(convzoo.DynamicSparseConv2d(3, 4, 3)), scope="global")
    mixed = nn.Sequential(convzoo.DynamicSparseConv2d(3, 4, 3, score="magnitude", prune_fraction=0.1),
                          convzoo.DynamicSparseConv2d(4, 4, 3, score="magnitude", prune_fraction=0.2))
    with pytest.raises(ValueError, match="fraction"):
        PruneRegrowSchedule(mixed, scope="global")
    PruneRegrowSchedule(mixed, scope="global", fraction=0.1)


def _tile_units(m):
    """By hand: a block layer's tiles as (kept, mean |w|, active count, entry mask) in [G, TO, TK] row-major order."""
    bo, bk = m._mask_block
    wm = sparsity.weight_matrix(m.weight.detach().abs(), m.groups)
    mm = sparsity.weight_matrix(m.mask, m.groups)
    units = []
    for g in range(wm.shape[0]):
        for to in range(wm.shape[1] // bo):
            for tk in range(wm.shape[2] // bk):
                sl = (g, slice(to * bo, to * bo + bo), slice(tk * bk, tk * bk + bk))
                where = torch.zeros_like(mm)
                where[sl] = True
                units.append((bool(mm[sl].any()), wm[sl].float().mean().item(), int(mm[sl].sum()),
                              sparsity.weight_from_matrix(where, tuple(m.mask.shape))))
    return units


@pytest.mark.parametrize("regrow", ["random", "gradient"])
def test_global_scope_ranks_whole_blocks_with_entries_and_counts_in_weights(regrow):
    """A block layer, an unstructured one and an N:M one under scope='global': by hand, the active units (entries;
    whole 16×16 tiles by mean |w|, weighing their active weights) in ascending score, the longest prefix holding at
    most round(f·A) weights goes; every layer keeps its count (the block one its whole tiles); the N:M layer takes
    its own per-layer N:M step."""
    torch.manual_seed(9)
    model = nn.Sequential(convzoo.DynamicSparseConv2d(16, 32, 3, padding=1, density=0.5, block=(16, 16),
                                                      score="magnitude", regrow=regrow), nn.ReLU(),
                          convzoo.DynamicSparseConv2d(32, 8, 3, padding=1, density=0.3, score="magnitude",
                                                      regrow=regrow), nn.ReLU(),
                          convzoo.DynamicSparseConv2d(8, 8, 1, nm=(2, 4), score="magnitude", regrow=regrow))
    blocky, plain, nm = model[0], model[2], model[4]
    with torch.no_grad():  # spread the block layer's tile means so that tiles and entries interleave in the ranking
        blocky.weight.mul_(0.6)
    sched = PruneRegrowSchedule(model, every=1, fraction=0.3, scope="global", generator=torch.Generator())
    counts = [int(m.mask.sum()) for m in (blocky, plain, nm)]
    for _step in range(3):
        if regrow == "gradient":
            cubic_loss(model(torch.randn(2, 16, 5, 5))).backward()
        tiles = _tile_units(blocky)
        masks = [m.mask.clone() for m in (blocky, plain, nm)]
        units = [(s, n, ("t", i)) for i, (k, s, n, _) in enumerate(tiles) if k]
        wp = plain.weight.detach().abs().flatten()
        units += [(wp[j].item(), 1, ("e", j)) for j in masks[1].flatten().nonzero().flatten().tolist()]
        budget = round(0.3 * sum(n for _, n, _ in units))
        units.sort(key=lambda u: u[0])  # continuous data: no ties
        gone, used = [], 0
        for _s, n, which in units:
            if used + n > budget:
                break
            used += n
            gone.append(which)
        want_b = torch.zeros_like(masks[0])
        want_p = torch.zeros_like(masks[1]).flatten()
        for kind, i in gone:
            if kind == "t":
                want_b |= tiles[i][3] & masks[0]
            else:
                want_p[i] = True
        assert any(k == "t" for k, _ in gone) and any(k == "e" for k, _ in gone)  # both kinds compete
        outs = sched.global_prune_regrow(0.3)
        assert torch.equal(outs[0].pruned, want_b) and torch.equal(outs[1].pruned, want_p.view(masks[1].shape))
        for m, o, old, c in zip((blocky, plain, nm), outs, masks, counts):
            assert int(m.mask.sum()) == c  # every layer keeps its count: the total is exact
            assert not (o.regrown & old & ~o.pruned).any()
        assert torch.equal(sparsity.block_mask(blocky.mask, (16, 16)), blocky.mask)  # whole tiles only
        # N:M kept: every group of 4 along the reduction keeps exactly 2, and the layer did change
        groups = sparsity.weight_matrix(nm.mask, 1).reshape(-1, 4).sum(1)
        assert (groups == 2).all() and outs[2].pruned.sum() == outs[2].regrown.sum() > 0
        assert sum(int(m.mask.sum()) for m in (blocky, plain, nm)) == sum(counts)


def test_prune_regrow_count_with_block_is_in_tiles_and_refused_with_nm():
    torch.manual_seed(10)
    scores = torch.rand(32, 16, 3, 3)
    mask = sparsity.block_mask(scores, (16, 16), density=0.5)  # 2 x 9 tiles, 9 kept
    out = sparsity.prune_regrow(mask, scores, torch.rand(scores.shape), 0.0, dims=(), block=(16, 16),
                                count=torch.tensor(2), ties="random")
    tiles = sparsity._tiled(out.pruned, 1, (16, 16)).any(dim=4).any(dim=2)
    grown = sparsity._tiled(out.regrown, 1, (16, 16)).any(dim=4).any(dim=2)
    assert int(tiles.sum()) == 2 and int(grown.sum()) == 2 and out.mask.sum() == mask.sum()
    assert torch.equal(sparsity.block_mask(out.mask, (16, 16)), out.mask)
    with pytest.raises(ValueError, match="count"):
        sparsity.prune_regrow(sparsity.nm_mask(scores), scores, scores, 0.1, nm=(2, 4), count=torch.tensor(1))
