"""DynamicSparseConv1d/2d/3d and PruneRegrowSchedule: statistics accumulated from the layer's own input and output
(every update_every calls, sum or EMA) against coactivation calls made by hand, prune/regrow with exact counts,
re-initialised weights and zeroed optimizer state, gradients never reaching masked weights, the cosine schedule,
torch.compile(fullgraph=True, dynamic=True) of a training step (recompiles counted), no host sync (prune_regrow
under a fullgraph compile), DistributedDataParallel with gloo on 2 processes against one process on the
concatenated batch, and bad input."""

import functools
import math

import pytest
import torch
import torch._dynamo.testing
import torch._inductor.config
from _families import assert_two_ranks_match_one_process
from torch import nn

import convzoo
import convzoo.functional as cf
from convzoo.layers.dynamic_sparse import DynamicSparseConv1d, DynamicSparseConv2d, DynamicSparseConv3d


def _layer(**kw):
    args = {"density": 0.5, "padding": 1}
    args.update(kw)
    return DynamicSparseConv2d(4, 6, 3, **args)


def _hand_count(layer, x):
    y = layer(x)
    return cf.coactivation(x, y.detach(), tuple(layer.weight.shape), layer.stride, layer.padding, layer.dilation,
                           layer.groups, mode=layer.statistic)


# ---------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("every", [1, 3])
def test_statistics_accumulate_every_update_every_calls(every):
    """The buffer is the sum of coactivation(x, y) over the training calls 0, every, 2·every, ... (eval calls
    neither count nor collect)."""
    torch.manual_seed(0)
    layer = _layer(update_every=every)
    xs = [torch.randn(2, 4, 5, 5) for _ in range(7)]
    want = torch.zeros_like(layer.coactivation)
    for i, x in enumerate(xs):
        y = layer(x)
        if i % every == 0:
            want += cf.coactivation(x, y.detach(), (6, 4, 3, 3), 1, 1, 1, 1, mode="count")
    layer.eval()
    layer(xs[0])
    torch.testing.assert_close(layer.coactivation, want, atol=0, rtol=0)
    assert layer.calls.item() == len(xs)
    assert want.sum() > 0


def test_statistics_ema():
    torch.manual_seed(0)
    layer = _layer(ema=0.9, score="correlation")
    want = torch.zeros_like(layer.coactivation)
    for _ in range(3):
        x = torch.randn(3, 4, 5, 5)
        y = layer(x)
        want = 0.9 * want + 0.1 * cf.coactivation(x, y.detach(), (6, 4, 3, 3), 1, 1, 1, 1, mode="correlation")
    torch.testing.assert_close(layer.coactivation, want)


def test_magnitude_with_random_regrowth_collects_nothing():
    layer = _layer(score="magnitude", regrow="random", padding_mode="reflect")
    layer(torch.randn(2, 4, 5, 5))
    assert not layer.collects and layer.coactivation.abs().sum() == 0


# ---------------------------------------------------------------------------------------------- prune / regrow
@pytest.mark.parametrize("score", ["count", "magnitude", "correlation"])
@pytest.mark.parametrize("regrow", ["coactivation", "random"])
@pytest.mark.parametrize("prune_dims", [(0,), (0, 1)])
def test_prune_regrow_exact_counts_reinit_and_optimizer_state(score, regrow, prune_dims):
    torch.manual_seed(0)
    layer = _layer(score=score, regrow=regrow, prune_dims=prune_dims, prune_fraction=0.3)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(2):
        layer(torch.randn(2, 4, 5, 5)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    before_mask, before_w = layer.mask.clone(), layer.weight.detach().clone()
    out = layer.prune_regrow(opt, generator=torch.Generator().manual_seed(1))
    assert torch.equal(layer.mask, out.mask)
    def per(m):
        return (m.flatten(len(prune_dims)).sum(-1))
    assert torch.equal(per(layer.mask), per(before_mask))
    expected = torch.round(per(before_mask).double() * 0.3).long()
    assert torch.equal(per(out.pruned), expected) and out.pruned.any()
    assert not (out.regrown & out.pruned).any() and not (out.regrown & before_mask).any()
    w = layer.weight.detach()
    assert (w[out.pruned] == 0).all()
    assert (w[out.regrown].abs() <= 1 / math.sqrt(4 * 9)).all()
    keep = before_mask & ~out.pruned
    assert torch.equal(w[keep], before_w[keep])
    state = opt.state[layer.weight]
    changed = out.pruned | out.regrown
    for name in ("exp_avg", "exp_avg_sq"):
        assert (state[name][changed] == 0).all() and (state[name][keep] != 0).any()
    assert layer.coactivation.abs().sum() == 0  # reset


def test_coactivation_regrowth_takes_the_strongest():
    layer = _layer(prune_fraction=0.5, prune_dims=())
    with torch.no_grad():
        layer.mask.zero_()
        layer.mask.view(-1)[:10] = True
        layer.coactivation.copy_(torch.arange(layer.weight.numel(), dtype=torch.float32).view_as(layer.weight))
    out = layer.prune_regrow()
    flat = out.regrown.view(-1)
    assert flat[-5:].all() and flat.sum() == 5  # the 5 highest counts among the inactive ones
    assert out.pruned.view(-1)[:5].all() and out.pruned.sum() == 5  # the 5 lowest among the kept ones


def test_gradient_never_reaches_masked_weights():
    torch.manual_seed(0)
    layer = _layer()
    layer.prune_regrow()
    layer(torch.randn(2, 4, 5, 5)).sum().backward()
    assert (layer.weight.grad[~layer.mask] == 0).all() and layer.weight.grad[layer.mask].abs().sum() > 0


@pytest.mark.slow  # ~20 s of compiling; test_sparsity compiles the prune_regrow function itself by default
@torch._inductor.config.patch(fallback_random=True)  # the compiled draws (random ties, re-init) are eager's
def test_prune_regrow_compiles_fullgraph():
    """No host sync in prune_regrow: a fullgraph compile of it traces (a .item() or a data-dependent shape
    would break the graph) and gives the eager result."""
    torch.manual_seed(0)
    a, b = _layer(score="count"), _layer(score="count")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 5, 5)
    a(x), b(x)
    torch.manual_seed(1)
    want = a.prune_regrow()
    compiled = torch.compile(b.prune_regrow, fullgraph=True)
    torch.manual_seed(1)
    got = compiled()
    assert torch.equal(got.mask, want.mask) and torch.equal(b.mask, a.mask)


# ---------------------------------------------------------------------------------------------- schedule
def test_schedule_cosine_every_and_end():
    torch.manual_seed(0)
    model = nn.Sequential(_layer(prune_fraction=0.4), nn.ReLU(), DynamicSparseConv2d(6, 6, 3, prune_fraction=0.4))
    sched = convzoo.PruneRegrowSchedule(model, every=2, end=8)
    calls = []
    for layer in sched.layers:
        real = layer.prune_regrow
        layer.prune_regrow = (lambda *a, _r=real, **k: calls.append(a[1]) or _r(*a, **k))
    did = [sched.step() for _ in range(10)]
    assert did == [False, True, False, True, False, True, False, False, False, False]
    fractions = [0.4 * 0.5 * (1 + math.cos(math.pi * t / 8)) for t in (2, 4, 6)]
    assert calls == pytest.approx([f for f in fractions for _ in range(2)])
    assert sched.state_dict() == {"steps": 10}


# ---------------------------------------------------------------------------------------------- compile
def test_compiled_training_step_matches_eager():
    """fullgraph, dynamic: the statistics schedule runs through torch.cond on the tensor counter, so neither the
    counter nor the batch size recompiles."""
    torch.manual_seed(0)
    eager = nn.Sequential(_layer(update_every=2), nn.ReLU(), DynamicSparseConv2d(6, 3, 3, update_every=2))
    comp = nn.Sequential(_layer(update_every=2), nn.ReLU(), DynamicSparseConv2d(6, 3, 3, update_every=2))
    comp.load_state_dict(eager.state_dict())
    cnt = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    step = torch.compile(lambda m, x: m(x).square().mean(), backend=cnt, fullgraph=True, dynamic=True)
    frames = []
    for n in (2, 3, 4, 2, 5):
        x = torch.randn(n, 4, 6, 6)
        eager(x).square().mean().backward()
        step(comp, x).backward()
        frames.append(cnt.frame_count)
    for a, b in zip(eager.modules(), comp.modules()):
        if isinstance(a, DynamicSparseConv2d):
            torch.testing.assert_close(b.coactivation, a.coactivation, atol=0, rtol=0)
            torch.testing.assert_close(b.weight.grad, a.weight.grad)
            assert b.calls.item() == 5
    # no recompile after the first call; one graph with the model in it (the first call's analysis restarts
    # once, which hands the backend an empty graph first)
    assert frames == [frames[0]] * 5
    assert sum("coactivation" in g.code for g in cnt.graphs) == 1


# ---------------------------------------------------------------------------------------------- distributed
def _model(wrap="ddp"):
    torch.manual_seed(0)
    # rigl: magnitude pruning, regrowth by the dense gradient, which prune_regrow all-reduces (a sum of the ranks'
    # mean gradients: the single process's ranking, scaled)
    kw = {"score": "magnitude", "regrow": "gradient", "update_every": 2} if wrap == "ddp_rigl" else {}
    return nn.Sequential(_layer(prune_fraction=0.25, **kw), nn.ReLU(),
                         DynamicSparseConv2d(6, 3, 3, prune_fraction=0.25, **kw))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 4, 6, 6, generator=g) for _ in range(4)]


def _train(model, rank=None, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = convzoo.PruneRegrowSchedule(model, opt, every=2)
    for x in _batches():
        if rank is not None:
            x = x.chunk(world)[rank]
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model


def _fully_shard(model):
    from torch.distributed.fsdp import fully_shard  # FSDP2: the parameters become sharded DTensors

    return fully_shard(model)


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["ddp", "fully_shard", "ddp_rigl"])
def test_distributed_two_processes_match_one_process_on_the_concatenated_batch(tmp_path, wrap):
    """gloo, 2 CPU processes, 4 steps with 2 prune/regrow steps, under DistributedDataParallel and under FSDP2's
    fully_shard (sharded DTensor weights): both ranks end with identical masks, weights and statistics, equal to
    one process training on the whole batch (the gradients are averaged; the counts are all-reduced)."""
    r0 = assert_two_ranks_match_one_process(
        tmp_path, functools.partial(_model, wrap), _train, atol=1e-5, rtol=1e-5,
        wrap=_fully_shard if wrap == "fully_shard" else nn.parallel.DistributedDataParallel)
    assert not r0["0.mask"].all()


# ---------------------------------------------------------------------------------------------- layers / errors
def test_1d_and_3d_layers_collect_and_prune():
    torch.manual_seed(0)
    for layer, x in ((DynamicSparseConv1d(3, 5, 3), torch.randn(2, 3, 9)),
                     (DynamicSparseConv3d(3, 5, 2), torch.randn(2, 3, 4, 4, 4))):
        layer(x)
        assert layer.coactivation.sum() > 0
        before = layer.mask.flatten(1).sum(1)
        layer.prune_regrow()
        assert torch.equal(layer.mask.flatten(1).sum(1), before)


@pytest.mark.parametrize(("kwargs", "exc", "name"), [
    ({"update_every": 0}, ValueError, "update_every"),
    ({"score": "hebb"}, ValueError, "score"),
    ({"regrow": "best"}, ValueError, "regrow"),
    ({"prune_fraction": 1.5}, ValueError, "prune_fraction"),
    ({"prune_fraction": "0.1"}, TypeError, "prune_fraction"),
    ({"ema": -0.1}, ValueError, "ema"),
    ({"x_threshold": None}, TypeError, "x_threshold"),
    ({"score": "correlation", "y_threshold": 0.5}, ValueError, "threshold"),
    ({"prune_dims": (4,)}, ValueError, "dims"),
    ({"prune_dims": 0}, TypeError, "prune_dims"),
    ({"padding_mode": "reflect"}, ValueError, "padding_mode"),
])
def test_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        _layer(**kwargs)


def test_schedule_bad_arguments():
    with pytest.raises(ValueError, match="every"):
        convzoo.PruneRegrowSchedule(nn.Sequential(_layer()), every=0)
    with pytest.raises(ValueError, match="no DynamicSparseConv"):
        convzoo.PruneRegrowSchedule(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="fraction"):
        convzoo.PruneRegrowSchedule(nn.Sequential(_layer()), fraction=2.0)


# ---------------------------------------------------------------------------------------------- state
def test_meta_construction_to_empty_and_reset_parameters_give_a_valid_layer():
    """to_empty from 'meta' works (the statistics too), and reset_parameters makes every piece of state valid: the
    mask drawn again (exact counts), the statistics zero, both counters zero (the collect schedule restarts)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        layer = DynamicSparseConv2d(16, 32, 3, density=0.1, update_every=2)
    layer.to_empty(device="cpu")
    with torch.no_grad():  # what uninitialised memory may hold
        layer.mask.fill_(True)
        layer.calls.fill_(12345)
        layer.coactivation.fill_(float("nan"))
    layer._calls = 7
    layer.reset_parameters()
    assert layer.coactivation.device.type == "cpu" and layer.coactivation.dtype == torch.float32
    assert (layer.coactivation == 0).all() and layer.calls.item() == 0 and layer._calls == 0
    assert (layer.mask.flatten(1).sum(1) == round(0.1 * 16 * 9)).all()
    x = torch.randn(2, 16, 5, 5)
    want = cf.coactivation(x, layer(x).detach(), tuple(layer.weight.shape), mode="count")
    layer(x)  # call 1: not collected (update_every=2)
    torch.testing.assert_close(layer.coactivation, want, atol=0, rtol=0)
    assert layer.calls.item() == 2


def test_reset_parameters_resets_the_statistics_and_counters():
    torch.manual_seed(0)
    layer = _layer(update_every=2)
    for _ in range(3):
        layer(torch.randn(2, 4, 5, 5))
    assert layer.coactivation.sum() > 0 and layer.calls.item() == 3
    layer.reset_parameters()
    assert (layer.coactivation == 0).all() and layer.calls.item() == 0 and layer._calls == 0
    assert (layer.mask.flatten(1).sum(1) == round(0.5 * 36)).all()


@pytest.mark.parametrize("cls", [convzoo.MaskedConv2d, DynamicSparseConv2d])
def test_a_checkpoint_without_a_mask_reports_it_missing_and_keeps_the_mask(cls):
    """A dense nn.Conv2d checkpoint has no mask: strict=False lists it in missing_keys and keeps the layer's own
    (it does not silently become dense); strict loading refuses it."""
    torch.manual_seed(0)
    layer = cls(16, 32, 3, density=0.1)
    before = layer.mask.clone()
    dense = nn.Conv2d(16, 32, 3)
    result = layer.load_state_dict(dense.state_dict(), strict=False)
    assert "mask" in result.missing_keys
    assert torch.equal(layer.mask, before) and layer.density == pytest.approx(before.float().mean().item())
    # the stored weight is the sparse weight (issue 24, item 3): the checkpoint's, zero where the mask is off
    assert torch.equal(layer.weight, torch.where(layer.mask, dense.weight, 0))
    with pytest.raises(RuntimeError, match=r"Missing key.*mask"):
        layer.load_state_dict(dense.state_dict())


def test_tied_coactivation_scores_break_ties_at_random_so_the_mask_does_not_drift():
    """Integer counts tie a lot (here all of them: no statistics collected). Ties broken by position would move
    the kept connections to the low-index input channels update after update; broken at random (from the
    generator) the kept connections stay spread evenly over the input channels."""
    torch.manual_seed(0)
    layer = DynamicSparseConv2d(16, 32, 3, density=0.1, prune_fraction=0.3)
    gen = torch.Generator().manual_seed(0)
    per_channel = torch.zeros(16)
    for _ in range(40):
        layer.prune_regrow(generator=gen)
        per_channel += layer.mask.sum((0, 2, 3))
    mean = per_channel.mean()
    assert (per_channel - mean).abs().max() < 0.2 * mean, per_channel
    assert (layer.mask.flatten(1).sum(1) == round(0.1 * 144)).all()
    again = DynamicSparseConv2d(16, 32, 3, density=0.1, prune_fraction=0.3)
    again.load_state_dict(layer.state_dict())
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(layer.prune_regrow(generator=gen_a).mask, again.prune_regrow(generator=gen_b).mask)


@pytest.mark.parametrize("prune_dims", [(0,), (0, 1), (), (1,)])
def test_the_initial_mask_keeps_prune_regrows_exact_count_per_slice(prune_dims):
    """The initial mask follows prune_dims as prune_regrow does: per filter ((0, 1)) every filter keeps
    round(density·∏kernel) taps, none starts (and stays) empty; also after reset_parameters."""
    torch.manual_seed(0)
    layer = DynamicSparseConv2d(16, 32, 3, density=0.3, prune_dims=prune_dims)
    rest = [d for d in range(4) if d not in prune_dims]
    n = math.prod(layer.weight.shape[d] for d in rest)

    def per_slice(m):
        return m.permute(*prune_dims, *rest).reshape(-1, n).sum(1)

    assert (per_slice(layer.mask) == round(0.3 * n)).all()
    layer.reset_parameters()
    assert (per_slice(layer.mask) == round(0.3 * n)).all()
    layer(torch.randn(2, 16, 5, 5))
    layer.prune_regrow()
    assert (per_slice(layer.mask) == round(0.3 * n)).all()


def test_load_state_dict_restores_the_update_every_phase():
    """The eager schedule's counter follows the loaded `calls`: a restored layer collects on the same calls as the
    one it was saved from. A state_dict without `calls` (an older or a MaskedConv one) still loads strictly, the
    counters left as they were."""
    torch.manual_seed(0)
    a = _layer(update_every=3)
    for _ in range(4):
        a(torch.randn(2, 4, 5, 5))
    b = _layer(update_every=3)
    b.load_state_dict(a.state_dict())
    assert b.calls.item() == 4 and b._calls == 4
    for _ in range(3):
        x = torch.randn(2, 4, 5, 5)
        a(x), b(x)
        torch.testing.assert_close(b.coactivation, a.coactivation, atol=0, rtol=0)
    old = {k: v for k, v in a.state_dict().items() if k != "calls"}
    c = _layer(update_every=3)
    c(torch.randn(2, 4, 5, 5))
    result = c.load_state_dict(old)
    assert result.missing_keys == [] and c.calls.item() == 1 and c._calls == 1
    assert torch.equal(c.mask, a.mask) and torch.equal(c.coactivation, a.coactivation)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_counts_each_forward_once(use_reentrant):
    """torch.utils.checkpoint recomputes the forward inside backward: that recomputation sees the input the real
    forward already counted, so neither the statistics nor the counters may take it again."""
    torch.manual_seed(0)
    a, b = _layer(update_every=2), _layer(update_every=2)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        x = torch.randn(2, 4, 5, 5)
        a(x).square().sum().backward()
        y = torch.utils.checkpoint.checkpoint(b, x.clone().requires_grad_(), use_reentrant=use_reentrant)
        y.square().sum().backward()
    torch.testing.assert_close(b.coactivation, a.coactivation, atol=0, rtol=0)
    assert b.calls.item() == a.calls.item() == 3 and b._calls == 3
    torch.testing.assert_close(b.weight.grad, a.weight.grad)


def test_from_dense_and_to_dense_convert_to_the_plain_conv():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = DynamicSparseConv2d.from_dense(conv)
    assert type(layer) is DynamicSparseConv2d and layer.mask.all() and torch.equal(layer.weight, conv.weight)
    mask = torch.rand(layer.weight.shape) < 0.3
    layer = DynamicSparseConv2d.from_dense(conv, mask, score="magnitude")
    assert torch.equal(layer.mask, mask) and layer.score_mode == "magnitude"
    back = layer.to_dense()
    assert type(back) is nn.Conv2d
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(back(x), layer(x))
    with pytest.raises(TypeError, match="conv must be an Conv2d, got Conv1d"):
        DynamicSparseConv2d.from_dense(nn.Conv1d(4, 6, 3))
