"""Peak memory of a call: the CUDA allocator's statistics on GPU, the profiler's allocation events on CPU."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch


@contextlib.contextmanager
def _quiet_native_stderr():
    """Kineto writes a line to the process's stderr (fd 2, below Python) at every profiler start and stop;
    a bench row's memory pass would print two. Python's own ``sys.stderr`` is left alone."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """The largest number of bytes that allocations made during ``fn()`` held at one time.

    Memory allocated before the call does not count, memory freed during it does. On CUDA this is
    ``max_memory_allocated`` above the starting level; on CPU it replays the profiler's
    ``[memory]`` events (one per allocation and free of the CPU allocator, so allocations inside
    custom ops and kernels' launchers are seen too).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
