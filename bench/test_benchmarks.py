"""One pytest-benchmark test per (op, shape, mode, provider) of ``convzoo-bench``'s tables; see conftest.py."""

import torch

from convzoo.tools.bench import harness


def test_benchmark(benchmark, case, device, dtype):
    problem, mode, provider = case
    fn = harness.call(problem, provider, mode, device, dtype)
    if device.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize(device)
    else:
        timed = fn
    benchmark.group = f"{problem.op} {problem.label} {mode}"
    benchmark.extra_info.update(op=problem.op, shape=problem.label, mode=mode, provider=provider.label(device),
                                dtype=str(dtype).replace("torch.", ""), device=str(device))
    benchmark(timed)
