"""The offline tuner: time each kernel's candidate configs on grid shapes, keep the winners.

For every (kernel, grid layer, dtype) whose table key is not tuned yet (or with ``force``):

1. a short first pass times every candidate (and the heuristic default); a candidate slower than
   ``abort_ratio`` × the best so far is hopeless and dropped, one that fails to compile/launch too;
2. the ``finalists`` fastest are timed again, longer;
3. the winner's output is checked against the plain-torch reference (the next one is tried if it
   fails, the default kept if all do);
4. the entry is merged into the table under a file lock and the table rewritten atomically, so
   concurrent tuners never corrupt a table nor drop each other's entries.

Timing is ``triton.testing.do_bench``; tests inject a fake ``timer(fn, config, stage) -> ms``.
"""

from __future__ import annotations

import contextlib
import fcntl
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from convzoo.autotune.config import Config, KernelSpec, bucket_key
from convzoo.autotune.grids import Layer
from convzoo.autotune.lookup import load_entries, write_table

Timer = Callable[[Callable[[], object], Config, str], float]

# output checks: atol, rtol per dtype (fp32 leaves room for TF32 in tl.dot when torch allows it)
CHECK_TOL = {torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2), torch.float32: (1e-2, 1e-2),
             torch.float64: (1e-9, 1e-9)}


# do_bench's (warmup, rep) windows in ms per stage: a short first pass over every candidate, a longer
# final one for the finalists; the dry run's estimate reads the same numbers
BENCH_MS = {"first": (5, 20), "final": (25, 100)}
FINALISTS = 5  # candidates re-timed in the final pass
# a rough guess, not a measurement: compiling one candidate config the first time it is launched
# (Triton's on-disk cache makes a re-run much faster); the dry run adds it per candidate
COMPILE_S = 0.5


def do_bench_timer(fn: Callable[[], object], config: Config, stage: str) -> float:
    """Median ms with ``triton.testing.do_bench``; the first pass is short, the final one longer."""
    import triton.testing

    warmup, rep = BENCH_MS[stage]
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])


def estimate_seconds(n_candidates: int, finalists: int = FINALISTS, compile_s: float = COMPILE_S) -> float:
    """A rough wall-clock estimate of :func:`tune_job` for a job with ``n_candidates`` configs:

    ``n_candidates × (compile_s + first-pass warmup + rep) + min(n_candidates, finalists + 1) × (final-pass
    warmup + rep)`` (the ``+ 1``: the heuristic default gets its own final pass when it is not a finalist).

    ``do_bench`` runs each pass for about its warmup + rep window, so the timing part holds unless one
    launch is longer than the window (then it is a lower bound); the compile part is a guess
    (:data:`COMPILE_S`) that a warm Triton cache undercuts. Candidates dropped early still compile and
    run their first pass, so they are counted in full; the correctness check (a few launches) is not.
    """
    first = sum(BENCH_MS["first"]) / 1000
    final = sum(BENCH_MS["final"]) / 1000
    return n_candidates * (compile_s + first) + min(n_candidates, finalists + 1) * final


@dataclass
class Job:
    spec: KernelSpec
    layer: Layer
    dtype: torch.dtype
    dims: dict
    key: str


@dataclass
class Result:
    kernel: str
    key: str
    layer: str
    best: Config
    best_ms: float
    default_ms: float
    tried: int
    dropped: int
    failed: int
    checked: bool
    notes: list = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.default_ms / self.best_ms if self.best_ms > 0 else float("nan")


def plan(specs: Iterable[KernelSpec], layers: Sequence[Layer], dtypes: Sequence[torch.dtype],
         device: torch.device) -> list[Job]:
    """One job per (kernel, dtype, table key), the first layer of each key standing for it (a layer whose
    ``kernels`` leaves a kernel out gives it no job). The kernels take turns: each kernel's first job, then
    each kernel's second, ..., so a run stopped by its budget has tuned every kernel's first keys."""
    per_kernel: list[list[Job]] = []
    for spec in specs:
        if spec.problem is None:
            continue
        jobs, seen = [], set()
        for dtype in dtypes:
            for layer in layers:
                if layer.kernels is not None and spec.name not in layer.kernels:
                    continue
                dims = dict(spec.problem(layer, dtype, device).dims)
                key = bucket_key(dtype, dims)
                if key not in seen:
                    seen.add(key)
                    jobs.append(Job(spec, layer, dtype, dims, key))
        per_kernel.append(jobs)
    return [jobs[i] for i in range(max(map(len, per_kernel), default=0)) for jobs in per_kernel if i < len(jobs)]


def candidates(job: Job) -> list[Config]:
    """The heuristic default first, then every candidate (without duplicates)."""
    default = job.spec.default_config(job.dims, job.dtype, False)
    return list(dict.fromkeys([default, *job.spec.candidates(job.dims, job.dtype)]))


# ---------------------------------------------------------------------------------------------- tables
def read_entries(path: Path, spec: KernelSpec) -> dict[str, Config]:
    """The valid entries of a table for the running kernel source and Triton, else none; read fresh,
    validated and warned about as the runtime does (:func:`convzoo.autotune.lookup.load_entries`), so
    an invalid entry is re-tuned, and dropped when the table is rewritten."""
    return load_entries(path, spec)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def merge_entry(path: Path, spec: KernelSpec, key: str, config: Config, device_name: str) -> None:
    """Add one entry to the table at ``path``: read, merge and atomically rewrite under a lock."""
    with _locked(path):
        entries = read_entries(path, spec)
        entries[key] = config
        write_table(path, spec, entries, device_name)


# ---------------------------------------------------------------------------------------------- tuning
def _outputs(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _matches(got, ref, dtype, exact: bool) -> bool:
    atol, rtol = (0.0, 0.0) if exact else CHECK_TOL[dtype]
    got, ref = _outputs(got), _outputs(ref)
    if len(got) != len(ref):
        return False
    for g, r in zip(got, ref):
        if g.shape != r.shape or not torch.allclose(g.double(), r.double(), atol=atol, rtol=rtol):
            return False
    return True


class DeadlineReached(Exception):
    """:func:`tune_job` passed its ``stop_at``: the job's timings so far are dropped, nothing is written."""


def tune_job(job: Job, device: torch.device, timer: Timer, abort_ratio: float = 2.0,
             finalists: int = FINALISTS, stop_at: float | None = None) -> Result:
    """Time ``job``'s candidates and pick the winner (see the module docstring).

    Raises:
        DeadlineReached: ``time.monotonic()`` passed ``stop_at`` before a timing; checked before each one,
            so a job overruns it by one timing at most.
    """
    problem = job.spec.problem(job.layer, job.dtype, device)
    run, reference = problem.setup()
    cands = candidates(job)
    default = cands[0]
    first: dict[Config, float] = {}
    best = float("inf")
    dropped = failed = 0
    notes = []

    def check_deadline():
        if stop_at is not None and time.monotonic() > stop_at:
            raise DeadlineReached(job.key)

    for cfg in cands:
        check_deadline()
        try:
            ms = timer(lambda cfg=cfg: run(cfg), cfg, "first")
        except Exception as e:  # out of shared memory / registers, or an invalid launch
            failed += 1
            if cfg == default:
                notes.append(f"default failed: {type(e).__name__}")
            continue
        if ms > abort_ratio * best and cfg != default:
            dropped += 1
            continue
        first[cfg] = ms
        best = min(best, ms)
    ranked = sorted(first, key=first.get)[:finalists]
    final = {}
    for cfg in ranked:
        check_deadline()
        final[cfg] = timer(lambda cfg=cfg: run(cfg), cfg, "final")
    default_ms = final.get(default) or timer(lambda: run(default), default, "final")
    expected = reference()
    for cfg in sorted(final, key=final.get):
        if _matches(run(cfg), expected, job.dtype, problem.exact):
            return Result(job.spec.name, job.key, job.layer.name, cfg, final[cfg], default_ms, len(cands),
                          dropped, failed, True, notes)
        notes.append(f"{format_config(cfg)} gave wrong results")
    checked = _matches(run(default), expected, job.dtype, problem.exact)
    return Result(job.spec.name, job.key, job.layer.name, default, default_ms, default_ms, len(cands), dropped,
                  failed, checked, [*notes, "kept the default"])


def format_config(cfg: Config) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.meta.items()) + f" w{cfg.num_warps} s{cfg.num_stages}"


class _Progress:
    """tqdm when installed, else one line per job with an ETA."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="job", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass
        self.enabled = enabled

    def step(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update()
        elif self.enabled:
            elapsed = time.monotonic() - self.start
            eta = elapsed / self.done * (self.total - self.done)
            print(f"[{self.done}/{self.total}] {label}  elapsed {elapsed:.0f}s  ETA {eta:.0f}s", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def tune(jobs: Sequence[Job], device: torch.device, tables: Sequence[Path], device_name: str,
         timer: Timer = do_bench_timer, force: bool = False, max_minutes: float | None = None,
         progress: bool = True, log=print) -> list[Result]:
    """Tune ``jobs`` and merge each winner into every table folder of ``tables`` (``<root>/<kernel>.json``).

    Keys already in the first table (the user cache) are not re-timed unless ``force``: their entry
    is copied to the other tables, so ``--out`` after an earlier run still ships everything. Stops at
    ``max_minutes``: no new job starts, and a job in flight stops before its next timing (its timings are
    dropped); what finished is written.
    """
    results = []
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    bar = _Progress(len(jobs), progress)
    try:
        for job in jobs:
            label = f"{job.spec.name} {job.layer.name} {str(job.dtype).removeprefix('torch.')}"
            if deadline is not None and time.monotonic() > deadline:
                log(f"--max-minutes reached: stopping before {label}")
                break
            cached = read_entries(tables[0] / f"{job.spec.name}.json", job.spec).get(job.key)
            if cached is not None and not force:  # tuned already: copy it to the other tables, untimed
                for root in tables[1:]:
                    merge_entry(root / f"{job.spec.name}.json", job.spec, job.key, cached, device_name)
                bar.step(label + " (tuned already)")
                continue
            try:
                result = tune_job(job, device, timer, stop_at=deadline)
            except DeadlineReached:
                log(f"--max-minutes reached: stopping during {label} (its timings are dropped)")
                break
            for root in tables:
                merge_entry(root / f"{job.spec.name}.json", job.spec, job.key, result.best, device_name)
            results.append(result)
            bar.step(label)
    finally:
        bar.close()
    return results


def summary(results: Sequence[Result]) -> str:
    head = ["kernel", "key", "layer", "best config", "ms", "default ms", "speedup", "checked"]
    rows = [[r.kernel, r.key, r.layer, format_config(r.best), f"{r.best_ms:.4f}", f"{r.default_ms:.4f}",
             f"{r.speedup:.2f}x", "yes" if r.checked else "NO"] for r in results]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
