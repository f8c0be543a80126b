"""masked_conv and MaskedConv1d/2d/3d: against ``F.convNd(x, weight·mask)`` (F.pad for the padding modes),
forward and backward on both paths (the tile-skipping kernel's own tests are in test_masked_conv_kernels.py),
gradients exactly zero where masked, opcheck, torch.compile of a training step, gradcheck, torch.func, the
layers' state_dict / conversions, and clear errors for bad input."""

import pytest
import torch
import torch.nn.functional as F
from compile_checks import assert_compiled_step_matches_eager
from problems import TOL
from torch import nn
from torch.func import grad, jvp, vmap

import convzoo
import convzoo.functional as cf

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# id: (input shape, weight shape, stride, padding, dilation, groups, padding_mode)
CASES = {
    "1d_S2_P1": ((2, 4, 11), (6, 4, 3), 2, 1, 1, 1, "zeros"),
    "1d_D2_G2_lohi_reflect": ((1, 4, 9), (4, 2, 3), 1, [(2, 1)], 2, 2, "reflect"),
    "2d_P1_G2": ((2, 4, 6, 7), (6, 2, 3, 3), 1, 1, 1, 2, "zeros"),
    "2d_same_circular": ((2, 3, 5, 6), (4, 3, 2, 3), 1, "same", 1, 1, "circular"),
    "2d_S3_depthwise_replicate": ((2, 3, 8, 7), (6, 1, 3, 2), 3, (1, 2), 1, 3, "replicate"),
    "2d_K1_valid": ((1, 5, 4, 4), (3, 5, 1, 1), 1, "valid", 1, 1, "zeros"),
    "3d_S2_P1_G2": ((2, 4, 5, 4, 5), (4, 2, 3, 3, 3), 2, 1, 1, 2, "zeros"),
    "3d_D2_replicate": ((1, 2, 5, 5, 4), (3, 2, 2, 2, 2), 1, 1, 2, 1, "replicate"),
}
DENSITIES = ["ones", "half", "tenth", "block", "zeros"]


def _mask(shape, kind):
    if kind == "ones":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "block":  # whole (output channel half) × (input channel) blocks
        m = torch.zeros(shape, dtype=torch.bool)
        m[: shape[0] // 2, : max(1, shape[1] // 2)] = True
        return m
    return torch.rand(shape) < (0.5 if kind == "half" else 0.1)


def _case(key, dtype=torch.float64, density="half"):
    xs, ws, s, p, d, g, mode = CASES[key]
    x, w = torch.randn(xs, dtype=dtype), torch.randn(ws, dtype=dtype)
    return x, w, _mask(ws, density), torch.randn(ws[0], dtype=dtype), {"stride": s, "padding": p, "dilation": d,
                                                                       "groups": g, "padding_mode": mode}


def _oracle(x, w, mask, b, stride, padding, dilation, groups, padding_mode):
    """``F.convNd(x, w·mask)``, the padding built by hand with F.pad (nn.ConvNd's way)."""
    nd = w.dim() - 2
    if padding == "same":
        pairs = [(dd * (k - 1) // 2, dd * (k - 1) - dd * (k - 1) // 2)
                 for k, dd in zip(w.shape[2:], (dilation,) * nd if isinstance(dilation, int) else dilation)]
    elif padding == "valid":
        pairs = [(0, 0)] * nd
    elif isinstance(padding, list):
        pairs = padding
    else:
        pairs = [(q, q) for q in ((padding,) * nd if isinstance(padding, int) else padding)]
    flat = [v for lo, hi in reversed(pairs) for v in (lo, hi)]
    xp = F.pad(x, flat, mode="constant" if padding_mode == "zeros" else padding_mode)
    return CONV[nd](xp, w * mask, b, stride, 0, dilation, groups)


# ---------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("key", list(CASES))
@pytest.mark.parametrize("density", DENSITIES)
def test_forward_and_backward_match_the_dense_conv_of_the_masked_weight(key, density, path):
    """Both paths: the tile-skipping forward kernel (CUDA, or the interpreter) and the plain-torch path."""
    x, w, mask, b, geom = _case(key, density=density)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = cf.masked_conv(x, w, mask, b, **geom)
    want = _oracle(x, w, mask, b, **geom)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), gy)
    exp = torch.autograd.grad(want, (x, w, b), gy)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert (got[1][~mask] == 0).all()  # exactly zero where masked


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_layouts(dtype):
    x, w, mask, b, geom = _case("2d_P1_G2", dtype)
    want = _oracle(x.double(), w.double(), mask, b.double(), **geom)
    rtol, atol = TOL[dtype]
    y = cf.masked_conv(x, w, mask, b, **geom)
    torch.testing.assert_close(y.double(), want, rtol=rtol * 10, atol=atol * 10 * want.abs().max().item())
    y_cl = cf.masked_conv(x.to(memory_format=torch.channels_last), w, mask, b, **geom)
    torch.testing.assert_close(y_cl, y)


def test_float_mask_none_mask_and_unbatched_input():
    x, w, mask, b, geom = _case("2d_P1_G2")
    y = cf.masked_conv(x, w, mask, b, **geom)
    torch.testing.assert_close(cf.masked_conv(x, w, mask.double(), b, **geom), y)
    torch.testing.assert_close(cf.masked_conv(x, w, None, b, **geom), _oracle(x, w, 1, b, **geom))
    torch.testing.assert_close(cf.masked_conv(x[0], w, mask, b, **geom), y[0])


def test_a_masked_nan_never_contributes():
    """The mask drops an entry entirely (a NaN or Inf there included), as the kernels never read an empty tile."""
    x, w, mask, b, geom = _case("2d_P1_G2")
    w = w.clone()
    w[~mask] = float("nan")
    x, w = x.requires_grad_(), w.requires_grad_()
    y = cf.masked_conv(x, w, mask, b, **geom)
    assert torch.isfinite(y).all()
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert torch.isfinite(gx).all() and (gw[~mask] == 0).all()


class _STE(torch.autograd.Function):
    """A straight-through estimator: a 0/1 mask from scores, the gradient passed through unchanged."""

    @staticmethod
    def forward(scores):
        return (scores > 0).to(scores.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g

    @staticmethod
    def jvp(ctx, t):
        return t


@pytest.mark.parametrize("key", ["2d_P1_G2", "1d_D2_G2_lohi_reflect", "3d_S2_P1_G2"])
def test_a_float_mask_that_requires_grad_gets_the_gradient_of_the_masked_product(key, path):
    """dL/dmask = dL/dW_eff ⊙ W (dense dL/dW_eff, also where the mask is 0), as autograd of F.convNd(x, w·mask):
    a straight-through mask trains its scores; the weight's gradient stays exactly zero where masked."""
    x, w, _, b, geom = _case(key)
    scores = torch.randn(w.shape, dtype=w.dtype)
    args = [t.to(path).requires_grad_() for t in (x, w, b, scores)]
    x, w, b, scores = args
    y = cf.masked_conv(x, w, _STE.apply(scores), b, **geom)
    mask = _STE.apply(scores)
    want = _oracle(x, w, mask, b, **geom)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, args, gy)
    exp = torch.autograd.grad(want, args, gy)
    for name, a, e in zip(["x", "w", "b", "scores"], got, exp):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)
    keep = mask.detach() != 0
    assert (got[1][~keep] == 0).all() and got[3][~keep].abs().sum() > 0  # pruned entries learn to come back


def test_a_float_mask_that_requires_grad_under_transforms_and_double_backward():
    x, w, mask, b, geom = _case("2d_P1_G2")
    m = mask.double().requires_grad_()
    args = (x.requires_grad_(), w.requires_grad_(), m)

    def f(x, w, m):
        return cf.masked_conv(x, w, m, b, **geom)

    def oracle(x, w, m):
        return _oracle(x, w, m, b, **geom)

    # second order (gradgradcheck cannot perturb a 0/1 mask): the Hessian-vector products of the oracle's
    gy = torch.randn_like(f(*args))
    got = torch.autograd.grad(f(*args), args, gy, create_graph=True)
    exp = torch.autograd.grad(oracle(*args), args, gy, create_graph=True)
    vs = [torch.randn_like(t) for t in args]
    hv = torch.autograd.grad(got, args, vs)
    hv_want = torch.autograd.grad(exp, args, vs)
    for a, e in zip((*got, *hv), (*exp, *hv_want)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    g_m = grad(lambda m: f(x, w, m).square().sum())(m)
    torch.testing.assert_close(g_m, grad(lambda m: oracle(x, w, m).square().sum())(m))
    mt = torch.randn_like(m)
    torch.testing.assert_close(jvp(lambda m: f(x, w, m), (m,), (mt,))[1], jvp(lambda m: oracle(x, w, m), (m,),
                                                                               (mt,))[1])
    w_nan = w.detach().clone()
    w_nan[~mask] = float("nan")  # a masked NaN stays invisible, its mask gradient 0
    y = f(x, w_nan.requires_grad_(), m)
    assert torch.isfinite(y).all()
    gw, gm = torch.autograd.grad(y.sum(), (w_nan, m))
    assert (gw[~mask] == 0).all() and torch.isfinite(gm).all()


# ---------------------------------------------------------------------------------------------- the ops
def test_opcheck():
    x, w, mask, b, _ = _case("2d_P1_G2", torch.float32)
    geom = ([1, 1], [1, 1, 0, 1], [1, 1], 2, "reflect")
    torch.library.opcheck(torch.ops.convzoo.masked_conv, (x, w, mask, b, *geom))
    torch.library.opcheck(torch.ops.convzoo.masked_conv, (x.requires_grad_(), w.requires_grad_(), mask, None, *geom))
    y = torch.ops.convzoo.masked_conv(x.detach(), w.detach(), mask, b, *geom)
    gy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.convzoo.masked_conv_grad_input, (gy, w.detach(), mask, [6, 7], *geom))
    torch.library.opcheck(torch.ops.convzoo.masked_conv_grad_weight, (gy, x.detach(), mask, list(w.shape), *geom))


@pytest.mark.slow
def test_gradcheck_and_gradgradcheck():
    x, w, mask, b, geom = _case("1d_D2_G2_lohi_reflect")
    args = tuple(t.requires_grad_() for t in (x, w, b))

    def f(x, w, b):
        return cf.masked_conv(x, w, mask, b, **geom)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_torch_func_transforms():
    x, w, mask, b, geom = _case("2d_same_circular")

    def loss(w, x):
        return cf.masked_conv(x, w, mask, b, **geom).square().sum()

    def oracle_loss(w, x):
        return _oracle(x, w, mask, b, **geom).square().sum()

    torch.testing.assert_close(grad(loss)(w, x), grad(oracle_loss)(w, x))
    wt = torch.randn_like(w)
    torch.testing.assert_close(jvp(lambda v: cf.masked_conv(x, v, mask, b, **geom), (w,), (wt,))[1],
                               _oracle(x, wt, mask, None, **geom))
    xs = torch.randn(3, *x.shape, dtype=x.dtype)
    torch.testing.assert_close(vmap(lambda v: cf.masked_conv(v, w, mask, b, **geom))(xs),
                               torch.stack([_oracle(v, w, mask, b, **geom) for v in xs]))
    per_batch = vmap(grad(loss), in_dims=(None, 0))(w, xs)  # one weight gradient per stacked batch
    torch.testing.assert_close(per_batch, torch.stack([grad(oracle_loss)(w, v) for v in xs]))
    assert (per_batch[:, ~mask] == 0).all()


@torch.fx.experimental._config.patch(use_duck_shape=False)
@torch._dynamo.config.patch(error_on_recompile=True)
def test_compiled_training_step_of_masked_layers():
    """A small CNN of MaskedConv2d layers: forward, loss, backward under torch.compile(fullgraph=True, dynamic=True),
    the same gradients as eager, one graph for two batch sizes, masked gradients exactly zero."""
    torch.manual_seed(0)
    model = nn.Sequential(convzoo.MaskedConv2d(3, 8, 3, padding=1), nn.ReLU(),
                          convzoo.MaskedConv2d(8, 4, 3, stride=2, groups=2, padding_mode="reflect", padding=1))
    for layer in (model[0], model[2]):
        layer.set_mask(torch.rand(layer.weight.shape) < 0.5)
    params = list(model.parameters())

    def step(x):
        return torch.autograd.grad(model(x).square().mean(), params)

    def masked_zero(got):
        assert (got[0][~model[0].mask] == 0).all()

    assert_compiled_step_matches_eager(step, [torch.randn(n, 3, 6, 7) for n in (2, 3)], masked_zero)


# ---------------------------------------------------------------------------------------------- the layers
@pytest.mark.parametrize("cls, dense, shape", [(convzoo.MaskedConv1d, nn.Conv1d, (2, 4, 9)),
                                               (convzoo.MaskedConv2d, nn.Conv2d, (2, 4, 6, 5)),
                                               (convzoo.MaskedConv3d, nn.Conv3d, (1, 4, 4, 5, 3))])
def test_layers_load_dense_checkpoints_and_convert(cls, dense, shape):
    conv = dense(4, 6, 3, padding=1, groups=2, padding_mode="circular")
    masked = cls(4, 6, 3, padding=1, groups=2, padding_mode="circular")
    result = masked.load_state_dict(conv.state_dict(), strict=False)  # a dense checkpoint: the mask is kept
    assert result.missing_keys == ["mask"]
    assert masked.mask.dtype == torch.bool and masked.mask.all()
    x = torch.randn(shape)
    torch.testing.assert_close(masked(x), conv(x))
    mask = torch.rand(masked.weight.shape) < 0.3
    converted = cls.from_dense(conv, mask)
    assert sorted(converted.state_dict()) == ["bias", "mask", "weight"]
    torch.testing.assert_close(converted(x), _dense_with(conv, mask)(x))
    back = converted.to_dense()
    assert type(back) is dense
    torch.testing.assert_close(back(x), converted(x))
    again = cls(4, 6, 3, padding=1, groups=2, padding_mode="circular")
    again.load_state_dict(converted.state_dict())
    assert torch.equal(again.mask, mask)


@pytest.mark.parametrize("source", [convzoo.MaskedConv2d, convzoo.DynamicSparseConv2d])
def test_from_dense_of_a_masked_layer_takes_the_mask_argument(source):
    # a masked conv is an nn.Conv2d too: its state_dict's mask must not override from_dense's (default all ones)
    torch.manual_seed(0)
    src = source(4, 6, 3, padding=1, density=0.5)
    x = torch.randn(2, 4, 5, 5)
    assert convzoo.MaskedConv2d.from_dense(src).mask.all()
    mask = torch.rand(src.weight.shape) < 0.4
    converted = convzoo.MaskedConv2d.from_dense(src, mask)
    assert torch.equal(converted.mask, mask)
    torch.testing.assert_close(converted(x), F.conv2d(x, src.weight * src.mask * mask, src.bias, padding=1))


@pytest.mark.parametrize("density, block", [(0.3, None), (1.0, None), (0.25, (16, 16))])
def test_reset_parameters_redraws_the_mask_after_meta_construction(density, block):
    """Built on 'meta', materialised by to_empty (uninitialised memory), then reset_parameters: the mask is drawn
    again with the construction's rule (exact count per output channel, or whole tiles), not left as garbage."""
    torch.manual_seed(0)
    want = convzoo.MaskedConv2d(64, 64, 3, density=density, block=block)
    with torch.device("meta"):
        layer = convzoo.MaskedConv2d(64, 64, 3, density=density, block=block)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.mask.fill_(True).view(-1)[::7] = False  # what uninitialised memory may hold
    layer.reset_parameters()
    assert layer.mask.dtype == torch.bool and layer.mask.device.type == "cpu"
    assert layer.mask.sum() == want.mask.sum()
    if block is None:
        assert torch.equal(layer.mask.flatten(1).sum(1), want.mask.flatten(1).sum(1))
    if density == 1.0:
        assert layer.mask.all()
    if block:  # whole 16 × 16 tiles of the tap-major matrix, as the construction's
        assert torch.equal(convzoo.sparsity.block_mask(layer.mask, block), layer.mask)


def _dense_with(conv, mask):
    out = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.bias is not None, conv.padding_mode)
    out.load_state_dict(conv.state_dict())
    with torch.no_grad():
        out.weight.mul_(mask)
    return out


def test_set_mask_validates_and_keeps_the_buffer():
    layer = convzoo.MaskedConv2d(2, 3, 3)
    buf = layer.mask
    layer.set_mask(torch.zeros(3, 2, 3, 3))
    assert layer.mask is buf and not buf.any()
    with pytest.raises(ValueError, match="shape"):
        layer.set_mask(torch.ones(3, 2, 3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        layer.set_mask(torch.full((3, 2, 3, 3), 0.5))
    with pytest.raises(TypeError, match="conv must be an Conv2d"):
        convzoo.MaskedConv2d.from_dense(nn.Conv1d(2, 3, 3))
    with pytest.raises(ValueError, match="density"):
        convzoo.MaskedConv2d(2, 3, 3, density=1.5)


def test_load_state_dict_checks_the_mask_as_set_mask_does():
    """A float mask of 0.5s is no keep/drop mask: set_mask refuses it and so does load_state_dict (copy_ into
    the bool buffer would read every 0.5 as True); a float 0/1 mask loads as its bool version."""
    torch.manual_seed(0)
    layer = convzoo.MaskedConv2d(2, 3, 3, density=0.5)
    before = layer.mask.clone()
    with pytest.raises(ValueError, match=r"state_dict\['mask'\] must hold only 0 and 1"):
        layer.load_state_dict({**layer.state_dict(), "mask": torch.full((3, 2, 3, 3), 0.5)})
    with pytest.raises(TypeError, match=r"state_dict\['mask'\] must be bool or floating"):
        layer.load_state_dict({**layer.state_dict(), "mask": torch.ones(3, 2, 3, 3, dtype=torch.int64)})
    assert torch.equal(layer.mask, before)
    layer.load_state_dict({**layer.state_dict(), "mask": (~before).double()})
    assert layer.mask.dtype == torch.bool and torch.equal(layer.mask, ~before)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, exc, match", [
    (lambda a: {**a, "mask": torch.ones(6, 2, 3, 2, dtype=torch.bool)}, ValueError, "mask must have the weight"),
    (lambda a: {**a, "mask": torch.ones(6, 2, 3, 3, dtype=torch.int64)}, TypeError, "mask must be bool"),
    (lambda a: {**a, "mask": torch.full((6, 2, 3, 3), 2.0, dtype=torch.float64)}, ValueError, "only 0 and 1"),
    (lambda a: {**a, "mask": [[1]]}, TypeError, "mask must be a tensor"),
    (lambda a: {**a, "groups": 4}, ValueError, "groups"),
    (lambda a: {**a, "groups": 3}, ValueError, "groups"),
    (lambda a: {**a, "groups": True}, ValueError, "groups"),
    (lambda a: {**a, "x": torch.randn(2, 5, 6, 7, dtype=torch.float64)}, ValueError, "C_in"),
    (lambda a: {**a, "b": torch.randn(5, dtype=torch.float64)}, ValueError, "bias"),
    (lambda a: {**a, "b": torch.randn(6)}, TypeError, "bias"),
    (lambda a: {**a, "x": a["x"].float()}, TypeError, "dtype"),
    (lambda a: {**a, "w": torch.randn(6, 2)}, ValueError, "weight"),
    (lambda a: {**a, "x": torch.randn(2, 4, dtype=torch.float64)}, ValueError, "spatial dims"),
    (lambda a: {**a, "stride": 2, "padding": "same"}, ValueError, "same"),
    (lambda a: {**a, "padding_mode": "wrap"}, ValueError, "padding_mode"),
])
def test_bad_input_names_the_argument(change, exc, match):
    x, w, mask, b, _ = _case("2d_P1_G2")
    a = change({"x": x, "w": w, "mask": mask, "b": b, "groups": 2, "stride": 1, "padding": 1,
                "padding_mode": "zeros"})
    with pytest.raises(exc, match=match):
        cf.masked_conv(a["x"], a["w"], a["mask"], a["b"], a["stride"], a["padding"], 1, a["groups"],
                       padding_mode=a["padding_mode"])


def test_initial_masks_keep_exactly_the_density():
    """density: exactly round(density·numel) entries kept per output channel; with block, whole tiles of the
    per-group [C_out/G, C_in/G·∏K] matrix, round(density·tiles) of them."""
    torch.manual_seed(0)
    layer = convzoo.MaskedConv2d(8, 6, 3, density=0.3, groups=2)
    assert (layer.mask.flatten(1).sum(1) == round(0.3 * 4 * 9)).all()
    assert convzoo.MaskedConv2d(8, 6, 3).mask.all()
    blocked = convzoo.MaskedConv2d(32, 64, 3, density=0.25, block=(16, 32))
    tiles = convzoo.sparsity.tile_lists(blocked.mask, 1, (16, 32))
    assert tiles.occupancy.sum().item() == round(0.25 * tiles.occupancy.numel())
    # whole tiles: the mask (as W_g, tap-major columns) is its occupancy map expanded back
    occ = tiles.occupancy[0].repeat_interleave(16, 0).repeat_interleave(32, 1)[:64, :32 * 9]
    assert torch.equal(blocked.mask.movedim(1, -1).flatten(1), occ)


# id: (input shape, weight shape, padding); every one has an empty operand but a well-defined result
EMPTY_CASES = {
    "Cin0": ((2, 0, 5, 5), (3, 0, 3, 3), 1),  # K = 0: y = bias
    "Cout0": ((2, 4, 5, 5), (0, 4, 3, 3), 1),  # no output channel: dx = 0
    "H0_padded": ((2, 4, 0, 5), (3, 4, 1, 3), (1, 1)),  # the output reads only padding: y = bias, dW = 0
    "Cin0_unbatched": ((0, 5, 5), (3, 0, 3, 3), 0),
}


@pytest.mark.parametrize("key", list(EMPTY_CASES))
def test_empty_operands_give_the_shapes_and_values_of_the_math_on_both_paths(key, path):
    """A convolution with an empty reduction (C_in = 0, or an input that is all padding) is the bias; one
    without outputs has a zero input gradient. F.convNd returns ``[N, 0, ...]`` for C_in = 0 and refuses the
    other two: the plain-torch path must not follow it (the kernel path and the fake give ``[N, C_out, *out]``)."""
    xs, ws, padding = EMPTY_CASES[key]
    x = torch.randn(xs, dtype=torch.float64, device=path, requires_grad=True)
    w = torch.randn(ws, dtype=torch.float64, device=path, requires_grad=True)
    b = torch.randn(ws[0], dtype=torch.float64, device=path, requires_grad=True)
    mask = torch.rand(ws, device=path) < 0.5
    y = cf.masked_conv(x, w, mask, b, padding=padding)
    pad = (padding,) * 2 if isinstance(padding, int) else padding
    out = [n + 2 * p - k + 1 for n, p, k in zip(xs[-2:], pad, ws[2:])]
    assert y.shape == (*xs[:-3], ws[0], *out)
    torch.testing.assert_close(y, b[:, None, None].expand(y.shape), rtol=0, atol=0)
    meta = cf.masked_conv(x.detach().to("meta"), w.detach().to("meta"), mask.to("meta"), b.detach().to("meta"),
                          padding=padding)
    assert meta.shape == y.shape
    gy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    assert gx.shape == x.shape and gw.shape == w.shape and not gx.any() and not gw.any()
    torch.testing.assert_close(gb, gy.sum([d for d in range(gy.dim()) if d != gy.dim() - 3]))
    assert cf.masked_conv(x, w, mask, None, padding=padding).count_nonzero() == 0


@pytest.mark.parametrize("arg", ["weight", "mask", "bias"])
def test_an_operand_on_another_device_is_refused(arg, path):
    """One meta operand beside real ones makes the dispatcher pick the op's Meta kernel, the fake: it must refuse
    (it returned ``x.new_empty``, an uninitialised real tensor: garbage presented as a result)."""
    x, w, mask, b, geom = _case("2d_P1_G2", torch.float32)
    args = {"input": x.to(path), "weight": w.to(path), "mask": mask.to(path), "bias": b.to(path)}
    args[arg] = args[arg].to("meta")
    with pytest.raises(ValueError, match=f"{arg} is on meta but input is on"):
        cf.masked_conv(**args, **geom)


def test_a_backward_op_operand_on_another_device_is_refused(path):
    """The same for the two backward ops called directly: their fakes returned ``grad.new_empty``."""
    grad = torch.randn(2, 6, 3, 3, device=path)
    geom = ([1, 1], [0, 0, 0, 0], [1, 1], 1, "zeros")
    with pytest.raises(ValueError, match="weight is on meta but grad is on"):
        torch.ops.convzoo.masked_conv_grad_input(grad, torch.randn(6, 4, 3, 3, device="meta"), None, [5, 5], *geom)
    with pytest.raises(ValueError, match="input is on meta but grad is on"):
        torch.ops.convzoo.masked_conv_grad_weight(grad, torch.randn(2, 4, 5, 5, device="meta"), None, [6, 4, 3, 3],
                                                  *geom)


def test_meta_empty_autocast_and_weight_layouts(path):
    """Meta tensors give the shape; an empty batch gives an empty result; autocast computes in its dtype as
    F.conv2d does; a channels-last weight (the layout torch's own conv layers may hold) reads the same."""
    x, w, mask, b, geom = _case("2d_P1_G2", torch.float32)
    meta = cf.masked_conv(x.to("meta"), w.to("meta"), mask.to("meta"), b.to("meta"), **geom)
    assert meta.is_meta and meta.shape == (2, 6, 6, 7)
    empty = cf.masked_conv(x[:0], w, mask, b, **geom)
    assert empty.shape == (0, 6, 6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cf.masked_conv(x, w, mask, b, **geom)
        want = _oracle(x, w, mask, b, **geom)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())
    wc = w.to(memory_format=torch.channels_last)
    torch.testing.assert_close(cf.masked_conv(x, wc, mask, b, **geom), cf.masked_conv(x, w, mask, b, **geom))


# ---------------------------------------------------------------------------------------------- tile-list cache
def _counting_tile_lists(monkeypatch):
    """Counts the tile-list builds behind the ops' cache."""
    from convzoo import sparsity

    calls = []
    real = sparsity.tile_lists

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sparsity, "tile_lists", counted)
    return calls


def test_tile_lists_are_cached_per_mask_version(kernel_device, monkeypatch):
    """The layer's lists are built once, reused while the mask is unchanged, and rebuilt after every kind of
    change torch sees (set_mask, an indexed write, load_state_dict, a .data swap); a float mask (a new bool
    tensor per call) is rebuilt each call. After each change the kernel path agrees with the oracle, so a
    newly kept entry in a tile that was empty is never dropped by a stale list."""
    calls = _counting_tile_lists(monkeypatch)
    layer = convzoo.MaskedConv2d(4, 20, 3, padding=1).to(kernel_device)
    x = torch.randn(2, 4, 5, 5, device=kernel_device)
    empty = torch.zeros_like(layer.mask)
    empty[:2] = True  # only the first o-tile is occupied

    def check():
        want = _oracle(x, layer.weight, layer.mask, layer.bias, 1, 1, 1, 1, "zeros")
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)

    layer.set_mask(empty)
    check()
    check()
    assert len(calls) == 1
    with torch.no_grad():
        layer.mask[19, 3, 2, 2] = True  # the second o-tile's first kept entry
    check()
    assert len(calls) == 2
    layer.load_state_dict({**layer.state_dict(), "mask": torch.ones_like(layer.mask)})
    check()
    assert len(calls) == 3
    layer.mask.data = empty.clone()  # a new storage, the same version counter
    check()
    assert len(calls) == 4
    cf.masked_conv(x, layer.weight, layer.mask.float(), layer.bias, padding=1)
    cf.masked_conv(x, layer.weight, layer.mask.float(), layer.bias, padding=1)
    assert len(calls) == 6
    convzoo.ops.masked_conv.clear_tile_cache()
    check()
    assert len(calls) == 7


def test_tile_lists_of_inference_tensors_are_not_cached(kernel_device, monkeypatch):
    """An inference-mode mask has no version counter: its lists are built per call, never cached."""
    calls = _counting_tile_lists(monkeypatch)
    x, w, mask, b, geom = _case("2d_P1_G2", torch.float32)
    with torch.inference_mode():
        mask = mask.clone().to(kernel_device)
        x, w, b = x.to(kernel_device), w.to(kernel_device), b.to(kernel_device)
        for _ in range(2):
            torch.testing.assert_close(cf.masked_conv(x, w, mask, b, **geom), _oracle(x, w, mask, b, **geom),
                                       atol=1e-5, rtol=1e-5)
    assert len(calls) == 2


WRITES_TORCH_DOES_NOT_VERSION = {
    "data_fill": lambda m: m.data.fill_(True),  # .data has a version counter of its own
    "data_index": lambda m: m.data.__setitem__((slice(None), 0), True),
    "storage_fill": lambda m: m.untyped_storage().fill_(1),
    "dlpack": lambda m: torch.from_dlpack(m).fill_(True),
    "numpy": lambda m: m.numpy().fill(True),
}


@pytest.mark.parametrize("write", list(WRITES_TORCH_DOES_NOT_VERSION))
def test_a_mask_write_that_bypasses_the_version_counter_is_never_a_wrong_result(write, kernel_device):
    """Writes through ``.data``, the storage or DLPack/numpy views change the mask without bumping its version:
    the cached lists then omit the newly kept tiles. The ops notice on the device (no host sync) and visit every
    tile until the lists are rebuilt: forward and both gradients still match the oracle (slower, never wrong)."""
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, device=kernel_device, requires_grad=True)
    w = torch.randn(20, 4, 3, 3, dtype=torch.float64, device=kernel_device, requires_grad=True)
    mask = torch.zeros(20, 4, 3, 3, dtype=torch.bool, device=kernel_device)
    mask[:2] = True  # groups 2: group 0's tiles are listed, group 1's are all empty
    cf.masked_conv(x, w, mask, padding=1, groups=2).sum().backward()
    if write == "numpy" and kernel_device != "cpu":
        pytest.skip("numpy views CPU tensors only")
    WRITES_TORCH_DOES_NOT_VERSION[write](mask)
    gy = torch.randn(2, 20, 5, 5, dtype=torch.float64, device=kernel_device)
    got = cf.masked_conv(x, w, mask, padding=1, groups=2)
    want = _oracle(x, w, mask, None, 1, 1, 1, 2, "zeros")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (x, w), gy), torch.autograd.grad(want, (x, w), gy)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
