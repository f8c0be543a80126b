"""``LocalConv1d/2d/3d`` weight storage and hypnettorch interop.

Storage: every parameter is contiguous (flat-parameter tools: ``parameters_to_vector``, ``p.view(-1)``,
safetensors, FSDP), ``weight`` is the logical ``[C_out, C_in·∏K, L]`` view of the position-major
parameter ``weight_by_position`` ``[L, C_out, C_in·∏K]``, and ``load_state_dict`` takes either layout.

hypnettorch: ``LocalConv2d.from_hypnettorch`` against a stand-in for hypnettorch's ``LocalConv2dLayer``
(its constructor, parameter names, init and forward restated from hypnettorch 0.0.x's
``utils/local_conv2d_layer.py``; hypnettorch itself is not a dependency), and the bench's two weight
layouts.
"""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import convzoo
import convzoo.functional as cf
from convzoo.tools.bench import ops as bench_ops


def _unfold_oracle(x, w, b, kernel_size, stride=1, padding=0):
    """hypnettorch's formula in float64: unfold, broadcast multiply, sum over the patch rows, + bias."""
    cols = F.unfold(x.double(), kernel_size, padding=padding, stride=stride)
    y = (cols[:, None] * w.double()).sum(dim=2)
    return y if b is None else y + b.double()


LAYERS = {  # (class, in_size, kwargs)
    "1d": (convzoo.LocalConv1d, (9,), dict(kernel_size=3, stride=2, padding=1)),
    "2d": (convzoo.LocalConv2d, (5, 6), dict(kernel_size=3, padding=1)),
    "3d": (convzoo.LocalConv3d, (3, 4, 4), dict(kernel_size=2, padding=((1, 0), (0, 1), (1, 1)))),
}


def _layer(key, bias=True, **kw):
    cls, size, geom = LAYERS[key]
    return cls(2, 3, size, **geom, bias=bias, **kw)


def _input(m, n=2):
    return torch.randn(n, m.in_channels, *m.in_size)


# ---------------------------------------------------------------------------------------------- storage
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("key", list(LAYERS))
def test_parameters_are_contiguous_and_weight_is_their_logical_view(key, bias):
    m = _layer(key, bias=bias)
    o, r, L = m.param_shapes[0]
    names = [name for name, _ in m.named_parameters()]
    assert names == ["weight_by_position", "bias"][: 1 + bias]
    for name, p in m.named_parameters():
        assert p.is_contiguous(), name
        assert p.view(-1).numel() == p.numel()  # what flat-parameter code does to every parameter
    assert m.weight_by_position.shape == (L, o, r)
    assert m.weight.shape == (o, r, L) == tuple(m.param_shapes[0])
    assert torch.equal(m.weight, m.weight_by_position.permute(1, 2, 0))
    assert m.weight.data_ptr() == m.weight_by_position.data_ptr()  # a view, not a copy
    if bias:
        assert m.bias.shape == (o, L) == tuple(m.param_shapes[1])
    else:
        assert m.bias is None


def test_gradient_lands_on_the_position_major_parameter():
    """``weight`` is a view: its gradient accumulates on ``weight_by_position``, contiguous."""
    m = _layer("2d")
    x = _input(m)
    gy = torch.randn(2, 3, *m.out_size)
    m(x).backward(gy)
    w = m.weight.detach().double().requires_grad_()
    b = m.bias.detach().double().requires_grad_()
    y_ref = _unfold_oracle(x, w, b, 3, padding=1).view(2, 3, *m.out_size)
    dw_ref, db_ref = torch.autograd.grad(y_ref, (w, b), gy.double())
    assert m.weight_by_position.grad.is_contiguous() and m.bias.grad.is_contiguous()
    torch.testing.assert_close(m.weight_by_position.grad.double(), dw_ref.permute(2, 0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.bias.grad.double(), db_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", list(LAYERS))
def test_parameters_to_vector_round_trip(key):
    """A hypernetwork writes one flat vector into the layer: the layer then computes with the weight
    ``vec[:W].view(L, C_out, R)`` (position-major) and the bias ``vec[W:].view(C_out, L)``."""
    m = _layer(key)
    o, r, L = m.param_shapes[0]
    vec = parameters_to_vector(m.parameters())
    assert vec.numel() == o * r * L + o * L
    torch.testing.assert_close(vec[: o * r * L].view(L, o, r).permute(1, 2, 0), m.weight, atol=0, rtol=0)
    new = torch.randn_like(vec)
    vector_to_parameters(new, m.parameters())
    w = new[: o * r * L].view(L, o, r).permute(1, 2, 0)
    b = new[o * r * L:].view(o, L)
    assert torch.equal(m.weight, w) and torch.equal(m.bias, b)
    x = _input(m)
    ref = cf.local_conv(x, w.contiguous(), b, kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                        dilation=m.dilation, padding_mode=m.padding_mode)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parameters_to_vector(m.parameters()), new, atol=0, rtol=0)


def _assert_safetensors_ready(sd):
    """What ``safetensors.torch.save_file`` demands: contiguous tensors that share no memory."""
    for k, t in sd.items():
        assert t.is_contiguous(), k
    ptrs = [t.untyped_storage().data_ptr() for t in sd.values()]
    assert len(set(ptrs)) == len(ptrs)


def test_state_dict_is_flat_and_round_trips_through_torch_save():
    m = nn.Sequential(_layer("2d"))
    sd = m.state_dict()
    assert list(sd) == ["0.weight_by_position", "0.bias"]
    _assert_safetensors_ready(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    m2 = nn.Sequential(_layer("2d"))
    m2.load_state_dict(torch.load(buf, weights_only=True))
    x = _input(m[0])
    torch.testing.assert_close(m2(x), m(x), atol=0, rtol=0)


def test_safetensors_round_trip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    m = _layer("2d")
    safetensors_torch.save_file(m.state_dict(), tmp_path / "m.safetensors")
    m2 = _layer("2d")
    m2.load_state_dict(safetensors_torch.load_file(tmp_path / "m.safetensors"))
    x = _input(m)
    torch.testing.assert_close(m2(x), m(x), atol=0, rtol=0)


def _logical_state_dict(m, kind):
    """``weight``/``bias`` keys in the logical shapes: as the pre-``weight_by_position`` layer saved them
    (``[C_out, R, L]`` views of ``[L, C_out, R]`` / ``[L, C_out]`` storage), or contiguous, as a user
    or hypnettorch builds them."""
    o, r, L = m.param_shapes[0]
    w = torch.randn(o, r, L) / math.sqrt(r)
    b = torch.randn(o, L)
    if kind == "old_checkpoint":
        w = w.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        b = b.t().contiguous().t()
    return {"weight": w, "bias": b}


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
@pytest.mark.parametrize("kind", ["old_checkpoint", "logical_contiguous"])
def test_loads_a_logical_layout_state_dict(kind, assign):
    net = nn.Sequential(nn.Identity(), _layer("2d"))  # a prefix ("1.") on the keys
    m = net[1]
    sd = _logical_state_dict(m, kind)
    net.load_state_dict({f"1.{k}": v for k, v in sd.items()}, assign=assign)
    for name, p in m.named_parameters():
        assert p.is_contiguous(), name
    assert isinstance(m.weight_by_position, nn.Parameter) and m.weight_by_position.requires_grad
    assert torch.equal(m.weight, sd["weight"]) and torch.equal(m.bias, sd["bias"])
    x = _input(m)
    ref = _unfold_oracle(x, sd["weight"], sd["bias"], 3, padding=1).view(2, 3, *m.out_size)
    torch.testing.assert_close(m(x).double(), ref, atol=1e-5, rtol=1e-5)
    # and back out in the physical layout
    assert list(m.state_dict()) == ["weight_by_position", "bias"]


@pytest.mark.parametrize("sd, match", [
    (lambda m: {"weight": torch.zeros(3, 18, 30), "weight_by_position": m.weight_by_position.detach(),
                "bias": m.bias.detach()}, "both"),
    (lambda m: {"weight": torch.zeros(3, 18, 29), "bias": m.bias.detach()}, r"weight.*\[3, 18, 30\]"),
], ids=["both_layouts", "wrong_logical_shape"])
def test_state_dict_load_errors_name_the_key(sd, match):
    m = _layer("2d")
    with pytest.raises(RuntimeError, match=match):
        m.load_state_dict(sd(m))


def test_meta_construction_then_assign_load():
    src = _layer("2d")
    m = _layer("2d", device="meta")
    assert m.weight.is_meta and m.weight.shape == src.weight.shape and m.bias.is_meta
    m.load_state_dict(src.state_dict(), assign=True)
    assert not m.weight_by_position.is_meta and m.weight_by_position.is_contiguous()
    x = _input(src)
    torch.testing.assert_close(m(x), src(x), atol=0, rtol=0)
    # the same from a logical-layout checkpoint
    m2 = _layer("2d", device="meta")
    m2.load_state_dict({"weight": src.weight.detach().contiguous(), "bias": src.bias.detach()}, assign=True)
    assert m2.weight_by_position.is_contiguous()
    torch.testing.assert_close(m2(x), src(x), atol=0, rtol=0)
    # to_empty + reset_parameters: a fresh, nn.Conv2d-scaled init on the new device
    m3 = _layer("2d", device="meta").to_empty(device="cpu")
    m3.reset_parameters()
    bound = 1 / math.sqrt(m3.param_shapes[0][1])
    assert m3.weight_by_position.is_contiguous() and m3.weight.abs().max() <= bound


def test_to_dtype_keeps_the_layout():
    m = _layer("2d").to(torch.float64)
    assert m.weight.dtype == torch.float64 and m.weight_by_position.is_contiguous() and m.bias.is_contiguous()
    x = _input(m).double()
    ref = _unfold_oracle(x, m.weight, m.bias, 3, padding=1).view(2, 3, *m.out_size)
    torch.testing.assert_close(m(x), ref, atol=1e-12, rtol=1e-12)


@pytest.mark.gpu
def test_cuda_keeps_the_layout():
    m = _layer("2d").cuda()
    assert m.weight.is_cuda and m.weight_by_position.is_contiguous()
    x = _input(m).cuda()
    torch.testing.assert_close(m(x).cpu(), m.cpu()(x.cpu()), atol=1e-4, rtol=1e-4)


def test_no_weights_holds_nothing():
    m = _layer("2d", no_weights=True)
    assert list(m.parameters()) == [] and m.state_dict() == {} and m.weight is None and m.bias is None
    assert m.param_shapes == [[3, 18, 30], [3, 30]]
    m.load_state_dict({})  # nothing to load, nothing expected


# ---------------------------------------------------------------------------------------------- hypnettorch
class FakeHypnettorchLocalConv2dLayer(nn.Module):
    """hypnettorch's ``LocalConv2dLayer`` restated: constructor order, private attributes, the
    ``filters``/``bias`` parameters (also listed in ``_weights``), ``init_params`` and ``forward``."""

    def __init__(self, in_channels, out_channels, in_height, in_width, kernel_size, stride=1, padding=0, bias=True,
                 no_weights=False):
        super().__init__()
        pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
        kernel_size, stride, padding = pair(kernel_size), pair(stride), pair(padding)
        self._in_channels, self._out_channels = in_channels, out_channels
        self._in_height, self._in_width = in_height, in_width
        self._kernel_size, self._stride, self._padding = kernel_size, stride, padding
        self._has_bias, self._no_weights = bias, no_weights
        self._out_height = (in_height - kernel_size[0] + 2 * padding[0]) // stride[0] + 1
        self._out_width = (in_width - kernel_size[1] + 2 * padding[1]) // stride[1] + 1
        self._rf_size = in_channels * kernel_size[0] * kernel_size[1]
        self._num_pix = self._out_height * self._out_width
        self._weights = None
        self._param_shapes = [[out_channels, self._rf_size, self._num_pix]]
        if bias:
            self._param_shapes.append([out_channels, self._num_pix])
        if not no_weights:
            self._weights = nn.ParameterList()
            self.register_parameter("filters", nn.Parameter(torch.empty(*self._param_shapes[0])))
            self._weights.append(self.filters)
            if bias:
                self.register_parameter("bias", nn.Parameter(torch.empty(*self._param_shapes[1])))
                self._weights.append(self.bias)
            else:
                self.register_parameter("bias", None)
            # hypnettorch.utils.torch_utils.init_params
            nn.init.kaiming_uniform_(self.filters, a=math.sqrt(5))
            if bias:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.filters)
                nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    @property
    def param_shapes(self):
        return self._param_shapes

    def forward(self, x, weights=None):
        if weights is None:
            filters, bias = self.filters, self.bias
        else:
            filters, bias = weights[0], (weights[1] if self._has_bias else None)
        f_hat = F.unfold(x, self._kernel_size, padding=self._padding, stride=self._stride)
        f_hat = f_hat.view(-1, 1, self._rf_size, self._num_pix)
        g = (f_hat * filters).sum(dim=2)
        if bias is not None:
            g = g + bias
        return g.view(-1, self._out_channels, self._out_height, self._out_width)


@pytest.mark.parametrize("args, kwargs", [
    ((3, 4, 7, 6, 3), dict(stride=2, padding=1)),
    ((2, 5, 6, 6, (3, 2)), dict(stride=(1, 2), padding=(1, 0), bias=False)),
], ids=["square_bias", "rect_no_bias"])
def test_from_hypnettorch_matches_its_forward_and_gradients(args, kwargs):
    peer = FakeHypnettorchLocalConv2dLayer(*args, **kwargs)
    m = convzoo.LocalConv2d.from_hypnettorch(peer)
    assert m.param_shapes == peer.param_shapes
    assert (m.in_channels, m.out_channels, *m.in_size) == args[:4]
    assert torch.equal(m.weight, peer.filters) and m.weight_by_position.is_contiguous()
    assert (m.bias is None) == (peer.bias is None) and (m.bias is None or torch.equal(m.bias, peer.bias))
    x = torch.randn(3, args[0], args[2], args[3])
    y, y_ref = m(x), peer(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    torch.testing.assert_close(m.weight_by_position.grad.permute(1, 2, 0), peer.filters.grad, atol=1e-5, rtol=1e-5)
    if peer.bias is not None:
        torch.testing.assert_close(m.bias.grad, peer.bias.grad, atol=1e-5, rtol=1e-5)
    # the copy is independent of the peer
    with torch.no_grad():
        peer.filters.zero_()
    assert m.weight.abs().sum() > 0


def test_from_hypnettorch_no_weights_and_the_forward_mapping():
    """``peer(x, weights=[W, b])`` is ``m(x, weight=W, bias=b)``; a list is refused with that hint."""
    peer = FakeHypnettorchLocalConv2dLayer(2, 3, 5, 5, 3, padding=1, no_weights=True)
    m = convzoo.LocalConv2d.from_hypnettorch(peer)
    assert m.no_weights and list(m.parameters()) == []
    w, b = torch.randn(*peer.param_shapes[0]), torch.randn(*peer.param_shapes[1])  # a hypernetwork's output
    x = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(m(x, weight=w, bias=b), peer(x, weights=[w, b]), atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match=r"weights=\[W, b\]"):
        m(x, [w, b])


def test_hypnettorch_state_dict_mapping_and_init_scale():
    """Its ``filters`` and ``bias`` keys load as ``weight`` and ``bias``; its init bound is
    ``1/√(R·L)`` (torch's fan-in of a ``[C_out, R, L]`` tensor counts L), ours ``1/√R``, like ``nn.Conv2d``."""
    peer = FakeHypnettorchLocalConv2dLayer(2, 3, 6, 6, 3, padding=1)
    sd = peer.state_dict()
    m = convzoo.LocalConv2d(2, 3, (6, 6), 3, padding=1)
    m.load_state_dict({"weight": sd["filters"], "bias": sd["bias"]})
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(m(x), peer(x), atol=1e-5, rtol=1e-5)
    r, L = 18, 36
    assert peer.filters.abs().max() <= 1 / math.sqrt(r * L) < convzoo.LocalConv2d(2, 3, (6, 6), 3).weight.abs().max()


def _edited(**attrs):
    """A stand-in layer edited by hand after construction."""
    layer = FakeHypnettorchLocalConv2dLayer(2, 3, 5, 5, 3)
    for name, value in attrs.items():
        setattr(layer, name, value)
    return layer


@pytest.mark.parametrize("make, exc, match", [
    (lambda: object(), TypeError, "hypnettorch LocalConv2dLayer; object has no _in_channels"),
    (lambda: _edited(filters=nn.Parameter(torch.zeros(3, 18, 10))), ValueError, "filters is"),
    (lambda: _edited(_param_shapes=[[3, 18, 10], [3, 10]]), ValueError, "param_shapes"),
    (lambda: _edited(filters=None), TypeError, "filters must be a tensor"),
], ids=["not_a_layer", "filters_shape", "param_shapes", "filters_none"])
def test_from_hypnettorch_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        convzoo.LocalConv2d.from_hypnettorch(make())


# ---------------------------------------------------------------------------------------------- bench layouts
def test_bench_local_conv_problems_use_the_labelled_weight_layout():
    """The quick set benches one shape with both weight layouts; convzoo and the functional peers get
    the weight as labelled, hypnettorch always its own contiguous ``[C_out, R, L]`` copy."""
    by_name = {p.name: p for p in bench_ops.problems("quick", ["local_conv"])}
    mod, hyp = by_name["2d_c32_wmodule"], by_name["2d_c32_whypnet"]
    for problem, physical in ((mod, (2, 0, 1)), (hyp, (0, 1, 2))):
        x, w, _, a = problem.make("cpu", torch.float32, False)
        assert x.shape == (16, 32, 32, 32) and w.shape == (32, 288, 1024) and w.permute(*physical).is_contiguous()
        assert a["hypnettorch_weight"].is_contiguous() and torch.equal(a["hypnettorch_weight"], w)
    assert mod.flops("fwd") == hyp.flops("fwd") and mod.bytes("fwd", 4) == hyp.bytes("fwd", 4)


@pytest.mark.parametrize("layout", ["module", "hypnettorch"])
def test_bench_local_conv_providers_agree_on_both_layouts(layout):
    """Every provider computes hypnettorch's formula, and its weight gradient reaches the problem's
    weight (the hypnettorch provider reads its copy)."""
    small = bench_ops._local_conv_problem("t", 2, 3, 4, (6, 6), 3, 1, 1, layout=layout)
    x, w, b, a = small.make("cpu", torch.float64, True)
    y_ref = _unfold_oracle(x, w, b, 3, padding=1).view(2, 4, 6, 6)
    gy = torch.randn_like(y_ref)
    refs = torch.autograd.grad(y_ref, (x, w, b), gy)
    for prov in bench_ops.providers()["local_conv"]:
        y = prov.fn(x, w, b, a)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12, msg=prov.name)
        for g, g_ref in zip(torch.autograd.grad(y, (x, w, b), gy), refs):
            torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12, msg=prov.name)
