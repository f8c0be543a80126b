"""MaskedLinear and DynamicSparseLinear: forward and backward against F.linear of the masked weight on both paths
(the Triton kernels under the interpreter, and the plain-torch path) for any leading dims, an unbatched and an empty
input, with unstructured, block and N:M masks; the coactivation statistics against a hand count; the conversions to
and from nn.Linear, nn.Linear state_dicts, meta-device construction, the tile-list cache under every kind of mask
write, a compiled training step, PruneRegrowSchedule driving them, and bad input."""

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from compile_checks import assert_compiled_step_matches_eager
from problems import TOL
from torch import nn

import convzoo
from convzoo import sparsity

CLASSES = [convzoo.MaskedLinear, convzoo.DynamicSparseLinear]
STRUCTURES = {"unstructured": dict(density=0.3), "block": dict(density=0.5, block=(16, 16)), "nm": dict(nm=(2, 4))}
SHAPES = [(3, 40), (40,), (2, 3, 40), (0, 40), (2, 0, 40)]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_forward_and_backward_match_f_linear_of_the_masked_weight(cls, structure, path):
    torch.manual_seed(0)
    layer = cls(40, 20, dtype=torch.float64, device=path, **STRUCTURES[structure])
    assert not layer.mask.all()
    for shape in SHAPES:
        x = torch.randn(shape, dtype=torch.float64, device=path, requires_grad=True)
        y = layer(x)
        want = F.linear(x, layer.weight * layer.mask, layer.bias)
        assert y.shape == want.shape
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, layer.weight, layer.bias), gy)
        exp = torch.autograd.grad(want, (x, layer.weight, layer.bias), gy)
        for a, e in zip(got, exp):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
        assert (got[1][~layer.mask] == 0).all()
    assert (layer.weight[~layer.mask] == 0).all()  # the stored weight is the sparse one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_bf16_and_autocast(dtype, path):
    torch.manual_seed(0)
    layer = convzoo.MaskedLinear(24, 10, density=0.5, dtype=dtype, device=path)
    x = torch.randn(5, 24, dtype=dtype, device=path)
    want = F.linear(x.double(), layer.weight.double() * layer.mask, layer.bias.double())
    rtol, atol = TOL[dtype]
    got = layer(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=rtol * 10, atol=atol * 10 * want.abs().max().item())
    if dtype == torch.float32 and path == "cpu":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = layer(x)
            b = F.linear(x, layer.weight * layer.mask, layer.bias)
        assert a.dtype == b.dtype == torch.bfloat16


def test_a_masked_nan_never_contributes():
    layer = convzoo.MaskedLinear(8, 4)
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[1, 3] = False
    layer.set_mask(mask)
    with torch.no_grad():
        layer.weight[1, 3] = float("nan")
    assert layer(torch.randn(2, 8)).isfinite().all()


def test_block_tiles_are_the_kernels_tiles():
    """A block mask of the [out, in] matrix: the kernels visit exactly the kept blocks."""
    torch.manual_seed(0)
    layer = convzoo.MaskedLinear(64, 32, density=0.25, block=(16, 16))
    assert torch.equal(sparsity.block_mask(layer.mask, (16, 16)), layer.mask)
    assert float(sparsity.tile_fraction(layer.tile_lists())) == pytest.approx(0.25)
    assert layer.density == pytest.approx(0.25)


def test_the_coactivation_statistics_count_every_leading_index_as_a_sample():
    torch.manual_seed(0)
    layer = convzoo.DynamicSparseLinear(6, 5, density=0.5)
    x = torch.randn(2, 3, 6)
    y = layer(x)
    xa, ya = (x > 0).reshape(-1, 6).double(), (y > 0).reshape(-1, 5).double()
    torch.testing.assert_close(layer.coactivation.double(), ya.T @ xa, atol=0, rtol=0)
    layer(torch.randn(6))  # unbatched: one more sample
    assert layer.coactivation.sum() >= (ya.T @ xa).sum()
    assert layer.calls.item() == 2


def test_prune_regrow_and_the_schedule_keep_counts_and_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(convzoo.DynamicSparseLinear(64, 32, density=0.5, block=(16, 16), prune_fraction=0.5),
                          nn.ReLU(), convzoo.DynamicSparseLinear(32, 8, density=0.5, prune_fraction=0.5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = convzoo.PruneRegrowSchedule(model, opt, every=1, generator=torch.Generator().manual_seed(0))
    assert sched.layers == [model[0], model[2]]
    rows = model[2].mask.sum(1)
    before = model[0].mask.clone()
    for _ in range(3):
        model(torch.randn(4, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        assert sched.step()
        assert float(sparsity.tile_fraction(model[0].tile_lists())) == pytest.approx(0.5)
        assert torch.equal(sparsity.block_mask(model[0].mask, (16, 16)), model[0].mask)
        assert torch.equal(model[2].mask.sum(1), rows)
        for layer in (model[0], model[2]):
            assert (layer.weight[~layer.mask] == 0).all()
    assert not torch.equal(model[0].mask, before)


# ---------------------------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_from_dense_to_dense_and_nn_linear_state_dicts(cls):
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    x = torch.randn(3, 12)
    mask = torch.rand(7, 12) < 0.4
    converted = cls.from_dense(linear, mask)
    assert torch.equal(converted.mask, mask)
    torch.testing.assert_close(converted(x), F.linear(x, linear.weight * mask, linear.bias))
    back = converted.to_dense()
    assert type(back) is nn.Linear
    torch.testing.assert_close(back(x), converted(x))
    # a plain nn.Linear loading the masked state_dict (minus the mask) is the sparse model
    plain = nn.Linear(12, 7)
    plain.load_state_dict({k: v for k, v in converted.state_dict().items() if k in ("weight", "bias")})
    torch.testing.assert_close(plain(x), converted(x))
    # a dense checkpoint: strict refuses it, strict=False lists the mask missing and keeps it (weight zeroed)
    layer = cls(12, 7, density=0.5)
    kept = layer.mask.clone()
    with pytest.raises(RuntimeError, match="mask"):
        layer.load_state_dict(linear.state_dict())
    result = layer.load_state_dict(linear.state_dict(), strict=False)
    assert "mask" in result.missing_keys
    assert torch.equal(layer.mask, kept) and (layer.weight[~kept] == 0).all()
    again = cls(12, 7)
    again.load_state_dict(converted.state_dict())
    assert torch.equal(again.mask, mask)
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        cls.from_dense(nn.Conv1d(12, 7, 1))
    assert "mask=(7, 12)" in repr(converted) and "in_features=12" in repr(converted)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("source", CLASSES, ids=lambda c: c.__name__)
def test_from_dense_of_a_masked_layer_takes_the_mask_argument(cls, source):
    # a masked layer is an nn.Linear too: its state_dict's mask must not override from_dense's mask (default all
    # ones); the weight taken is what it computes with (weight·mask)
    torch.manual_seed(0)
    src = source(12, 7, density=0.5)
    x = torch.randn(3, 12)
    assert cls.from_dense(src).mask.all()
    mask = torch.rand(7, 12) < 0.4
    converted = cls.from_dense(src, mask)
    assert torch.equal(converted.mask, mask)
    torch.testing.assert_close(converted(x), F.linear(x, src.weight * src.mask * mask, src.bias))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_meta_construction_then_load_state_dict_with_assign(cls):
    # the big-model path: build on 'meta', load_state_dict(..., assign=True); every tensor the layer computes with
    # (the statistics of a dynamic layer too) must come off 'meta', with the checkpoint's values
    torch.manual_seed(0)
    src = cls(8, 4, density=0.5)
    x = torch.randn(3, 8)
    src(x)  # (a dynamic layer's statistics and counter now nonzero)
    with torch.device("meta"):
        layer = cls(8, 4, density=0.5)
    assert not layer.load_state_dict({k: v.clone() for k, v in src.state_dict().items()}, assign=True).missing_keys
    assert torch.equal(layer.mask, src.mask) and torch.equal(layer.weight, src.weight)
    torch.testing.assert_close(layer(x), src(x))
    if cls is convzoo.DynamicSparseLinear:
        assert torch.equal(layer.coactivation, src.coactivation) and layer.calls.item() == src.calls.item()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs", [dict(density=0.3), dict(density=0.25, block=(16, 16))])
def test_meta_construction_to_empty_and_reset_parameters(cls, kwargs):
    with torch.device("meta"):
        layer = cls(64, 32, **kwargs)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.mask.fill_(True).view(-1)[::7] = False  # what uninitialised memory may hold
    layer.reset_parameters()
    assert layer.mask.dtype == torch.bool and layer.mask.device.type == "cpu"
    if "block" in kwargs:
        assert layer.mask.sum() == 0.25 * 64 * 32
        assert torch.equal(sparsity.block_mask(layer.mask, (16, 16)), layer.mask)
    else:
        assert torch.equal(layer.mask.sum(1), torch.full((32,), round(0.3 * 64)))
    assert (layer.weight[~layer.mask] == 0).all() and layer.weight[layer.mask].abs().max() <= 1 / 8
    if cls is convzoo.DynamicSparseLinear:
        assert layer.coactivation.eq(0).all() and layer.calls.item() == 0


def test_the_tile_list_cache_follows_every_kind_of_mask_write(kernel_device):
    """The layer hands the op the same [out, in, 1] view while the mask is unchanged (the op caches the lists per
    mask tensor); after a set_mask, an indexed write, a load_state_dict or a .data swap the result is still F.linear
    of the new mask (a stale view or stale lists would drop newly kept tiles)."""
    layer = convzoo.MaskedLinear(40, 40, device=kernel_device)
    x = torch.randn(3, 40, device=kernel_device)

    def check():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight * layer.mask, layer.bias), atol=1e-5,
                                   rtol=1e-5)

    empty = torch.zeros_like(layer.mask)
    empty[:2] = True
    layer.set_mask(empty)
    with torch.no_grad():
        layer.weight.normal_()  # masked entries nonzero again: the mask alone must hide them
    check()
    assert layer._conv_mask() is layer._conv_mask()
    with torch.no_grad():
        layer.mask[39, 39] = True
    check()
    layer.load_state_dict({**layer.state_dict(), "mask": torch.ones_like(layer.mask)})
    check()
    layer.mask.data = empty.clone()
    check()
    layer.mask.data = torch.ones_like(empty)
    check()


def test_compiled_training_step(path):
    """Both routes: the masked-conv op (the interpreter's kernels) and the plain path's F.linear."""
    torch.manual_seed(0)
    model = nn.Sequential(convzoo.MaskedLinear(12, 16, density=0.5), nn.ReLU(),
                          convzoo.MaskedLinear(16, 4, density=0.25, block=(16, 16)))
    params = list(model.parameters())

    def step(x):
        return torch.autograd.grad(model(x).square().mean(), params)

    def masked_zero(got):
        assert (got[0][~model[0].mask] == 0).all()

    assert_compiled_step_matches_eager(step, [torch.randn(n, 3, 12) for n in (2, 3)], masked_zero)


@pytest.mark.slow
def test_compiled_dynamic_training_step_matches_eager():
    """fullgraph, dynamic: the statistics of the linear layers ride the same torch.cond schedule as the convs'."""
    torch.manual_seed(0)

    def make():
        return nn.Sequential(convzoo.DynamicSparseLinear(8, 12, update_every=2), nn.ReLU(),
                             convzoo.DynamicSparseLinear(12, 3, update_every=2))

    eager, comp = make(), make()
    comp.load_state_dict(eager.state_dict())
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda m, x: m(x).square().mean(), backend=cnt, fullgraph=True, dynamic=True)
    for n in (2, 3, 4):
        x = torch.randn(n, 5, 8)
        eager(x).square().mean().backward()
        step(comp, x).backward()
    for a, b in zip(eager.modules(), comp.modules()):
        if isinstance(a, convzoo.DynamicSparseLinear):
            torch.testing.assert_close(b.coactivation, a.coactivation, atol=0, rtol=0)
            torch.testing.assert_close(b.weight.grad, a.weight.grad)
            assert b.calls.item() == 3 and a.coactivation.sum() > 0


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(density=1.5), ValueError, "density"),
    (dict(density="0.5"), TypeError, "density"),
    (dict(block=(24, 16)), ValueError, "block"),
    (dict(block=16), TypeError, "block"),
    (dict(nm=(2, 3)), ValueError, "nm"),
    (dict(nm=(2, 4), block=(16, 16)), ValueError, "nm and block"),
    (dict(nm=(2, 4), density=0.3), ValueError, "density"),
])
def test_bad_arguments(cls, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        cls(8, 4, **kwargs)


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(score="max"), ValueError, "score"),
    (dict(regrow="x"), ValueError, "regrow"),
    (dict(regrow_init="normal"), ValueError, "regrow_init"),
    (dict(update_every=0), ValueError, "update_every"),
    (dict(prune_dims=(2,)), ValueError, "dims"),
])
def test_bad_dynamic_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        convzoo.DynamicSparseLinear(8, 4, **kwargs)


@pytest.mark.parametrize("x, exc", [(torch.randn(3, 7), ValueError), (torch.randn(()), ValueError),
                                    (torch.ones(3, 8, dtype=torch.int64), TypeError), ([1.0] * 8, TypeError)])
def test_bad_input_names_it(x, exc):
    with pytest.raises(exc, match="input"):
        convzoo.MaskedLinear(8, 4)(x)
