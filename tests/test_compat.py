"""convzoo._compat: every private torch/Triton API in one place, each with a public fallback. Each fallback test
takes the private API away (monkeypatch), probes again, and shows the public route gives the same results; the
fixture probes once more after the API is back."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import triton
import triton.runtime.interpreter

import convzoo
import convzoo.functional as cf
from convzoo import _compat
from convzoo.ops import _native

_FAST_PATHS = ("plain_eager", "c_apply", "forward_ad_guard", "aten_im2col", "graph_task", "interpreted", "int8_mm")


@pytest.fixture
def without(monkeypatch):
    """``without(obj, name)``: ``obj.name`` deleted and the private APIs probed again; all restored afterwards."""

    def take_away(obj, name, fast_path):
        monkeypatch.delattr(obj, name)
        _compat.probe()
        assert not _compat.FAST_PATHS[fast_path], _compat.FAST_PATHS
        assert name in _compat.WHY_NOT[fast_path]
        others = {k: v for k, v in _compat.FAST_PATHS.items() if k != fast_path}
        assert all(others.values()), others  # only that one fell back

    yield take_away
    monkeypatch.undo()
    _compat.probe()
    assert all(_compat.FAST_PATHS.values()), _compat.WHY_NOT


def test_every_fast_path_is_active_on_this_torch():
    """On every torch/Triton CI runs, each fast path probes active: a new torch that loses one fails here, not
    silently slower."""
    assert tuple(_compat.FAST_PATHS) == _FAST_PATHS
    assert all(_compat.FAST_PATHS.values()), _compat.WHY_NOT


def test_debug_info_names_versions_and_fast_paths():
    info = convzoo.debug_info()
    assert info["torch"] == torch.__version__ and info["triton"] == triton.__version__
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["fast_paths"] == _compat.FAST_PATHS and info["inactive_because"] == {}


def test_debug_info_says_why_a_fast_path_is_off(without):
    without(torch._C._nn, "im2col", "aten_im2col")
    info = convzoo.debug_info()
    assert info["fast_paths"]["aten_im2col"] is False
    assert "im2col" in info["inactive_because"]["aten_im2col"]


def _ops(x, cols, w, b):
    return [cf.unfold(x, 3, padding=1), cf.fold(cols, (4, 5), 3, padding=1),
            cf.local_conv(x, w, b, kernel_size=3, padding=1)]


def _inputs(requires_grad):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=requires_grad)
    cols = torch.randn(2, 27, 20, dtype=torch.float64, requires_grad=requires_grad)
    w = torch.randn(4, 27, 20, dtype=torch.float64, requires_grad=requires_grad)
    b = torch.randn(4, 20, dtype=torch.float64, requires_grad=requires_grad)
    return x, cols, w, b


def _results(requires_grad):
    torch.manual_seed(1)
    inputs = _inputs(requires_grad)
    outs = _ops(*inputs)
    if not requires_grad:
        return outs
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs)
    return [*outs, *torch.autograd.grad(loss, inputs)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the plain-torch path: its fast paths are what is tested


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_plain_eager_fallback_goes_through_the_dispatcher(torch_path, without, op_calls, requires_grad):
    fast = _results(requires_grad)
    assert op_calls == []  # the fast path: no dispatcher round trip
    without(torch._C, "_dispatch_keys", "plain_eager")
    assert not _compat.plain_eager([torch.ones(1)])
    slow = _results(requires_grad)
    assert {"unfold", "fold", "local_conv"} <= set(op_calls)  # every call through the custom op
    _same(fast, slow)


def test_c_apply_fallback_uses_function_apply(torch_path, without, function_applies, monkeypatch):
    fast = _results(True)
    assert function_applies == []  # straight into the C++ apply
    # Function keeps its real base; the probe reads the base's apply off torch._C._FunctionBase
    monkeypatch.setattr(torch._C, "_FunctionBase", type("_FunctionBase", (), {}))
    _compat.probe()
    assert not _compat.FAST_PATHS["c_apply"] and "apply" in _compat.WHY_NOT["c_apply"]
    slow = _results(True)
    assert {"_unfold_function", "_fold_function", "_local_conv_function"} <= set(function_applies)
    _same(fast, slow)
    monkeypatch.undo()
    _compat.probe()
    assert all(_compat.FAST_PATHS.values()), _compat.WHY_NOT


def _run(code: str) -> str:
    """``code`` in a fresh interpreter (convzoo imported there after ``code``'s own set-up), its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


_GUARD_CHECK = """
import warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import convzoo, convzoo.functional as cf
from convzoo import _compat
assert _compat.FAST_PATHS["forward_ad_guard"] is False, _compat.FAST_PATHS
assert all(v for k, v in _compat.FAST_PATHS.items() if k != "forward_ad_guard"), _compat.FAST_PATHS
messages = [str(w.message) for w in caught]
assert [m for m in messages if "drop forward-mode tangents" in m], messages
x, t = torch.randn(1, 2, 5, 6, dtype=torch.float64), torch.randn(1, 2, 5, 6, dtype=torch.float64)
y, y_t = torch.func.jvp(lambda a: cf.unfold(a, 3, padding=1), (x,), (t,))  # the entry point: linear, so op(t)
assert torch.equal(y, cf.unfold(x, 3, padding=1)) and torch.equal(y_t, cf.unfold(t, 3, padding=1))
print(_compat.WHY_NOT["forward_ad_guard"])
"""


def test_forward_ad_guard_fallback_where_library_impl_cannot_override():
    """A torch whose ``Library.impl`` takes no ``allow_override``: convzoo imports, reports the guard off, says
    once what that means, and its entry points still carry tangents."""
    why = _run("import inspect, torch\n"
               "sig = inspect.signature(torch.library.Library.impl)\n"
               "torch.library.Library.impl.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() "
               "if p.name != 'allow_override'])\n" + _GUARD_CHECK)
    assert "allow_override" in why


def test_forward_ad_guard_fallback_where_the_override_raises():
    """The override itself failing (as torch 2.11's refusal did) is no import error either."""
    why = _run("import inspect, torch\n"
               "impl = torch.library.Library.impl\n"
               "def refusing(self, *args, **kwargs):\n"  # convzoo's override of an Autograd kernel only
               "    if self.ns == 'convzoo' and kwargs.get('allow_override') and 'Autograd' in args:\n"
               "        raise RuntimeError('This is not allowed')\n"
               "    return impl(self, *args, **kwargs)\n"
               "refusing.__signature__ = inspect.signature(impl)\n"
               "torch.library.Library.impl = refusing\n" + _GUARD_CHECK)
    assert "overriding convzoo::" in why and "This is not allowed" in why


def test_forward_ad_guard_is_installed():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"torch\.ops\.convzoo\.unfold got a forward-mode AD tangent"):
        torch.func.jvp(lambda t: torch.ops.convzoo.unfold(t, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "zeros"),
                       (x,), (torch.ones_like(x),))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_aten_im2col_fallback_is_the_reference(torch_path, without, requires_grad):
    x = torch.randn(1, 2, 5, 6)
    assert _native.unfold(x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "zeros") is not None
    fast = [*_results(requires_grad), cf.unfold(x, 3, padding=1), cf.fold(cf.unfold(x, 3), (5, 6), 3)]
    without(torch._C._nn, "im2col", "aten_im2col")
    assert _native.unfold(x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "zeros") is None
    slow = [*_results(requires_grad), cf.unfold(x, 3, padding=1), cf.fold(cf.unfold(x, 3), (5, 6), 3)]
    _same(fast, slow)


def _kfac_factors():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 5 * 5, 4))
    kfac = convzoo.KFACFactors(model, beta=0.5)
    for _ in range(2):
        model(torch.randn(3, 2, 5, 5)).sum().backward()
    return [kfac[name] for name in sorted(kfac.factors)]


def test_graph_task_fallback_warns_and_counts_the_same(torch_path, without):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path warns nothing
        fast = _kfac_factors()
    assert _compat.in_backward() is False
    without(torch._C, "_current_graph_task_id", "graph_task")
    assert _compat.in_backward() is None
    with pytest.warns(UserWarning, match="KFACFactors: .*activation checkpointing will be counted"):
        slow = _kfac_factors()
    _same(fast, slow)


def test_interpreted_fallback_tells_the_same(without, kernel_device):
    from convzoo.kernels import local_conv as local_kernels
    from convzoo.kernels import unfold as unfold_kernels

    kernels = [unfold_kernels.unfold_kernel, local_kernels.local_conv_fwd_kernel,
               triton.heuristics({"EXTRA": lambda args: 1})(unfold_kernels.unfold_kernel)]  # a wrapped one

    def plain(x):
        return x

    fast = [_compat.interpreted(k) for k in kernels] + [_compat.interpreted(plain)]
    assert fast == [kernel_device == "cpu"] * 3 + [False]
    x = torch.randn(1, 2, 5, 6, device=kernel_device)
    want = cf.unfold(x, 3, padding=1)
    without(triton.runtime.interpreter, "InterpretedFunction", "interpreted")
    assert [_compat.interpreted(k) for k in kernels] + [_compat.interpreted(plain)] == fast
    _same([cf.unfold(x, 3, padding=1)], [want])


def test_sym_max_on_ints_is_an_int():
    assert _compat.sym_max(3, 5) == 5 and type(_compat.sym_max(3, 5)) is int
    assert _compat.sym_max(-2, 0) == 0


def test_compiled_same_padding_traces_on_every_torch(torch_path):
    """torch 2.11's Dynamo could not trace torch.sym_max of two ints (the 'same' padding rule) under fullgraph."""
    torch._dynamo.reset()
    x = torch.randn(2, 3, 7, 6)
    fn = torch.compile(lambda t: cf.unfold(t, (3, 2), padding="same", dilation=2), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), cf.unfold(x, (3, 2), padding="same", dilation=2), rtol=0, atol=0)


def test_import_raises_no_warning():
    """``import convzoo`` (and its kernels, under the interpreter) with every warning an error: nothing
    version-dependent is silent, and no registration problem is hidden."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = ("import convzoo, convzoo.kernels; convzoo.kernels.load_all(); "
            "info = convzoo.debug_info(); assert all(info['fast_paths'].values()), info; print('ok')")
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_graph_task_fallback_warns_at_dynamic_sparse_construction(without):
    without(torch._C, "_current_graph_task_id", "graph_task")
    with pytest.warns(UserWarning, match="DynamicSparseConv2d: .*activation checkpointing will be counted"):
        convzoo.DynamicSparseConv2d(2, 3, 3, density=0.5)


def test_probe_ignores_the_importers_context():
    """An import under inference mode, no_grad or a meta default device probes the same as a plain one."""
    out = _run("import torch\n"
               "with torch.inference_mode(), torch.no_grad(), torch.device('meta'):\n"
               "    import convzoo\n"
               "from convzoo import _compat\n"
               "print(all(_compat.FAST_PATHS.values()), _compat.WHY_NOT)")
    assert out.startswith("True {}"), out
