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
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


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
