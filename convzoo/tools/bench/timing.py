"""The bench's timers and its noise checks.

Timers are the well-kept ones, never a hand-rolled loop:

- GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call), every sample kept;
- CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` with an explicit thread count; a sample is the
  mean of one block of calls, blocks sized so the timer's own overhead is negligible;
- host overhead (µs of Python per eager call, on any device): the CPU timer, whose blocks queue many
  calls and synchronise once, so on a GPU it measures what the host can issue.

A timer is called once per *round*; the harness interleaves the rounds of every provider of a row, so
a change of load hits all of them alike and the ratios between them stay honest.

A row is marked noisy when its samples spread more than :data:`SPREAD_BOUND` (p80 / p20) or when other
processes kept more than :func:`load_bound` CPUs busy while it was timed (:class:`ForeignLoad`).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

#: a row whose p80 / p20 exceeds this is marked noisy (quiet machines stay well under 1.1 on both timers)
SPREAD_BOUND = 1.3


def load_bound(cpus: int | None = None) -> float:
    """CPUs kept busy by *other* processes above which a row is marked noisy: half a core, or a tenth
    of the machine's cores when that is more."""
    return max(0.5, 0.1 * (cpus or os.cpu_count() or 1))


class CudaTimer:
    """``triton.testing.do_bench`` samples (ms), ``warmup`` / ``rep`` ms per round."""

    name = "triton.testing.do_bench"

    def __init__(self, warmup: int = 25, rep: int = 100):
        self.warmup, self.rep = warmup, rep

    def __call__(self, fn: Callable[[], object]) -> list[float]:
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=self.warmup, rep=self.rep, return_mode="all"))


class CpuTimer:
    """``torch.utils.benchmark.Timer(num_threads=threads).blocked_autorange(min_run_time)`` block means (ms)."""

    def __init__(self, threads: int | None = None, min_run_time: float = 0.2):
        self.threads = threads or torch.get_num_threads()
        self.min_run_time = min_run_time
        self.name = f"torch.utils.benchmark, {self.threads} thread{'s' if self.threads > 1 else ''}"

    def __call__(self, fn: Callable[[], object]) -> list[float]:
        from torch.utils.benchmark import Timer

        m = Timer("fn()", globals={"fn": fn}, num_threads=self.threads).blocked_autorange(
            min_run_time=self.min_run_time)
        return [t * 1e3 for t in m.times]


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) of the samples (one sample: all three equal)."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


class ForeignLoad:
    """How many CPUs *other* processes kept busy between :meth:`start` and :meth:`stop`.

    Linux: the machine's busy time from ``/proc/stat`` minus this process's own CPU time (and its
    finished children's), over the wall time. Pools this process started and has not waited for (torch
    compile workers) count as other processes. Elsewhere (no ``/proc/stat``) :meth:`stop` returns None
    and rows are not checked for load.
    """

    def __init__(self, stat_path: str = "/proc/stat"):
        self.stat_path = stat_path
        self._start = None

    def _busy_s(self) -> float | None:
        try:
            with open(self.stat_path) as f:
                fields = f.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu":
            return None
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy
        ticks = [int(v) for v in fields[1:9]]
        busy = sum(ticks) - ticks[3] - ticks[4]
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _self_s() -> float:
        t = os.times()  # this process's threads, and the children it waited for (a compiler, ptxas)
        return t.user + t.system + t.children_user + t.children_system

    def start(self) -> None:
        self._start = (self._busy_s(), self._self_s(), time.perf_counter())

    def stop(self) -> float | None:
        if self._start is None or self._start[0] is None:
            return None
        busy0, self0, wall0 = self._start
        busy1, self1, wall1 = self._busy_s(), self._self_s(), time.perf_counter()
        if busy1 is None or wall1 - wall0 < 0.05:  # too short for 10 ms ticks to say anything
            return None
        return max(0.0, ((busy1 - busy0) - (self1 - self0)) / (wall1 - wall0))


def noise(p20: float, p80: float, foreign: float | None, cpus: int | None = None) -> str:
    """Why a row is noisy ("" when it is not): its spread, the machine's foreign load, or both."""
    why = []
    if p20 > 0 and p80 / p20 > SPREAD_BOUND:
        why.append(f"spread p80/p20 {p80 / p20:.2f} > {SPREAD_BOUND}")
    if foreign is not None and foreign > load_bound(cpus):
        why.append(f"other processes busy on {foreign:.1f} CPUs > {load_bound(cpus):.1f}")
    return "; ".join(why)
