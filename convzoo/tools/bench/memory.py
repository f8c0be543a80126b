"""Peak memory of a call: the CUDA allocator's statistics on GPU, the profiler's allocation events on CPU."""

from __future__ import annotations

from collections.abc import Callable

import torch


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

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
