"""The bench's problems and providers (``convzoo.tools.bench.ops``, the same tables ``convzoo-bench`` times)
as pytest-benchmark tests, to track regressions between commits::

    pytest bench --benchmark-only [--bench-size tiny|quick|full|overhead] [--bench-device cuda] \\
        [--bench-dtype float16] [--benchmark-autosave | --benchmark-compare --benchmark-compare-fail=median:10%]

One test per (op, shape, mode, provider), grouped per (op, shape, mode) so pytest-benchmark's table sets
the providers of a row side by side. On CUDA each timed call ends with ``torch.cuda.synchronize()``.
Not part of the default test run (``testpaths = ["tests"]``).
"""

import pytest
import torch

from convzoo.autotune import interpret_mode
from convzoo.tools.bench import harness, ops


def pytest_addoption(parser):
    group = parser.getgroup("convzoo-bench")
    group.addoption("--bench-size", default="quick", choices=(*ops.SIZES, "overhead"),
                    help="which problems (as convzoo-bench --tiny/--quick/--full/--overhead; default quick)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when present)")
    group.addoption("--bench-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    group.addoption("--bench-ops", default=",".join(ops.OPS), help="comma-separated subset of the ops")


def pytest_configure(config):
    """Options checked before collection: a bad one is a usage error naming it, not a traceback."""
    if interpret_mode():
        raise pytest.UsageError("TRITON_INTERPRET is set: the benchmarks would time the interpreter; unset it")
    text = config.getoption("--bench-device")
    if text is not None:
        try:
            device = torch.device(text)
        except (RuntimeError, ValueError):
            raise pytest.UsageError(f"--bench-device: {text!r} is not a device (cpu or cuda)") from None
        if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
            raise pytest.UsageError(f"--bench-device: {text!r} is not cpu or a CUDA device present here")
    text = config.getoption("--bench-ops")
    chosen = [o for o in text.split(",") if o]
    if not chosen or any(o not in ops.OPS for o in chosen):
        raise pytest.UsageError(f"--bench-ops: choose from {','.join(ops.OPS)}, got {text!r}")


def _device(config) -> torch.device:
    return torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def cases(config) -> list[tuple]:
    """(problem, mode, provider) in the order convzoo-bench times them."""
    size, device = config.getoption("--bench-size"), _device(config)
    chosen = [o for o in config.getoption("--bench-ops").split(",") if o]
    jobs = harness.jobs(ops.for_size(size, chosen), ops.providers(), ops.default_modes(size), device,
                        full=size == "full")
    return [(problem, mode, prov) for problem, mode, provs in jobs for prov in provs]


def case_id(problem, mode, prov) -> str:
    """``op-shape-mode-provider``, ASCII and ``-k``-friendly: ``compile(F.unfold)`` becomes ``compile-F.unfold``."""
    name = prov.name.replace("(", "-").replace(")", "")
    return f"{problem.op}-{problem.id}-{mode}-{name}"


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        found = cases(metafunc.config)
        metafunc.parametrize("case", found, ids=[case_id(*c) for c in found])


@pytest.fixture(autouse=True)
def _compile_guard():
    with harness.compile_guard():
        yield


@pytest.fixture
def device(request) -> torch.device:
    return _device(request.config)


@pytest.fixture
def dtype(request) -> torch.dtype:
    return getattr(torch, request.config.getoption("--bench-dtype"))
