"""convzoo-gpu-check's plan: the steps, their shares of the budget, deadlines, graces and commands.

The results folder's file names live here too, since the plan names them (:data:`OUTPUTS`)."""

from __future__ import annotations

import datetime
import importlib.util
import math
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from convzoo.autotune.lookup import user_cache_dir
from convzoo.tools._cli import checkout_root

STEPS = ("tests", "tune", "bench")
DEFAULT_MINUTES = 8.0
MIN_MINUTES = 2.0  # below this the tests step's grace would leave it no time to collect
# each step's share of the budget (the chosen steps' shares are scaled to fill it)
SHARES = {"tests": 0.5, "tune": 0.2, "bench": 0.3}
RESERVE_S = 15.0  # kept out of the steps: the summary and the logs archive written after the last one
# the results folder: at most 8 files, no subfolders, names of letters, digits, '.', '_', '-' (what a lent GPU
# machine sends back). static.csv is kept for the static report of issue 22 (items 5-6); a step that writes it
# adds its table to summary.md rather than a file of its own.
SUMMARY, RUN_JSON, JUNIT, TABLES_JSON = "summary.md", "run.json", "tests-junit.xml", "tables.json"
BENCH_CSV, BENCH_MD, STATIC_CSV, LOGS = "bench.csv", "bench.md", "static.csv", "logs.tar.gz"
OUTPUTS = (SUMMARY, RUN_JSON, JUNIT, TABLES_JSON, BENCH_CSV, BENCH_MD, STATIC_CSV, LOGS)
MAX_FILES = 8
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
# inside the work folder (a temporary folder, never the results folder)
ENV_FILE, STEPS_FILE, PROGRESS = "env.json", "steps.json", "tests-progress.tsv"
# the peers the tests and the bench import (the distributions scripts/gpu-wheels.txt pins), for run.json
PEERS = ("unfoldNd", "einconv", "einops", "curvlinops-for-pytorch", "linear_operator", "scipy", "hypothesis",
         "sortedcontainers", "setuptools", "pytest", "pytest-xdist", "matplotlib", "numpy")
# what the rehearsal's tune step runs: the tuning command, timing each candidate by one interpreted launch
REHEARSAL_TUNE = ("import sys; from convzoo.tools import autotune, gpu_check; "
                  "sys.exit(autotune.main(sys.argv[1:], timer=gpu_check.rehearsal_timer))")
GUARD = "CONVZOO_GPU_CHECK_STEP"  # set in every step's environment: a nested run of the suite knows it


# (fraction of the share, at least, at most) seconds between a step's deadline and its hard timeout: room for the
# test, tuning job or bench row in flight to finish and for the step to write its results (pytest also reports
# each test left as not run, ~1 ms apiece, and writes its junit report); the second half of it is the
# interrupt-then-end sequence
GRACE = {"tests": (0.2, 15.0, 60.0), "tune": (0.15, 3.0, 30.0), "bench": (0.15, 3.0, 30.0)}


def grace_s(step: str, share_s: float) -> float:
    """The grace of step ``step`` with a share of ``share_s`` seconds (:data:`GRACE`)."""
    frac, lo, hi = GRACE[step]
    return min(hi, max(lo, frac * share_s))


def startup_s(window_s: float) -> float:
    """What a tune or bench process spends before its ``--max-minutes`` clock starts (imports, kernel
    registration, the bench's bandwidth and matmul probes): taken off the budget it is given."""
    return min(10.0, 0.3 * window_s)


@dataclass
class Step:
    """One step of the plan. Times are seconds from the run's start: ``deadline_s`` is when it stops starting
    work, ``end_s`` when it is ended at the latest; ``timeout_s`` is its share (the longest it can run).
    ``skip`` says why it will not run."""

    name: str
    cwd: Path | None
    deadline_s: float
    end_s: float
    timeout_s: float
    grace_s: float
    log: str
    base: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)  # None values: removed from the environment
    skip: str | None = None

    def command(self, start_s: float, t0_epoch: float) -> list[str]:
        """The command as started ``start_s`` seconds into a run that began at ``t0_epoch``: the tests get their
        deadline as a time (every xdist worker reads it), tune and bench the minutes left until theirs."""
        if self.name == "tests":
            return [*self.base[:-1], "--convzoo-deadline", f"{t0_epoch + self.deadline_s:.1f}", self.base[-1]]
        window = max(1.0, self.deadline_s - start_s)
        return [*self.base, "--max-minutes", f"{max(1.0, window - startup_s(window)) / 60:.3g}"]


# ---------------------------------------------------------------------------------------------- plan
def default_tests() -> Path | None:
    """The checkout's ``tests/``; None for an installed package (a ``tests/`` beside it in site-packages
    belongs to somebody else)."""
    root = checkout_root()
    return root / "tests" if root is not None else None


def default_folder(slug: str, now: datetime.datetime) -> Path:
    """``~/.cache/convzoo/gpu-check/<gpu>-<UTC time>`` (beside the ``autotune`` tables folder)."""
    return user_cache_dir().parent / "gpu-check" / f"{slug}-{now.strftime('%Y%m%dT%H%M%SZ')}"


def bench_kernels() -> list[str]:
    """The kernels the bench's ops launch: what the tune step tunes."""
    from convzoo.tools.bench import ops

    return sorted({k for kernels in ops.OP_KERNELS.values() for k in kernels})


def build_plan(steps: Sequence[str], work: Path, minutes: float, tests: Path | None, rehearse: bool = False,
               grid: str | None = None, xdist: bool | None = None) -> list[Step]:
    """The chosen steps, in the order of :data:`STEPS`, sharing ``minutes`` less :data:`RESERVE_S`; outputs go to
    ``work`` (the results folder is filled from it).

    Raises:
        ValueError: an unknown step, or a budget below :data:`MIN_MINUTES`.
        TypeError: ``minutes`` is not a number.
    """
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)):
        raise TypeError(f"minutes must be a number, got {type(minutes).__name__}")
    if not (math.isfinite(minutes) and minutes >= MIN_MINUTES):
        raise ValueError(f"minutes must be at least {MIN_MINUTES:g} and finite, got {minutes}")
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise ValueError(f"steps must name some of {','.join(STEPS)}, got {list(steps)}")
    py, cwd = sys.executable, checkout_root()
    chosen = [s for s in STEPS if s in steps]
    total = sum(SHARES[s] for s in chosen)
    budget = minutes * 60 - RESERVE_S
    xdist = (importlib.util.find_spec("xdist") is not None) if xdist is None else xdist
    plan, end = [], 0.0
    for name in chosen:
        share = budget * SHARES[name] / total
        end += share
        grace = grace_s(name, share)
        deadline = end - grace
        env = {GUARD: name, "CONVZOO_CACHE_DIR": str(work / "cache")}
        if rehearse:  # the CPU rehearsal: no GPU even where there is one; kernels interpreted, the bench on CPU
            env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET=None if name == "bench" else "1")
        else:  # a leftover TRITON_INTERPRET=1 would run every step on the CPU interpreter instead of the GPU
            env["TRITON_INTERPRET"] = None
        if name == "tests":
            skip = None if tests is not None and tests.is_dir() else (
                f"no tests folder{f' at {tests}' if tests else ''} (convzoo is not imported from a checkout; "
                "pass --tests PATH)")
            tests_dir = tests or Path("tests")
            base = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "convzoo.tools.pytest_deadline",
                    "--convzoo-kernel-tests-first", "--continue-on-collection-errors",
                    "--junitxml", str(work / JUNIT), "--convzoo-progress", str(work / PROGRESS)]
            if xdist and not rehearse:  # the rehearsal stays one process: it shares a CPU with its caller
                base += ["-n", "auto"]
            plan.append(Step(name, tests_dir.parent, deadline, end, share, grace, "tests.log", [*base, str(tests_dir)],
                             env, skip))
        elif name == "tune":
            head = [py, "-c", REHEARSAL_TUNE] if rehearse else [py, "-m", "convzoo.tools.autotune"]
            base = [*head, "--grid", grid or ("bench-tiny" if rehearse else "bench-quick"), "--dtype", "float32",
                    "--kernels", ",".join(bench_kernels()), "--out", str(work / "tables")]
            plan.append(Step(name, cwd, deadline, end, share, grace, "tune.log", base, env))
        else:
            base = [py, "-m", "convzoo.tools.bench", "--out", str(work / "bench")]
            base += ["--tiny", "--device", "cpu", "--threads", "1", "--reps", "2", "--min-time", "0.02",
                     "--no-memory"] if rehearse else ["--quick"]
            plan.append(Step(name, cwd, deadline, end, share, grace, "bench.log", base, env))
    return plan


def describe_plan(plan: Sequence[Step], folder: Path, env: dict, minutes: float, rehearse: bool,
                  t0_epoch: float) -> str:
    """What a run would do: the GPU, the folder and its files, the budget, and per step its hard timeout,
    deadline, log and command (as started when the steps before it use all their time)."""
    steps_s = sum(s.timeout_s for s in plan)
    lines = [f"# GPU: {env.get('gpu') or '(no CUDA GPU here)'}" + (" -- rehearsal on the CPU" if rehearse else ""),
             f"# results folder: {folder} (at most {MAX_FILES} files: {', '.join(OUTPUTS)})",
             f"# budget: {minutes:g} min = {minutes * 60:g} s; the steps' timeouts add up to {steps_s:.0f} s, "
             f"{minutes * 60 - steps_s:.0f} s kept for the summary; a step that ends early passes its time on"]
    for s in plan:
        start = s.end_s - s.timeout_s
        lines.append(f"{s.name}: timeout {s.timeout_s:.0f} s (from {start:.0f} s to {s.end_s:.0f} s at the latest; "
                     f"deadline at {s.deadline_s:.0f} s), log {s.log}" + (f", in {s.cwd}" if s.cwd else ""))
        lines.append(f"  SKIPPED: {s.skip}" if s.skip else f"  $ {shlex.join(s.command(start, t0_epoch))}")
    return "\n".join(lines)

