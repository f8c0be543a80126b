"""``convzoo-gpu-check`` (or ``python -m convzoo.tools.gpu_check``): one command for a new GPU, in one time budget.

``--minutes M`` (default 8) is the whole run. Its steps share it, in this order, each a subprocess with its own
deadline (where it stops starting work) and a hard timeout a little later (where it is interrupted, then ended):

  tests  pytest on CUDA (-n auto), the gpu-marked and kernel-vs-reference tests first, then the rest while time
         remains; the tests left at its deadline are reported as not run
  tune   convzoo-autotune --grid bench-quick --dtype float32: the shapes the bench times (stops mid-job at its budget)
  bench  convzoo-bench --quick, with the tables just tuned

The timeouts add up to M minutes less a few seconds kept for the summary; a step that ends early passes its time
on to the next. Everything comes back in one folder of at most 8 files (--out; no subfolders): summary.md,
run.json, tests-junit.xml, tables.json, bench.csv, bench.md, logs.tar.gz (the logs, the test progress, the bench
plots), and static.csv (kept for a static-analysis step). They are rewritten after each step, so a run that is
stopped still returns what it measured. ``--rehearse`` runs the same plan on a CPU (kernels under Triton's
interpreter, the bench's tiny shapes on the CPU paths), to the same deadlines and into the same files.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import convzoo
from convzoo.autotune.lookup import device_slug, triton_version, user_cache_dir
from convzoo.tools._cli import check_minutes, check_names, check_writable, checkout_root, git_sha
from convzoo.tools.pytest_deadline import NOT_RUN

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


# ---------------------------------------------------------------------------------------------- environment
def _capture(command: list[str], cwd: Path | None = None) -> str:
    """A helper command's first output line, '' if it is absent or fails (nvidia-smi, git)."""
    if shutil.which(command[0]) is None:
        return ""
    try:
        out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.strip().splitlines()[0].strip() if out.strip() else ""


def _versions(names: Sequence[str]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def collect_env(cuda: bool = True) -> dict:
    """The machine and software a run is on, for ``run.json``; CUDA questions only when CUDA is there."""
    env = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
           "torch": torch.__version__, "cuda_runtime": torch.version.cuda or "", "triton": triton_version(),
           "python": platform.python_version(), "platform": platform.platform(),
           "convzoo": str(Path(convzoo.__file__).resolve().parent),
           "gpu": "", "capability": "", "memory_gib": "", "driver": "", "git_sha": "", "peers": _versions(PEERS)}
    if cuda and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=f"{props.total_memory / 2**30:.1f}")
        # torch does not report the driver; nvidia-smi does where it is installed
        env["driver"] = _capture(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"])
    env["git_sha"] = git_sha()
    return env


def rehearsal_timer(fn, config, stage) -> float:
    """The rehearsal's tuning timer: one launch under the interpreter, in ms (control flow, not a measurement)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


# ---------------------------------------------------------------------------------------------- running
def _signal_group(proc: subprocess.Popen, sig: int, wait_s: float) -> bool:
    """Send ``sig`` to the step's process group; True once the step has ended (within ``wait_s``)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=max(wait_s, 0.01))
        return True
    except subprocess.TimeoutExpired:
        return False


def _stop_group(proc: subprocess.Popen, stop_s: float) -> None:
    """End the step's whole process group (pytest workers, compile subprocesses) within ``stop_s``: an
    interrupt first (pytest then writes its junit report, the bench and the tuner keep what they wrote), a
    TERM a third of the way before the end, a KILL at it."""
    if not _signal_group(proc, signal.SIGINT, stop_s * 2 / 3) and not _signal_group(proc, signal.SIGTERM, stop_s / 3):
        _signal_group(proc, signal.SIGKILL, 10)


def run_command(command: list[str], log_path: Path, cwd: Path | None, timeout_s: float, env: dict,
                stop_s: float | None = None) -> tuple[int | None, bool]:
    """Run ``command`` with stdout and stderr into ``log_path``; ``(exit code, stopped)``. ``stop_s`` before
    ``timeout_s`` (default: a quarter of it, at most 15 s) its process group is interrupted, then ended, so
    nothing of it runs past ``timeout_s`` (the exit code then is the signal's, negative, or pytest's).

    Raises:
        OSError: it cannot be started (the message is also in the log).
    """
    stop_s = min(15.0, timeout_s / 4) if stop_s is None else min(stop_s, timeout_s)
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=cwd, env=env, start_new_session=True)
        except OSError as e:
            log.write(f"could not start: {e}\n")
            raise
        try:
            return proc.wait(timeout=timeout_s - stop_s), False
        except subprocess.TimeoutExpired:
            _stop_group(proc, stop_s)
            log.write(f"\n[convzoo-gpu-check: stopped at its {timeout_s:.1f} s timeout]\n")
            return proc.returncode, True
        except BaseException:  # Ctrl-C: leave nothing running
            _stop_group(proc, min(stop_s, 5.0))
            raise


def _write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


def write_steps(work: Path, records: list[dict]) -> None:
    _write_atomic(work / STEPS_FILE, json.dumps(records, indent=1) + "\n")


def child_env(step: Step) -> dict:
    env = dict(os.environ)
    for k, v in step.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def step_status(step: Step, work: Path, rc: int | None, stopped: bool, timeout_s: float) -> str:
    """``ok``, ``ok, cut at its deadline`` (it stopped itself there: tests left not run, tuning or bench rows
    left), ``stopped at its timeout (N s)`` (``timeout_s``: the time it was given) or ``failed (exit N)``."""
    if stopped:
        return f"stopped at its timeout ({timeout_s:.0f} s)"
    if rc != 0:
        return f"failed (exit {rc})"
    try:
        log = (work / step.log).read_text(errors="replace")
    except OSError:
        log = ""
    if step.name == "tests":
        counts = test_counts(work)
        cut = counts is not None and counts["not_run"] > 0
    else:
        cut = "--max-minutes" in log and "reached" in log
    return "ok, cut at its deadline" if cut else "ok"


def _succeeded(status: str) -> bool:
    return status.startswith(("ok", "skipped"))


# ---------------------------------------------------------------------------------------------- summary
def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _test_file(classname: str) -> str:
    """``tests.test_fold.TestX`` -> ``test_fold.py``: the file a junit test case is in."""
    parts = [p for p in classname.split(".") if p.startswith("test_")]
    return f"{parts[0]}.py" if parts else classname or "?"


def _counts(failing: list[str], not_run: Counter, **n) -> dict:
    return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, **n, "not_run": sum(not_run.values()),
            "not_run_files": not_run, "failing": failing}


def junit_counts(path: Path) -> dict | None:
    """passed/failed/errors/skipped, the tests not run (skipped at the deadline, by file) and the failing test
    ids of a pytest junit xml; None if it is unreadable or its counts are not counts."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for suite in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            try:
                v = float(suite.get(k, 0) or 0)
            except ValueError:
                return None
            if not (math.isfinite(v) and v >= 0 and v == int(v)):
                return None
    n = Counter()
    not_run, failing = Counter(), []
    for suite in suites:
        for case in suite.iter("testcase"):
            failed, error, skipped = (case.find(t) is not None for t in ("failure", "error", "skipped"))
            if failed or error:  # a test can fail and then error in its teardown: counted in both
                n["failed"] += failed
                n["errors"] += error
                failing.append(f"{case.get('classname', '')}::{case.get('name', '')}")
            elif skipped:
                if (case.find("skipped").get("message") or "").startswith(NOT_RUN):
                    not_run[_test_file(case.get("classname", ""))] += 1
                else:
                    n["skipped"] += 1
            else:
                n["passed"] += 1
    return _counts(failing, not_run, **n)


def progress_counts(path: Path) -> dict | None:
    """The same counts from the plugin's progress file (what a step stopped before its junit report leaves),
    plus how many tests were collected and how many of those never reported; None without the file."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    collected, outcome = None, {}
    rank = {"passed": 0, "skipped": 1, "notrun": 2, "failed": 3, "error": 4}
    for line in lines:
        kind, _, rest = line.partition("\t")
        if kind == "collected" and rest.strip().isdigit():
            collected = int(rest)
        elif kind in rank and rest and rank[kind] >= rank.get(outcome.get(rest), -1):
            outcome[rest] = kind
    n = Counter()
    not_run, failing = Counter(), []
    for nodeid, kind in outcome.items():
        if kind == "notrun":
            not_run[Path(nodeid.split("::")[0]).name] += 1
        elif kind in ("failed", "error"):
            n["failed" if kind == "failed" else "errors"] += 1
            failing.append(nodeid)
        else:
            n[kind] += 1
    out = _counts(failing, not_run, **n)
    out.update(collected=collected, unreported=None if collected is None else max(0, collected - len(outcome)))
    return out


def test_counts(work: Path) -> dict | None:
    """The tests step's counts: from its junit report, else from its progress file."""
    return junit_counts(work / JUNIT) or progress_counts(work / PROGRESS)


def table_keys(folder: Path) -> dict[str, int]:
    """Entries per kernel in the tables under ``folder`` (``<gpu>/<kernel>.json``)."""
    out = {}
    for path in sorted(folder.glob("*/*.json")):
        data = _read_json(path)
        if isinstance(data, dict) and isinstance(data.get("configs"), dict):
            out[path.stem] = out.get(path.stem, 0) + len(data["configs"])
    return out


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _read_rows(path: Path) -> list[dict]:
    with path.open(newline="", errors="replace") as f:
        return list(csv.DictReader(f))


def _is_noisy(row: dict) -> bool:
    """The bench writes why a row is noisy (empty when it is not); older files wrote a flag."""
    v = str(row.get("noisy") or "").strip().lower()
    return v not in ("", "0", "false", "no", "nan")


def bench_headline(rows: list[dict]) -> list[str]:
    """Markdown: the geometric-mean speedup per (op, mode, dtype) against each peer, the best and worst
    peer rows, and how many rows were noisy. Rows of earlier runs appended to the same CSV (another
    ``date`` than its last row's) are left out. ``speedup`` = peer time / convzoo time (> 1: convzoo faster)."""
    if not rows:
        return ["No rows in the bench CSV."]
    last = rows[-1].get("date")
    rows = [r for r in rows if r.get("date") == last]
    peers = [r for r in rows if r.get("provider") != "convzoo" and _float(r.get("speedup")) > 0
             and math.isfinite(_float(r.get("speedup")))]
    noisy = sum(_is_noisy(r) for r in rows)
    quiet = [r for r in peers if not _is_noisy(r)]
    lines = [f"Run of {last}: {len(rows)} rows, {noisy} noisy. Speedup = peer time / convzoo time "
             "(> 1: convzoo is faster); geometric mean over the shapes"
             + (", quiet rows only." if quiet else "; every peer row is noisy, so these are too.")]
    if not peers:
        return [*lines, "", "No peer rows with a speedup."]
    peers = quiet or peers
    groups: dict[tuple, list[float]] = {}
    for r in peers:
        groups.setdefault((r.get("op"), r.get("mode"), r.get("dtype"), r.get("provider")), []).append(
            _float(r["speedup"]))
    lines += ["", "| op | mode | dtype | vs | geomean speedup | min | max | shapes |", "|---" * 8 + "|"]
    for (op, mode, dtype, prov), v in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        gm = min(max(v), math.exp(sum(map(math.log, v)) / len(v)))  # no rounding past the largest
        lines.append(f"| {op} | {mode} | {dtype} | {prov} | {gm:.3g}x | {min(v):.3g}x | {max(v):.3g}x | {len(v)} |")

    def row(r):
        return f"{r.get('op')} {r.get('shape')} {r.get('mode')} {r.get('dtype')} vs {r.get('provider')}: " \
               f"{_float(r['speedup']):.3g}x"

    best = max(peers, key=lambda r: _float(r["speedup"]))
    worst = min(peers, key=lambda r: _float(r["speedup"]))
    return [*lines, "", f"- best: {row(best)}", f"- worst: {row(worst)}"]


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    m, s = divmod(round(seconds), 60)
    return f"{m}m {s:02d}s" if m else f"{s}s"


def _log_tail(path: Path, n: int = 8) -> list[str]:
    """The last ``n`` lines of a failed step's log, as a markdown code block (none if it is empty)."""
    try:
        lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return []
    tail = [line for line in lines if line.strip()][-n:]
    return ["", f"last lines of {path.name}:", "```", *tail, "```"] if tail else []


def _step_details(work: Path, rec: dict) -> list[str]:
    name, status = rec.get("name"), str(rec.get("status"))
    if status in ("pending", "running") or status.startswith("skipped"):
        return []
    details = _details(work, name, rec)
    return details if _succeeded(status) else details + _log_tail(work / rec.get("log", f"{name}.log"))


def _tests_details(work: Path, rec: dict) -> list[str]:
    c = junit_counts(work / JUNIT)
    out = []
    if c is None:
        c = progress_counts(work / PROGRESS)
        if c is None:
            return [f"- no junit report ({JUNIT}) and no progress file: the step did not get to run tests; "
                    f"see {rec.get('log')}"]
        out.append(f"- no junit report ({JUNIT}): the step was stopped before pytest wrote it; counts from "
                   f"its progress file")
    ran = c["passed"] + c["failed"] + c["errors"] + c["skipped"]
    out.append(f"- ran {ran}: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
               f"{c['skipped']} skipped; {c['not_run']} not run (past the deadline)")
    if c.get("unreported"):
        out.append(f"- {c['unreported']} of the {c['collected']} collected never reported (the step was stopped)")
    if c["not_run_files"]:
        files = c["not_run_files"].most_common()
        out.append("- not run, by file: " + ", ".join(f"{f} {k}" for f, k in files[:12])
                   + (f", and {len(files) - 12} more files" if len(files) > 12 else ""))
    out += [f"- failing: `{t}`" for t in c["failing"][:10]]
    if len(c["failing"]) > 10:
        out.append(f"- ... and {len(c['failing']) - 10} more (see {JUNIT} or {LOGS})")
    return out


def _details(work: Path, name: str, rec: dict) -> list[str]:
    if name == "tests":
        return _tests_details(work, rec)
    if name == "tune":
        keys = table_keys(work / "tables")
        out = [f"- {sum(keys.values())} table keys in {TABLES_JSON}: "
               + (", ".join(f"{k} {n}" for k, n in keys.items()) or "none")]
        try:
            log = (work / rec.get("log", "tune.log")).read_text(errors="replace")
        except OSError:
            log = ""
        if "--max-minutes reached" in log:
            out.append("- stopped at its deadline: run again with the same --out to go on (tuned keys are skipped)")
        return out
    if name == "bench":
        path = _bench_file(work, ".csv")
        if path is None:
            return [f"- no bench CSV ({BENCH_CSV})"]
        try:
            rows = _read_rows(path)
        except (OSError, csv.Error, UnicodeDecodeError) as e:
            return [f"- {BENCH_CSV}: unreadable ({e})"]
        return [f"**{BENCH_CSV}** (all rows and tables: {BENCH_MD})", "", *bench_headline(rows)]
    return []


def build_summary(work: Path) -> str:
    """``summary.md`` from the files in the work folder alone (``env.json``, ``steps.json``, the junit xml or the
    progress file, the tables, the bench CSV and the logs), so it can be rebuilt, and tested, without a GPU."""
    env = _read_json(work / ENV_FILE) or {}
    records = _read_json(work / STEPS_FILE) or []
    gpu = env.get("gpu") or "(no GPU recorded)"
    lines = [f"# convzoo GPU check: {gpu}" + (" (rehearsal on the CPU)" if env.get("rehearse") else ""), ""]
    peers = env.get("peers") or {}
    missing = ", ".join(k for k, v in peers.items() if v == "missing")
    facts = [("date (UTC)", env.get("date")), ("GPU", gpu), ("compute capability", env.get("capability")),
             ("memory GiB", env.get("memory_gib")), ("driver", env.get("driver") or "(nvidia-smi not found)"),
             ("CUDA runtime", env.get("cuda_runtime")), ("torch", env.get("torch")), ("triton", env.get("triton")),
             ("python", env.get("python")), ("git", env.get("git_sha") or "(not a checkout)"),
             ("convzoo", env.get("convzoo")), ("budget", env.get("budget")), ("command", env.get("command")),
             ("peers missing", missing)]
    lines += [f"- {k}: {v}" for k, v in facts if v]
    lines += ["", "## Steps", "", "| step | status | duration | timeout | log |", "|---|---|---|---|---|"]
    for rec in records:
        timeout = rec.get("timeout_s")
        lines.append(f"| {rec.get('name')} | {rec.get('status')} | {_duration(rec.get('seconds'))} | "
                     f"{_duration(timeout)} | {rec.get('log', '-')} |")
    for rec in records:
        details = _step_details(work, rec)
        if rec.get("note") or details:
            lines += ["", f"### {rec.get('name')}", ""]
            if rec.get("note"):
                lines.append(str(rec["note"]))
            lines += details
            if rec.get("command"):
                lines += ["", f"`{shlex.join(rec['command'])}`"]
    lines += ["", f"Logs, the tests' progress file and the bench plots: {LOGS}."]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------- the results folder
def _bench_file(work: Path, suffix: str) -> Path | None:
    """The bench's ``<device>.csv`` / ``.md`` in the work folder (one device per run; the newest if more)."""
    found = sorted((work / "bench").glob(f"*{suffix}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _tables(work: Path) -> dict:
    """``tables.json``: ``{"<gpu>/<kernel>.json": table}`` for every table the tune step wrote."""
    out = {}
    for path in sorted((work / "tables").glob("*/*.json")):
        data = _read_json(path)
        if isinstance(data, dict):
            out[f"{path.parent.name}/{path.name}"] = data
    return out


def _logs_archive(work: Path) -> bytes:
    """``logs.tar.gz``: the step logs, ``steps.json``, ``env.json``, the tests' progress file and the bench plots."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted([*work.glob("*.log"), *work.glob("*.json"), *work.glob("*.tsv"),
                            *(work / "bench").glob("*/*.png")]):
            tar.add(path, arcname=str(path.relative_to(work)))
    return buf.getvalue()


def publish(work: Path, out: Path) -> list[str]:
    """Rewrite the results folder from the work folder: only names of :data:`OUTPUTS`, each replaced atomically;
    a result file the run has not produced yet is absent. Never raises for a file a step left: the summary
    says so instead. The names written, in order."""
    try:
        summary = build_summary(work)
    except Exception as e:  # a summary is never worth the remaining steps
        summary = f"# convzoo GPU check\n\nThe summary could not be built: {type(e).__name__}: {e}\n" \
                  f"See {RUN_JSON} and the step logs in {LOGS}.\n"
    files: dict[str, str | bytes] = {SUMMARY: summary}
    run = {"env": _read_json(work / ENV_FILE) or {}, "steps": _read_json(work / STEPS_FILE) or [],
           "tests": None}
    counts = test_counts(work)
    if counts is not None:
        run["tests"] = {k: (dict(v) if isinstance(v, Counter) else v) for k, v in counts.items()}
    files[RUN_JSON] = json.dumps(run, indent=1) + "\n"
    if (work / JUNIT).is_file():
        files[JUNIT] = (work / JUNIT).read_bytes()
    tables = _tables(work)
    if tables:
        files[TABLES_JSON] = json.dumps(tables, indent=1) + "\n"
    for name, suffix in ((BENCH_CSV, ".csv"), (BENCH_MD, ".md")):
        path = _bench_file(work, suffix)
        if path is not None:
            files[name] = path.read_bytes()
    files[LOGS] = _logs_archive(work)
    assert set(files) <= set(OUTPUTS)
    for name, data in files.items():
        _write_atomic(out / name, data)
    return list(files)


def check_out_folder(out: Path) -> None:
    """The results folder must be empty or hold only this tool's files (an earlier run's, replaced).

    Raises:
        ValueError: it holds anything else (it would then hold more than :data:`MAX_FILES` files).
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} is not a folder")
    ours = {*OUTPUTS, *(f".{n}.tmp" for n in OUTPUTS)}  # with the temporary files of a write that was stopped
    other = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".convzoo-"))
    if other:
        raise ValueError(f"{out} holds other files ({', '.join(other[:5])}{', ...' if len(other) > 5 else ''}); "
                         f"the results go into an empty folder or one of an earlier run")


def seed_tables(out: Path, work: Path) -> int:
    """An earlier run's ``tables.json`` in the results folder becomes this run's tuning cache, so a second run
    goes on where the first stopped (tuned keys are skipped). The number of tables seeded."""
    data = _read_json(out / TABLES_JSON)
    n = 0
    for rel, table in (data.items() if isinstance(data, dict) else ()):
        parts = str(rel).split("/")
        if len(parts) != 2 or not all(NAME_RE.fullmatch(p) and p not in (".", "..") for p in parts) \
                or not parts[1].endswith(".json") or not isinstance(table, dict):
            continue
        for root in (work / "cache" / "autotune", work / "tables"):
            (root / parts[0]).mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(json.dumps(table))
        n += 1
    return n


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, validated before any work: unknown or empty ``--steps``, a bad ``--minutes``, a
    ``--tests`` that is not a folder or a ``--grid`` not known to the tuner exit 2 with a one-line message."""
    from convzoo.tools.autotune import BENCH_GRIDS, GRIDS

    ap = argparse.ArgumentParser(prog="convzoo-gpu-check", description=__doc__.split("\n\n")[0],
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder, empty or an earlier run's (default: a new one under "
                         "~/.cache/convzoo/gpu-check/, printed)")
    ap.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                    help=f"the whole run's budget in minutes (default {DEFAULT_MINUTES:g}, at least {MIN_MINUTES:g}); "
                         "the steps' hard timeouts add up to it, less a few seconds for the summary")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}; "
                    "they run in that order and share the budget")
    ap.add_argument("--grid", default=None, choices=[*sorted(GRIDS), *BENCH_GRIDS],
                    help="the tuning grid (default: bench-quick, the shapes the bench times; rehearsal: bench-tiny)")
    ap.add_argument("--tests", type=Path, default=None,
                    help="the tests folder (default: the checkout's tests/, beside the convzoo package)")
    ap.add_argument("--rehearse", action="store_true",
                    help="the same plan on this machine's CPU: kernels under Triton's interpreter, the bench's tiny "
                         "shapes on the CPU paths, the same deadlines and files (no GPU needed)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan: steps, timeouts, commands; run nothing")
    ap.add_argument("--static", action="store_true",
                    help="instead of the run: the static sm_90 report of every kernel (static.csv, static.md in "
                         "--out), compiled and read on this machine, no GPU needed (convzoo.tools.static_report)")
    ap.add_argument("--quick", action="store_true", help="with --static: fp16 and fp32 on one problem per kernel")
    args = ap.parse_args(argv)
    if args.quick and not args.static:
        ap.error("--quick goes with --static")
    args.steps = check_names(ap, "--steps", args.steps, STEPS, "step")
    check_minutes(ap, args.minutes, "--minutes")
    if args.minutes < MIN_MINUTES:
        ap.error(f"--minutes must be at least {MIN_MINUTES:g} (the steps' shares would be shorter than their "
                 f"graces), got {args.minutes:g}")
    if args.tests is not None and not args.tests.is_dir():
        ap.error(f"--tests: {args.tests} is not a folder")
    return ap, args


def main(argv=None) -> int:
    t0, t0_epoch = time.monotonic(), time.time()
    ap, args = parse_args(argv)
    if args.static:
        from convzoo.tools import static_report

        folder = (args.out or default_folder("static-sm90", datetime.datetime.now(datetime.UTC))).expanduser()
        print(f"# static report -> {folder}")
        return static_report.main(["--out", str(folder), *(["--quick"] if args.quick else [])])
    cuda = torch.cuda.is_available() and not args.rehearse
    if not cuda and not (args.dry_run or args.rehearse):
        print("convzoo-gpu-check: no CUDA GPU here, and it checks one. Run it on the GPU machine, pass --rehearse "
              "to rehearse the plan on this CPU, or --dry-run to see what it would run.", file=sys.stderr)
        return 1
    env = collect_env(cuda)
    env.update(command=shlex.join(["convzoo-gpu-check", *(sys.argv[1:] if argv is None else argv)]),
               rehearse=args.rehearse, budget=f"{args.minutes:g} min")
    now = datetime.datetime.now(datetime.UTC)
    slug = device_slug(env["gpu"]) if env["gpu"] else ("cpu-rehearsal" if args.rehearse else "no-gpu")
    folder = (args.out or default_folder(slug, now)).expanduser().resolve()
    tests = args.tests or default_tests()
    tests = tests.expanduser().resolve() if tests is not None else None
    if args.dry_run:
        plan = build_plan(args.steps, Path(tempfile.gettempdir()) / "convzoo-gpu-check-XXXX", args.minutes, tests,
                          args.rehearse, args.grid)
        print("# convzoo-gpu-check --dry-run: nothing is run or written")
        print(describe_plan(plan, folder, env, args.minutes, args.rehearse, t0_epoch))
        return 0
    try:
        check_out_folder(folder)
        check_writable(folder)
    except (OSError, ValueError) as e:
        ap.error(f"--out: cannot write results to {folder} ({type(e).__name__}: {e})")
    work = Path(tempfile.mkdtemp(prefix="convzoo-gpu-check-"))
    try:
        return _run(args, env, folder, work, tests, t0, t0_epoch)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, env: dict, folder: Path, work: Path, tests: Path | None, t0: float, t0_epoch: float) -> int:
    plan = build_plan(args.steps, work, args.minutes, tests, args.rehearse, args.grid)
    print(f"convzoo-gpu-check: results in {folder}" + (" (rehearsal on the CPU)" if args.rehearse else ""),
          flush=True)
    seeded = seed_tables(folder, work)
    for name in OUTPUTS:  # an earlier run's results must not stand for this one's
        (folder / name).unlink(missing_ok=True)
        (folder / f".{name}.tmp").unlink(missing_ok=True)
    _write_atomic(work / ENV_FILE, json.dumps(env, indent=1) + "\n")
    # timeout_s: the planned one until the step starts, then the time it is given (more when the steps before
    # it ended early)
    records = [{"name": s.name, "status": "pending", "log": s.log, "timeout_s": round(s.timeout_s)} for s in plan]
    if seeded:
        records[0]["note"] = f"{seeded} tables of the earlier run in this folder seeded the tuning."
    write_steps(work, records)
    publish(work, folder)
    for i, (step, rec) in enumerate(zip(plan, records), 1):
        start = time.monotonic() - t0
        left = step.end_s - start
        if step.skip or left < 2:
            rec.update(status="skipped", note=f"Skipped: {step.skip or 'no time left in the budget'}.")
        else:
            command = step.command(start, t0_epoch)
            rec.update(status="running", command=command, timeout_s=round(left))
            print(f"[{i}/{len(plan)}] {step.name} ({left:.0f} s at most): {shlex.join(command)}", flush=True)
            write_steps(work, records)
            publish(work, folder)
            try:
                rc, stopped = run_command(command, work / step.log, step.cwd, left, child_env(step),
                                          stop_s=step.grace_s / 2)
            except OSError as e:
                rec.update(status="failed (could not start)", note=f"Could not start: {e}.")
            except KeyboardInterrupt:
                rec.update(status="interrupted", seconds=time.monotonic() - t0 - start)
                write_steps(work, records)
                publish(work, folder)
                print(f"interrupted; summary: {folder / SUMMARY}", file=sys.stderr)
                return 130
            else:
                rec.update(exit_code=rc, status=step_status(step, work, rc, stopped, left))
            rec["seconds"] = time.monotonic() - t0 - start
        print(f"[{i}/{len(plan)}] {step.name}: {rec['status']}", flush=True)
        write_steps(work, records)
        publish(work, folder)
    print(f"convzoo-gpu-check: summary in {folder / SUMMARY} ({time.monotonic() - t0:.0f} s)")
    return 0 if all(_succeeded(r["status"]) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
