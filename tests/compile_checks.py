"""A shared check for compiled training steps."""

from __future__ import annotations

import torch
import torch._dynamo.testing


def assert_compiled_step_matches_eager(step, inputs, check=None) -> None:
    """``step`` under ``torch.compile(fullgraph=True, dynamic=True)`` (aot_eager, autograd ops traced) on each of
    ``inputs`` (batches of different sizes): the same results as eager, one graph for all, and ``check(result)``
    on each compiled result."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for x in inputs:
            got = compiled(x)
            for a, e in zip(got, step(x)):
                torch.testing.assert_close(a, e)
            if check is not None:
                check(got)
    assert counter.frame_count == 1
    torch._dynamo.reset()
