"""The eager fast path: a call on plain tensors with nothing watching skips the dispatcher and runs the
op's implementation directly; under every mode, transform, tracer or tensor kind that could see or change
the call, it is the custom op ``convzoo::*`` as before. The results are the same either way (exactly)."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import convzoo.functional as cf
import convzoo.kernels.local_conv  # noqa: F401  (decorate the kernels while TRITON_INTERPRET is set)
from convzoo.ops import _autograd

GEOM = ([3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "zeros")


@pytest.fixture(params=["triton", "torch"])
def device(request, monkeypatch, kernel_device):
    """Both implementations: the Triton launcher (CUDA, or the CPU interpreter), the plain-torch one."""
    if request.param == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        return "cpu"
    return kernel_device


class _SeenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class _SeenFunctions(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _unfold(x):
    return cf.unfold(x, 3, padding=1)


def _fold(cols):
    return cf.fold(cols, (4, 5), 3, padding=1)


def _local_conv(x, w, b):
    return cf.local_conv(x, w, b, kernel_size=3, padding=1)


def _inputs(device, requires_grad=False):
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=requires_grad)
    cols = torch.randn(2, 27, 20, device=device, requires_grad=requires_grad)
    w = torch.randn(4, 27, 20, device=device).permute(2, 0, 1).contiguous().permute(1, 2, 0)  # the layer's layout
    b = torch.randn(4, 20, device=device)
    return x, cols, w.requires_grad_(requires_grad), b.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------- taken
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_plain_call_skips_the_dispatcher_with_the_same_result(device, requires_grad, op_calls, function_applies):
    x, cols, w, b = _inputs(device, requires_grad)
    got = [_unfold(x), _fold(cols), _local_conv(x, w, b)]
    assert op_calls == function_applies == []
    assert [t.requires_grad for t in got] == [requires_grad] * 3
    with torch.no_grad():  # the custom ops themselves, through the dispatcher
        want = [torch.ops.convzoo.unfold(x, *GEOM), torch.ops.convzoo.fold(cols, [4, 5], *GEOM),
                torch.ops.convzoo.local_conv(x, w, b, *GEOM)]
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


def test_plain_backward_skips_the_dispatcher_with_the_same_gradients(device, op_calls):
    x, cols, w, b = _inputs(device, True)
    y = _local_conv(x, w, b)
    gy = torch.randn_like(y)
    got = torch.autograd.grad((y * gy).sum() + _unfold(x).sum() + _fold(cols).sum(), (x, cols, w, b))
    assert op_calls == []
    with _SeenOps():  # the same calls, through the dispatcher
        y = _local_conv(x, w, b)
        want = torch.autograd.grad((y * gy).sum() + _unfold(x).sum() + _fold(cols).sum(), (x, cols, w, b))
    assert op_calls
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


def test_parameter_is_plain(op_calls, function_applies):
    w = torch.nn.Parameter(torch.randn(4, 27, 20))  # contiguous: copied to the kernels' layout by a Function
    with torch.no_grad():
        _local_conv(torch.randn(2, 3, 4, 5), w, None)
    _local_conv(torch.randn(2, 3, 4, 5), w, None).sum().backward()
    assert op_calls == function_applies == []
    assert w.grad is not None


# ---------------------------------------------------------------------------------------------- not taken
def _all_ops(x, cols, w, b):
    return [_unfold(x), _fold(cols), _local_conv(x, w, b)]


def _plain_results(x, cols, w, b):
    plain = [t.detach().clone() for t in (x, cols, w, b)]
    with torch.no_grad():
        return _all_ops(*plain)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_dispatch_mode_sees_every_op(device, requires_grad, function_applies):
    inputs = _inputs(device, requires_grad)
    with _SeenOps() as mode:
        got = _all_ops(*inputs)
    assert {"convzoo.unfold", "convzoo.fold", "convzoo.local_conv"} <= set(mode.seen)
    assert function_applies == (["_unfold_function", "_fold_function", "_local_conv_function"] if requires_grad
                                else [])
    for g, e in zip(got, _plain_results(*inputs)):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_torch_function_mode_sees_every_op(requires_grad, op_calls):
    inputs = _inputs("cpu", requires_grad)
    with _SeenFunctions() as mode:
        got = _all_ops(*inputs)
    assert {"convzoo.unfold.default", "convzoo.fold.default", "convzoo.local_conv.default"} <= set(mode.seen)
    assert op_calls == ["unfold", "fold", "local_conv"]
    for g, e in zip(got, _plain_results(*inputs)):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_subclass_goes_through_the_op(requires_grad, op_calls):
    x, cols, w, b = _inputs("cpu", requires_grad)
    got = _all_ops(x.as_subclass(_Subclass), cols.as_subclass(_Subclass), w, b.as_subclass(_Subclass))
    assert op_calls == ["unfold", "fold", "local_conv"]
    for g, e in zip(got, _plain_results(x, cols, w, b)):
        torch.testing.assert_close(g.as_subclass(torch.Tensor), e, atol=0, rtol=0)


def test_meta_tensor_goes_through_the_op(op_calls):
    x, cols, w, b = (t.to("meta") for t in _inputs("cpu"))
    assert [tuple(t.shape) for t in _all_ops(x, cols, w, b)] == [(2, 27, 20), (2, 3, 4, 5), (2, 4, 4, 5)]
    assert op_calls == ["unfold", "fold", "local_conv"]


def test_fake_tensor_mode_goes_through_the_op(op_calls):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        inputs = [mode.from_tensor(t) for t in _inputs("cpu")]
        assert [tuple(t.shape) for t in _all_ops(*inputs)] == [(2, 27, 20), (2, 3, 4, 5), (2, 4, 4, 5)]
    assert op_calls == ["unfold", "fold", "local_conv"]


def test_python_dispatcher_goes_through_the_op(op_calls):
    from torch._dispatch.python import enable_python_dispatcher

    inputs = _inputs("cpu")
    with enable_python_dispatcher():
        got = _all_ops(*inputs)
    assert op_calls == ["unfold", "fold", "local_conv"]
    for g, e in zip(got, _plain_results(*inputs)):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


def test_profiler_records_the_op():
    x = torch.randn(1, 1, 4, 4)
    with torch.profiler.profile() as prof:
        cf.unfold(x, 3)
    assert "convzoo::unfold" in {e.key for e in prof.key_averages()}


def test_negative_view_goes_through_the_op(device, op_calls):
    """The dispatcher materialises a negative view before a kernel reads memory (a Triton kernel would read
    the un-negated values)."""
    x = torch.randn(2, 3, 4, 5, device=device)
    got = _unfold(torch._neg_view(x))
    assert op_calls == ["unfold"]
    torch.testing.assert_close(got, _unfold(-x), atol=0, rtol=0)


def test_vmap_goes_through_the_op(op_calls):
    x = torch.randn(3, 2, 3, 4, 5)
    got = torch.func.vmap(_unfold)(x)
    assert "unfold" in op_calls
    torch.testing.assert_close(got, _unfold(x.flatten(0, 1)).unflatten(0, (3, 2)), atol=0, rtol=0)


def test_grad_transform_gets_the_gradient():
    x, _, w, b = _inputs("cpu")
    got = torch.func.grad(lambda x: _local_conv(x, w, b).square().sum())(x)
    xr = x.clone().requires_grad_()
    with _SeenOps():
        want, = torch.autograd.grad(_local_conv(xr, w, b).square().sum(), xr)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_forward_ad_tangent_goes_through_the_op(op_calls):
    x, cols, _, _ = _inputs("cpu")
    tx, tc = torch.randn_like(x), torch.randn_like(cols)
    with fwAD.dual_level():
        y = fwAD.unpack_dual(_unfold(fwAD.make_dual(x, tx)))
        z = fwAD.unpack_dual(_fold(fwAD.make_dual(cols, tc)))
    assert op_calls
    torch.testing.assert_close(y.primal, _unfold(x), atol=0, rtol=0)
    torch.testing.assert_close(y.tangent, _unfold(tx), atol=0, rtol=0)  # both linear: the tangent is the op's
    torch.testing.assert_close(z.tangent, _fold(tc), atol=0, rtol=0)


def test_compile_sees_single_op_nodes():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    torch._dynamo.reset()
    inputs = _inputs("cpu")
    got = torch.compile(_all_ops, backend=backend, fullgraph=True)(*inputs)
    assert graphs == [[torch.ops.convzoo.unfold.default, torch.ops.convzoo.fold.default,
                       torch.ops.convzoo.local_conv.default]]
    for g, e in zip(got, _plain_results(*inputs)):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


def test_plain_eager_reads_each_guard():
    x = torch.randn(2, 3)
    assert _autograd.plain_eager([x, None])
    assert not _autograd.plain_eager([x.as_subclass(_Subclass)])
    assert not _autograd.plain_eager([x.to("meta")])
    assert not _autograd.plain_eager([torch._neg_view(x)])
    with _SeenOps():
        assert not _autograd.plain_eager([x])
    with _SeenFunctions():
        assert not _autograd.plain_eager([x])
    with fwAD.dual_level():
        assert not _autograd.plain_eager([x])
    assert torch.func.vmap(lambda t: torch.tensor(_autograd.plain_eager([t])))(x).tolist() == [False, False]



# ---------------------------------------------------------------------------------------------- cached geometry
def test_cached_geometry_keeps_every_check():
    """One resolution per call signature, cached: ``True``/``3.0`` hash like ``1``/``3`` and must still be
    refused after a cached call with the int; a numpy int still works; errors are not cached."""
    import numpy as np

    x = torch.randn(1, 2, 5, 5)
    want = cf.unfold(x, 3, padding=1)
    cf.unfold(x, 1)
    with pytest.raises(TypeError, match="kernel_size"):
        cf.unfold(x, True)
    with pytest.raises(TypeError, match="kernel_size"):
        cf.unfold(x, 3.0, padding=1)
    with pytest.raises(TypeError, match="padding"):
        cf.fold(want, (5, 5), 3, padding=1.0)
    torch.testing.assert_close(cf.unfold(x, np.int64(3), padding=[np.int64(1)] * 2), want, atol=0, rtol=0)
    torch.testing.assert_close(cf.unfold(x, [3, 3], padding=(1, 1)), want, atol=0, rtol=0)
    for _ in range(2):
        with pytest.raises(ValueError, match="larger than the padded input"):
            cf.unfold(x, 7)
    torch.testing.assert_close(cf.fold(want, (5, 5), 3, padding=1), cf.fold(want, [5, 5], (3, 3), padding=[1, 1]),
                               atol=0, rtol=0)


def test_cached_geometry_hands_out_fresh_lists(monkeypatch):
    from convzoo.ops import unfold as unfold_ops

    seen = []

    def spoil(x, *args):  # an op that scribbles on its arguments must not change the next call's
        seen.append([list(a) if isinstance(a, list) else a for a in args])
        for a in args:
            if isinstance(a, list):
                a.append(99)
        return x

    monkeypatch.setattr(unfold_ops, "unfold", spoil)
    x = torch.randn(1, 2, 5, 5)
    cf.unfold(x, 3, padding=1)
    cf.unfold(x, 3, padding=1)
    assert seen[0] == seen[1] == [[3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "zeros"]


def test_shapes_geometry_cache_and_uncached_agree():
    import numpy as np

    from convzoo import _shapes

    args = ([3, 3], [1, 1], [1, 1, 1, 1], [2, 2], "zeros")
    assert _shapes.geometry((6, 7), *args) == _shapes._geometry((6, 7), *args)
    assert _shapes.geometry((np.int64(6), 7), *args) == _shapes._geometry((6, 7), *args)  # uncached path
    for _ in range(2):
        with pytest.raises(ValueError, match="reflect"):
            _shapes.geometry((1, 7), [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "reflect")


# ---------------------------------------------------------------------------------------------- ATen CPU path
_NATIVE_CASES = [  # (spatial size, kernel, dilation, symmetric padding, stride)
    ((7,), 3, 1, 1, 1), ((9,), 2, 2, 0, 3), ((5, 6), 3, 1, 1, 1), ((6, 7), (2, 3), (2, 1), (1, 2), (2, 1)),
    ((4, 4), 4, 1, 0, 1), ((3, 5), 1, 1, 0, 1)]


def _native_args(case):
    """``(size, args)``: a :data:`_NATIVE_CASES` entry as the ops' resolved arguments (per-dim kernel, dilation,
    flat ``[lo, hi, ...]`` padding, stride, padding mode)."""
    size, *geom = case
    nd = len(size)
    ks, dil, pad, st = ([g] * nd if isinstance(g, int) else list(g) for g in geom)
    return size, (ks, dil, [p for p in pad for _ in (0, 1)], st, "zeros")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", _NATIVE_CASES, ids=str)
def test_aten_path_is_the_reference_bit_for_bit(case, dtype):
    from convzoo import reference
    from convzoo.ops import _native

    size, args = _native_args(case)
    nd = len(size)
    x = torch.randn(2, 3, *size, dtype=torch.float64).to(dtype)
    got = _native.unfold(x, *args)
    torch.testing.assert_close(got, reference.unfold(x, *args), atol=0, rtol=0)
    cols = torch.randn_like(got)
    torch.testing.assert_close(_native.fold(cols, list(size), *args), reference.fold(cols, list(size), *args),
                               atol=0, rtol=0)
    cl = x.to(memory_format=torch.channels_last) if nd == 2 else x.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(_native.unfold(cl, *args), got, atol=0, rtol=0)


@pytest.mark.parametrize("x, args", [
    (torch.randn(1, 2, 5, 5), ([3, 3], [1, 1], [1, 0, 1, 1], [1, 1], "zeros")),  # asymmetric
    (torch.randn(1, 2, 5, 5), ([3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "reflect")),
    (torch.randn(1, 2, 4, 4, 4), ([3, 3, 3], [1, 1, 1], [1] * 6, [1, 1, 1], "zeros")),  # 3-d
    (torch.randn(0, 2, 5, 5), ([3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "zeros")),  # empty
    (torch.randn(1, 2, 5, 5, device="meta"), ([3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "zeros")),
], ids=["asymmetric", "reflect", "3d", "empty", "meta"])
def test_aten_path_declines_what_it_does_not_cover(x, args):
    from convzoo.ops import _native

    assert _native.unfold(x, *args) is None


def test_aten_path_checks_as_the_reference():
    from convzoo.ops import _native

    with pytest.raises(ValueError, match="larger than the padded input"):
        _native.unfold(torch.randn(1, 2, 3, 3), [5, 5], [1, 1], [0, 0, 0, 0], [1, 1], "zeros")
    with pytest.raises(ValueError, match=r"blocks, but input\.shape"):
        _native.fold(torch.randn(1, 18, 5), [4, 4], [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "zeros")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", _NATIVE_CASES, ids=str)
def test_aten_local_conv_family_is_the_reference_bit_for_bit(case, dtype):
    from convzoo import _shapes, reference
    from convzoo.ops import _native

    size, args = _native_args(case)
    g = _shapes.geometry(size, *args)
    x = torch.randn(2, 3, *size, dtype=dtype)
    w = torch.randn(g.num_blocks, 4, 3 * g.kernel_numel, dtype=dtype).permute(1, 2, 0)  # the layer's layout
    gy = torch.randn(2, 4, *g.out_size, dtype=dtype)
    for b in (torch.randn(4, g.num_blocks, dtype=dtype), torch.randn(4, dtype=dtype), None):
        torch.testing.assert_close(_native.local_conv(x, w, b, *args), reference.local_conv(x, w, b, *args),
                                   atol=0, rtol=0)
    torch.testing.assert_close(_native.local_conv_grad_input(gy, w, list(size), *args),
                               reference.local_conv_grad_input(gy, w, list(size), *args), atol=0, rtol=0)
    for got, want in zip(_native.local_conv_grad_weight(gy, x, *args), reference.local_conv_grad_weight(gy, x, *args)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert got.stride() == want.stride()


def test_aten_local_conv_declines_what_it_does_not_cover():
    from convzoo.ops import _native

    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 18, 25)
    assert _native.local_conv(x, w, None, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "circular") is None
    assert _native.local_conv_grad_weight(torch.randn(1, 3, 5, 5), x, [3, 3], [1, 1], [1, 0, 1, 1], [1, 1],
                                          "zeros") is None
    big = torch.randn(8, 16, 32, 32)  # patches of 1.2M elements: the reference's one gather, not two buffers
    assert _native.local_conv(big, torch.randn(2, 144, 1024), None, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1],
                              "zeros") is None


def test_aten_path_declines_large_calls():
    """Past the measured crossover ATen's single-threaded im2col/col2im lose to the reference's few large
    copies (6.6 vs 1.3 ms for unfold of N8 C64 32×32 k3): large calls keep the reference."""
    from convzoo.ops import _native

    args = ([3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "zeros")
    small, large = torch.randn(2, 3, 8, 8), torch.randn(2, 8, 12, 12)  # 1728 / 20736 column elements
    assert _native.unfold(small, *args) is not None and _native.unfold(large, *args) is None
    cols_small, cols_large = torch.randn(2, 27, 64), torch.randn(4, 144, 256)  # 3456 / 147456 elements
    assert _native.fold(cols_small, [8, 8], *args) is not None and _native.fold(cols_large, [16, 16], *args) is None
    w = torch.randn(4, 144, 256)
    assert _native.local_conv_grad_input(torch.randn(4, 4, 16, 16), w, [16, 16], *args) is None


def test_jit_trace_records_the_op_not_what_one_call_ran():
    """A trace replays its graph on other inputs: it must hold convzoo::unfold (with its checks and its
    device dispatch), not the ATen calls one CPU call happened to make."""
    x = torch.randn(1, 2, 5, 5)
    traced = torch.jit.trace(lambda t: cf.unfold(t, 3, padding=1), x)
    assert "convzoo::unfold" in str(traced.graph) and "im2col" not in str(traced.graph)
    y = torch.randn(2, 2, 7, 7)
    torch.testing.assert_close(traced(y), torch.nn.functional.unfold(y, 3, padding=1), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(stride=2**63), dict(stride=2**60), dict(padding=2**61),
                                    dict(dilation=2**64)], ids=str)
def test_geometry_past_int64_is_refused_naming_the_argument(kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=rf"{name} must be ints \(not bools\) below 2\*\*60"):
        cf.unfold(torch.randn(1, 2, 5, 5), 1, **kwargs)
