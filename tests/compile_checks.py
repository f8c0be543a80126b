"""Shared checks for compiled code: a training step compiled whole, and a function or module compiled once for
every input size."""

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


def input_grad_of_square(fn, x):
    """``(fn(x), d Σ fn(x)² / dx)``: a forward and backward through ``fn`` for ``assert_compiles_once``."""
    x = x.detach().requires_grad_()
    out = fn(x)
    (g,) = torch.autograd.grad((out * out).sum(), x)
    return out, g


def assert_compiles_once(fn, inputs, run=input_grad_of_square) -> None:
    """``fn`` (a function or a module) under ``torch.compile(fullgraph=True, dynamic=True)`` (aot_eager) on each
    of ``inputs`` (tensors of different sizes): ``run(compiled, x)``, forward and backward outside the graph, gives
    eager's ``run(fn, x)``, and one graph serves them all."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    for x in inputs:
        for a, b in zip(run(compiled, x), run(fn, x), strict=True):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1
    torch._dynamo.reset()
