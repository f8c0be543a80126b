"""The bench's problems and providers (``convzoo.tools.bench.ops``, the same tables ``convzoo-bench`` times)
as pytest-benchmark tests, to track regressions between commits::

    pytest bench --benchmark-only [--bench-size tiny|quick|full|overhead] [--bench-device cuda] \\
        [--bench-dtype float16] [--benchmark-autosave | --benchmark-compare --benchmark-compare-fail=median:10%]

One test per (op, shape, mode, provider), grouped per (op, shape, mode) so pytest-benchmark's table sets
the providers of a row side by side. On CUDA each timed call ends with ``torch.cuda.synchronize()``.
Not part of the default test run (``testpaths = ["tests"]``).
"""

import os

import pytest
import torch

from convzoo.tools.bench import harness, ops


def pytest_addoption(parser):
    group = parser.getgroup("convzoo-bench")
    group.addoption("--bench-size", default="quick", choices=(*ops.SIZES, "overhead"),
                    help="which problems (as convzoo-bench --tiny/--quick/--full/--overhead; default quick)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when present)")
    group.addoption("--bench-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    group.addoption("--bench-ops", default=",".join(ops.OPS), help="comma-separated subset of the ops")


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise pytest.UsageError("TRITON_INTERPRET is set: the benchmarks would time the interpreter; unset it")


def _device(config) -> torch.device:
    return torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def cases(config) -> list[tuple]:
    """(problem, mode, provider) in the order convzoo-bench times them."""
    size, device = config.getoption("--bench-size"), _device(config)
    chosen = [o for o in config.getoption("--bench-ops").split(",") if o]
    modes = ("fwd", "bwd", "fwd+bwd") if size == "full" else ("fwd", "fwd+bwd")
    jobs = harness.jobs(ops.for_size(size, chosen), ops.providers(), modes, device, full=size == "full")
    return [(problem, mode, prov) for problem, mode, provs in jobs for prov in provs]


def case_id(problem, mode, prov) -> str:
    return f"{problem.op}-{problem.id}-{mode}-{prov.name}"


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        found = cases(metafunc.config)
        metafunc.parametrize("case", found, ids=[case_id(*c) for c in found])


@pytest.fixture
def device(request) -> torch.device:
    return _device(request.config)


@pytest.fixture
def dtype(request) -> torch.dtype:
    return getattr(torch, request.config.getoption("--bench-dtype"))
