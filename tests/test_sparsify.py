"""convzoo.sparsify / desparsify: exact total kept counts per distribution (ERK, ER and uniform hand-computed on a
3-layer net), the dense-capping redistribution against RigL's one-layer-at-a-time loop, exclude, layers, kinds,
block and N:M structure, magnitude / random initial masks, parameters, hooks, modes and shared modules kept, the
round trip through desparsify, bad arguments; and the issue's done-when: a sparsified conv + linear model trained
with PruneRegrowSchedule under torch.compile(fullgraph=True) with the exact total density (and, with block, the
visited-tile fraction) at every update, and under DistributedDataParallel with 2 gloo ranks."""

import math

import pytest
import torch
from _families import assert_two_ranks_match_one_process
from torch import nn

import convzoo
from convzoo import sparsity
from convzoo.layers.convert import layer_densities
from convzoo.layers.masked_conv import _MaskedConvNd


def _net():
    """Weights [8, 3, 3, 3] (216), [16, 8, 3, 3] (1152), [10, 16] (160): 1528 in all."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _sparse_layers(model):
    return [m for m in model.modules() if isinstance(m, _MaskedConvNd)]


def _kept(model):
    return [int(m.mask.sum()) for m in _sparse_layers(model)]


# ERK at density 0.2: raw (C_in + C_out + Σk)/numel = 17/216, 30/1152, 26/160; Σ raw·n = 17 + 30 + 26 = 73;
# ε = 0.2·1528/73 = 4.18630..: targets 71.167, 125.589, 108.844 (floors 304); round(305.6) = 306: the 2 left go
# to the largest fractional parts (.844, .589).
# ER: raw (C_in + C_out)/(C_in·C_out) = 11/24, 24/128, 26/160; Σ raw·n = 99 + 216 + 26 = 341; ε = 305.6/341:
# targets 88.723, 193.577, 23.301 (floors 304): +1 to the first two.
# uniform: 43.2, 230.4, 32 (floors 305): +1 to the second (.4 > .2).
@pytest.mark.parametrize("distribution, want", [("erk", [71, 126, 109]), ("er", [89, 194, 23]),
                                                ("uniform", [43, 231, 32])])
def test_exact_counts_per_distribution_by_hand(distribution, want):
    model = _net()
    convzoo.sparsify(model, 0.2, distribution=distribution, exclude=())
    assert _kept(model) == want and sum(want) == round(0.2 * 1528)


def _rigl_reference(shapes, density, distribution):
    """RigL's loop: one layer (the largest raw density) made dense per round."""
    n = [math.prod(s) for s in shapes]
    raw = [(sum(s) if distribution == "erk" else s[0] + s[1]) / (math.prod(s) if distribution == "erk"
                                                                 else s[0] * s[1]) for s in shapes]
    dense = set()
    while True:
        rest = [i for i in range(len(n)) if i not in dense]
        eps = (density * sum(n) - sum(n[i] for i in dense)) / sum(raw[i] * n[i] for i in rest)
        top = max(rest, key=lambda i: raw[i])
        if raw[top] * eps <= 1:
            return [1.0 if i in dense else raw[i] * eps for i in range(len(n))]
        dense.add(top)


@pytest.mark.parametrize("distribution", ["erk", "er"])
def test_dense_capping_redistributes_as_rigl(distribution):
    shapes = [(256, 256), (64, 256, 3, 3), (2, 64), (3, 5), (10, 4, 3)]
    for density in (0.05, 0.3, 0.7):
        got = layer_densities(shapes, density, distribution)
        assert got == pytest.approx(_rigl_reference(shapes, density, distribution), rel=1e-12)
        assert sum(d * math.prod(s) for d, s in zip(got, shapes)) == pytest.approx(density * sum(
            math.prod(s) for s in shapes))
    # two small layers dense: Linear(64, 2) has raw 66/128 (dense at ε ≈ 10.9), leaving 1984 = 0.484375·4096
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))
    convzoo.sparsify(model, 0.5, distribution=distribution, exclude=())
    assert _kept(model) == [1984, 128]  # (a linear layer has no kernel terms: ERK = ER)
    assert model[1].mask.all()


def test_exclude_layers_and_kinds():
    model = _net()
    convzoo.sparsify(model, 0.3)  # exclude=("first", "last"): the middle conv only
    assert [type(m) for m in model] == [nn.Conv2d, nn.ReLU, convzoo.MaskedConv2d, nn.ReLU, nn.AdaptiveAvgPool2d,
                                        nn.Flatten, nn.Linear]
    assert _kept(model) == [round(0.3 * 1152)]
    model = _net()
    convzoo.sparsify(model, 0.3, exclude="0", kind="dynamic", update_every=3)
    assert [type(model[i]) for i in (0, 2, 6)] == [nn.Conv2d, convzoo.DynamicSparseConv2d,
                                                   convzoo.DynamicSparseLinear]
    assert model[2].update_every == 3 and sum(_kept(model)) == round(0.3 * (1152 + 160))
    model = _net()
    convzoo.sparsify(model, 0.3, layers="linear", exclude=())
    assert [type(m) for m in _sparse_layers(model)] == [convzoo.MaskedLinear]
    model = _net()
    convzoo.sparsify(model, 0.3, layers="conv", exclude=("last",))
    assert [type(m) for m in _sparse_layers(model)] == [convzoo.MaskedConv2d]
    assert type(model[2]) is nn.Conv2d  # "last" is the last conv when only convs are swapped
    outer = nn.Sequential(_net(), nn.Linear(10, 4))
    convzoo.sparsify(outer, 0.3, exclude=("0",))  # a container's name excludes everything in it
    assert type(outer[1]) is convzoo.MaskedLinear and not _sparse_layers(outer[0])
    shared = nn.Linear(4, 4)
    twice = nn.Sequential(nn.Linear(4, 4), shared, nn.ReLU(), shared, nn.Linear(4, 4))
    convzoo.sparsify(twice, 0.5, exclude=("3",))  # excluded under its second name: excluded
    assert type(twice[1]) is nn.Linear and twice[1] is twice[3] and _sparse_layers(twice) == [twice[0], twice[4]]


def test_block_counts_are_whole_tiles_per_layer():
    """With block: layer i's exact count k_i (the unblocked allocation) rounded to its T_i tiles, round(k_i·T_i/n_i)
    tiles, and the kernels visit exactly that fraction of tiles."""
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.Flatten(), nn.Linear(64, 48))
    ref = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.Flatten(), nn.Linear(64, 48))
    convzoo.sparsify(ref, 0.25, exclude=())
    convzoo.sparsify(model, 0.25, exclude=(), block=(16, 16))
    for layer, exact in zip(_sparse_layers(model), _kept(ref)):
        og, k = layer.weight.shape[0], math.prod(layer.weight.shape[1:])
        tiles = math.ceil(og / 16) * math.ceil(k / 16)
        want = round(exact * tiles / layer.weight.numel())
        assert torch.equal(sparsity.block_mask(layer.mask, (16, 16)), layer.mask)
        assert float(sparsity.tile_fraction(layer.tile_lists())) * tiles == pytest.approx(want)
        assert layer._mask_block == (16, 16)


def test_block_rounding_that_would_empty_a_layer_is_refused_and_changes_nothing():
    """Rounded to whole tiles layer by layer, a small layer's share can become 0 tiles (its output a constant):
    refused, naming the layer, before any weight is touched."""
    model = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 16), nn.Linear(16, 4))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"layer '1' \(Linear\).*rounds to 0 of its 2 tiles"):
        convzoo.sparsify(model, 0.3, exclude=(), block=(16, 16))
    assert all(type(m) is nn.Linear for m in model)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_nm_masks():
    model = _net()
    convzoo.sparsify(model, 0.5, distribution="uniform", nm=(2, 4), exclude=("first",))
    for layer in _sparse_layers(model):
        groups = sparsity.weight_matrix(layer.mask, 1).reshape(-1, 4).sum(1)
        assert (groups == 2).all()
    with pytest.raises(ValueError, match="nm"):  # the first conv's C_in = 3
        convzoo.sparsify(_net(), 0.5, distribution="uniform", nm=(2, 4), exclude=())


def test_magnitude_and_random_initial_masks():
    model = _net()
    weights = [m.weight.detach().clone() for m in (model[2], model[6])]
    convzoo.sparsify(model, 0.2, exclude=("first",))
    for layer, w in zip(_sparse_layers(model), weights):
        assert w.abs()[layer.mask].min() >= w.abs()[~layer.mask].max()  # the largest |w| kept
    masks = []
    for _ in range(2):
        model = _net()
        state = torch.get_rng_state()
        convzoo.sparsify(model, 0.2, exclude=("first",), init="random", generator=torch.Generator().manual_seed(3),
                         kind="dynamic")
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG untouched (the constructors' draws too)
        masks.append([m.mask.clone() for m in _sparse_layers(model)])
    assert all(torch.equal(a, b) for a, b in zip(*masks))  # the generator's draw
    assert _kept(model) == [int(m.sum()) for m in masks[0]]
    w = weights[0].abs()
    assert w[masks[0][0]].min() < w[~masks[0][0]].max()  # not the magnitude mask


def test_parameters_hooks_mode_and_shared_modules_are_kept():
    model = _net()
    shared = nn.Linear(10, 10)
    model.append(shared).append(nn.ReLU()).append(shared).append(nn.Linear(10, 3))
    model.eval()
    params = list(model.parameters())
    x = torch.randn(2, 3, 6, 6)
    seen = []
    handle = model[6].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model[6].register_forward_pre_hook(lambda m, i: seen.append("pre"))
    grads = []
    model[6].register_full_backward_hook(lambda m, gi, go: grads.append(go[0].shape))
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before: the same parameter objects
    assert convzoo.sparsify(model, 0.5, exclude=("first",)) is model
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert model[7] is model[9] and type(model[7]) is convzoo.MaskedLinear  # one module, both places
    assert all(not m.training for m in model.modules())
    model(x)
    assert seen == ["pre", (2, 10)]
    handle.remove()
    model(x)
    assert seen == ["pre", (2, 10), "pre"]
    for layer in _sparse_layers(model):
        assert (layer.weight[~layer.mask] == 0).all()
        assert layer.weight.device == state_before["6.weight"].device
    model(x).sum().backward()
    assert grads == [(2, 10)]
    opt.step()
    assert all((m.weight[~m.mask] == 0).all() for m in _sparse_layers(model))


def test_load_state_dict_pre_hooks_see_the_swapped_layer():
    # register_load_state_dict_pre_hook binds the module it was registered on (a weak reference): after the swap
    # it must be handed the new layer, not the dropped one (dead: an error; alive: a silent read of a stale layer)
    for convert, make in ((convzoo.sparsify, _net), (convzoo.desparsify, lambda: convzoo.sparsify(_net(), 0.5))):
        model = make()
        old = model[2]
        seen = []
        old.register_load_state_dict_pre_hook(lambda module, *args, seen=seen: seen.append(module))
        state = model.state_dict()
        convert(model, 0.5) if convert is convzoo.sparsify else convert(model)
        model.load_state_dict(state, strict=False)
        assert seen == [model[2]] and model[2] is not old
        del old, seen[:]
        model.load_state_dict(state, strict=False)  # the dropped layer gone: still the live one
        assert seen == [model[2]]


def test_reset_parameters_keeps_each_layers_density_and_meta_is_refused():
    model = _net()
    convzoo.sparsify(model, 0.2, exclude=())
    kept = _kept(model)
    for layer in _sparse_layers(model):
        layer.reset_parameters()
    for layer, k in zip(_sparse_layers(model), kept):  # per-row exact counts: within a row's rounding of k
        assert abs(int(layer.mask.sum()) - k) <= layer.weight.shape[0] / 2
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    convzoo.sparsify(model, 0.25, exclude=(), block=(16, 16))
    model[0].reset_parameters()
    assert float(sparsity.tile_fraction(model[0].tile_lists())) == 0.25
    with torch.device("meta"):
        meta = _net()
    with pytest.raises(ValueError, match="meta"):
        convzoo.sparsify(meta, 0.2)


def test_1d_3d_grouped_convs_and_a_layer_the_constructor_refuses():
    model = nn.Sequential(nn.Conv1d(4, 8, 3, groups=2), nn.Flatten(0, 0), nn.Conv3d(2, 4, 2, padding_mode="reflect",
                                                                                    padding=1))
    convzoo.sparsify(model, 0.4, kind="masked", exclude=())
    assert [type(m) for m in _sparse_layers(model)] == [convzoo.MaskedConv1d, convzoo.MaskedConv3d]
    assert model[0].groups == 2 and model[2].padding_mode == "reflect"
    shapes = [(8, 2, 3), (4, 2, 2, 2, 2)]  # ERK reads C_in per group: raw (8 + 2 + 3)/48 and (4 + 2 + 6)/64
    assert sum(_kept(model)) == round(0.4 * (48 + 64))
    assert layer_densities(shapes, 0.4, "erk")[0] / layer_densities(shapes, 0.4, "erk")[1] == pytest.approx(
        (13 / 48) / (12 / 64))
    x = torch.randn(2, 4, 9)
    torch.testing.assert_close(model[0](x), nn.functional.conv1d(x, model[0].weight * model[0].mask,
                                                                 model[0].bias, groups=2))
    with pytest.raises(ValueError, match=r"'2'.*padding_mode"):  # coactivation statistics need zero padding
        convzoo.sparsify(nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv3d(2, 4, 2, padding_mode="reflect",
                                                                                  padding=1)),
                         0.4, kind="dynamic", exclude=())
    convzoo.sparsify(model := nn.Sequential(nn.Conv3d(2, 4, 2, padding_mode="reflect", padding=1)), 0.4,
                     kind="dynamic", exclude=(), score="magnitude", regrow="random")
    assert type(model[0]) is convzoo.DynamicSparseConv3d


def test_dtype_and_a_bare_layer():
    layer = nn.Linear(32, 8, dtype=torch.float64)
    out = convzoo.sparsify(layer, 0.25, exclude=())
    assert type(out) is convzoo.MaskedLinear and out.weight is layer.weight and out.weight.dtype == torch.float64
    assert int(out.mask.sum()) == 64
    back = convzoo.desparsify(out)
    assert type(back) is nn.Linear and back.weight is layer.weight


@pytest.mark.parametrize("kind", ["masked", "dynamic"])
def test_desparsify_round_trip(kind):
    x = torch.randn(2, 3, 6, 6)
    model = _net()
    want = model(x)
    convzoo.sparsify(model, 1.0, kind=kind, exclude=())
    torch.testing.assert_close(model(x), want)
    convzoo.desparsify(model)
    assert [type(m) for m in model] == [type(m) for m in _net()]
    torch.testing.assert_close(model(x), want)
    model = _net()
    convzoo.sparsify(model, 0.3, kind=kind, exclude=())
    sparse_out = model(x)
    params = list(model.parameters())
    convzoo.desparsify(model)
    assert not _sparse_layers(model) and all(a is b for a, b in zip(params, model.parameters()))
    torch.testing.assert_close(model(x), sparse_out)


def test_desparsify_leaves_subclasses_alone():
    # a user's subclass of a masked layer (an extra module, its own forward) is not one desparsify knows how to
    # turn dense: swapping it for the plain layer would drop what it adds (a silently different output)
    class Scaled(convzoo.MaskedLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scale = nn.Parameter(torch.full((1,), 3.0))

        def forward(self, input):
            return super().forward(input) * self.scale

    torch.manual_seed(0)
    model = nn.Sequential(Scaled(6, 4, density=0.5), nn.ReLU(), convzoo.MaskedLinear(4, 2, density=0.5))
    x = torch.randn(3, 6)
    want = model(x)
    assert convzoo.desparsify(model) is model
    assert type(model[0]) is Scaled and type(model[2]) is nn.Linear
    torch.testing.assert_close(model(x), want)


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(density=1.5), ValueError, "density"),
    (dict(density="0.1"), TypeError, "density"),
    (dict(distribution="erdos"), ValueError, "distribution"),
    (dict(layers="all"), ValueError, "layers"),
    (dict(kind="static"), ValueError, "kind"),
    (dict(init="zeros"), ValueError, "init"),
    (dict(exclude=5), TypeError, "exclude"),
    (dict(exclude=("nope",)), ValueError, "exclude"),
    (dict(generator=0), TypeError, "generator"),
    (dict(update_every=2), TypeError, "kind"),
    (dict(kind="dynamic", prune_fraction=2.0), ValueError, "prune_fraction"),
    (dict(kind="dynamic", nm=(2, 4)), ValueError, "distribution"),
    (dict(nm=(2, 4), distribution="uniform"), ValueError, "density"),
    (dict(block=(16, 16), nm=(2, 4)), ValueError, "block and nm"),
    (dict(block=(12, 16)), ValueError, "block"),
    (dict(exclude=("0", "2", "6")), ValueError, "no conv"),
])
def test_bad_arguments_name_the_argument(kwargs, exc, word):
    model = _net()
    before = [type(m) for m in model]
    with pytest.raises(exc, match=word):
        convzoo.sparsify(model, **kwargs)
    assert [type(m) for m in model] == before  # nothing swapped
    with pytest.raises(TypeError, match="model"):
        convzoo.sparsify([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="model"):
        convzoo.desparsify(None)


def test_layers_the_swap_cannot_carry_are_refused():
    model = _net()
    model[6] = nn.utils.parametrizations.weight_norm(nn.Linear(16, 10))  # not exactly nn.Linear: left alone
    convzoo.sparsify(model, 0.5, exclude=())
    assert len(_sparse_layers(model)) == 2
    tied = _net()
    tied.append(nn.Linear(16, 10))
    tied[7].weight = tied[6].weight
    with pytest.raises(ValueError, match="share"):
        convzoo.sparsify(tied, 0.5, exclude=())
    lm = nn.ModuleDict({"embed": nn.Embedding(10, 16), "head": nn.Linear(16, 10, bias=False)})
    lm.head.weight = lm.embed.weight  # a tied language-model head: the mask would zero embedding rows
    with pytest.raises(ValueError, match="embed"):
        convzoo.sparsify(lm, 0.5, exclude=())
    spectral = _net()
    spectral[6] = nn.utils.spectral_norm(nn.Linear(16, 10))  # weight is an attribute, weight_orig the parameter
    with pytest.raises(ValueError, match="'6'"):
        convzoo.sparsify(spectral, 0.5, exclude=())


def test_the_schedule_keeps_the_exact_total_eagerly():
    model = _net()
    convzoo.sparsify(model, 0.2, kind="dynamic", exclude=(), prune_fraction=0.5, score="magnitude",
                     regrow="random")
    kept = _kept(model)
    assert sum(kept) == round(0.2 * 1528)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = convzoo.PruneRegrowSchedule(model, opt, every=1, generator=torch.Generator().manual_seed(0))
    assert len(sched.layers) == 3
    first = [m.mask.clone() for m in _sparse_layers(model)]
    for _ in range(3):
        model(torch.randn(4, 3, 6, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        assert _kept(model) == kept
    assert all(not torch.equal(a, m.mask) for a, m in zip(first, _sparse_layers(model)))


# ---------------------------------------------------------------------------------------------- done when
def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.mark.slow
@pytest.mark.parametrize("block, scope", [(None, "layer"), ((16, 16), "layer"), (None, "global"),
                                          ((16, 16), "global")])
def test_sparsify_and_the_schedule_train_compiled_with_exact_density_at_every_update(block, scope):
    """sparsify(kind='dynamic') + PruneRegrowSchedule, the training step under torch.compile(fullgraph=True): after
    every update the total kept count is round(density · P) (with block: every layer keeps its whole-tile count,
    and the kernels' visited-tile fraction equals its density in tiles), and the masks do change. With
    scope='global' (magnitude scores; with block the last Linear, 10 outputs, has partial tiles: excluded)."""
    model = _cnn()
    extra = {} if scope == "layer" else dict(score="magnitude")
    exclude = ("last",) if scope == "global" and block is not None else ()
    convzoo.sparsify(model, 0.2, kind="dynamic", exclude=exclude, block=block, prune_fraction=0.5,
                     generator=torch.Generator().manual_seed(0), **extra)
    layers = _sparse_layers(model)
    total = sum(m.weight.numel() for m in layers)
    kept = _kept(model)
    if block is None:
        assert sum(kept) == round(0.2 * total)
    fractions = [float(sparsity.tile_fraction(m.tile_lists())) for m in layers]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = convzoo.PruneRegrowSchedule(model, opt, every=2, generator=torch.Generator().manual_seed(1),
                                        scope=scope)
    step = torch.compile(lambda x, t: nn.functional.cross_entropy(model(x), t), fullgraph=True, backend="aot_eager")
    first = [m.mask.clone() for m in layers]
    g = torch.Generator().manual_seed(2)
    updates = 0
    for _ in range(6):
        x, t = torch.randn(4, 16, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
        step(x, t).backward()
        opt.step()
        opt.zero_grad()
        if sched.step():
            updates += 1
            assert _kept(model) == kept
            if block is not None:
                for m, f in zip(layers, fractions):
                    assert torch.equal(sparsity.block_mask(m.mask, block), m.mask)
                    assert float(sparsity.tile_fraction(m.tile_lists())) == f
            for m in layers:
                assert (m.weight[~m.mask] == 0).all()
    assert updates == 3
    assert any(not torch.equal(a, m.mask) for a, m in zip(first, layers))


def _ddp_model():
    model = _cnn()
    return convzoo.sparsify(model, 0.2, kind="dynamic", exclude=(), prune_fraction=0.25,
                            generator=torch.Generator().manual_seed(0))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 16, 6, 6, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(4)]


def _train(model, rank=None, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = convzoo.PruneRegrowSchedule(model, opt, every=2)
    for x, t in _batches():
        if rank is not None:
            x, t = x.chunk(world)[rank], t.chunk(world)[rank]
        nn.functional.cross_entropy(model(x), t).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model


@pytest.mark.slow
def test_a_sparsified_model_under_ddp_stays_identical_on_two_ranks(tmp_path):
    """gloo, 2 CPU processes, 4 steps with 2 prune/regrow steps of a sparsify'd conv + linear model: both ranks end
    with identical masks, weights and statistics, equal to one process on the whole batch."""
    r0 = assert_two_ranks_match_one_process(tmp_path, _ddp_model, _train, atol=1e-5, rtol=1e-5)
    masks = [k for k in r0 if k.endswith("mask")]
    assert len(masks) == 4 and sum(int(r0[k].sum()) for k in masks) == sum(int(v.sum()) for k, v in
                                                                           _ddp_model().state_dict().items()
                                                                           if k.endswith("mask"))
