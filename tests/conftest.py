"""Kernel tests run on CUDA when present, else under Triton's CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is decorated, i.e. before convzoo's
kernels are imported, so it is set here, at collection start.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # the kernels run under Triton's interpreter
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by -m
def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("slow_interpreted") and INTERPRETED and _runs_kernels(item):
            item.add_marker(pytest.mark.slow)


def _runs_kernels(item):
    """Whether a case runs the Triton kernels: every case but the ``path`` fixture's plain-torch one."""
    callspec = getattr(item, "callspec", None)
    return callspec is None or callspec.params.get("path") != "torch"


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """The device an op runs on, and which implementation it takes there.

    ``triton``: CUDA, or CPU under the interpreter. ``torch``: CPU with the interpreter off, so
    the op runs its plain-torch path.
    """
    if request.param == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        return "cpu"
    return KERNEL_DEVICE


@pytest.fixture
def kernel_device():
    return KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def function_applies(monkeypatch):
    """The names of the autograd.Functions applied through ``torch.autograd.Function.apply`` (the public route,
    with its Python preamble on torch ≤ 2.13; torch ≥ 2.14 made it the C++ ``apply`` itself). convzoo's fast path
    enters the C++ ``apply`` without looking ``Function.apply`` up, so it is never counted here."""
    calls = []
    original = torch.autograd.Function.__dict__["apply"]  # a classmethod, or (torch >= 2.14) a C method descriptor

    def counting(cls, *args, **kwargs):
        calls.append(cls.__name__)
        return original.__get__(None, cls)(*args, **kwargs)

    monkeypatch.setattr(torch.autograd.Function, "apply", classmethod(counting))
    return calls


@pytest.fixture
def op_calls(monkeypatch):
    """The names of the convzoo custom ops called through ``torch.library.CustomOpDef.__call__``: the entry points'
    only road into the dispatcher."""
    calls = []
    original = torch.library.CustomOpDef.__call__

    def counting(self, *args, **kwargs):
        calls.append(self._name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.library.CustomOpDef, "__call__", counting)
    return calls
