"""``convzoo-gpu-check`` (or ``python -m convzoo.tools.gpu_check``): one command for a new GPU.

Runs three steps into one results folder, each a subprocess with its own budget and a hard timeout
a minute above it, each with its output in ``<step>.log``; a failing step does not stop the others:

  tests  python -m pytest -q <checkout>/tests --junitxml DIR/tests-junit.xml   (the suite on CUDA)
  tune   convzoo-autotune --grid GRID --out DIR/tables --max-minutes M        (also the user cache)
  bench  convzoo-bench --full --out DIR/bench --max-minutes M                 (uses the tuned tables)

``DIR/summary.md`` is rewritten after each step: the GPU, driver, versions, each step's status and
duration, test counts, tuned table keys, and the bench's headline speedups.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import convzoo
from convzoo.autotune.grids import GRIDS
from convzoo.autotune.lookup import device_slug, triton_version, user_cache_dir
from convzoo.tools._cli import check_minutes, check_names, check_writable, checkout_root, git_sha

STEPS = ("tests", "tune", "bench")
DEFAULT_MINUTES = 9.0  # per step: with the grace below, each step fits a 10-minute window
GRACE_S = 60  # the hard timeout's margin over a step's budget: a tuning job or bench row in flight ends
JUNIT = "tests-junit.xml"
ENV_FILE, STEPS_FILE, SUMMARY = "env.json", "steps.json", "summary.md"


@dataclass
class Step:
    """One step: its command, where it runs, its budget (minutes; None: only the timeout bounds it)
    and hard timeout (seconds), its log file; ``skip`` says why it will not run."""

    name: str
    command: list[str]
    cwd: Path | None
    budget_min: float | None
    timeout_s: float
    log: str
    skip: str | None = None


# ---------------------------------------------------------------------------------------------- plan
def default_tests() -> Path | None:
    """The checkout's ``tests/``; None for an installed package (a ``tests/`` beside it in site-packages
    belongs to somebody else)."""
    root = checkout_root()
    return root / "tests" if root is not None else None


def default_folder(slug: str, now: datetime.datetime) -> Path:
    """``~/.cache/convzoo/gpu-check/<gpu>-<UTC time>`` (beside the ``autotune`` tables folder)."""
    return user_cache_dir().parent / "gpu-check" / f"{slug}-{now.strftime('%Y%m%dT%H%M%SZ')}"


def build_plan(steps: Sequence[str], folder: Path, minutes: float, grid: str, tests: Path | None) -> list[Step]:
    """The steps to run, in the order of :data:`STEPS`, with absolute paths into ``folder``."""
    py, cwd = sys.executable, checkout_root()
    timeout = minutes * 60 + GRACE_S
    plan = []
    for name in STEPS:
        if name not in steps:
            continue
        if name == "tests":
            skip = None if tests is not None and tests.is_dir() else (
                f"no tests folder{f' at {tests}' if tests else ''} (convzoo is not imported from a checkout; "
                "pass --tests PATH)")
            tests = tests or Path("tests")
            plan.append(Step(name, [py, "-m", "pytest", "-q", str(tests), "--junitxml", str(folder / JUNIT)],
                             tests.parent, None, timeout, "tests.log", skip))
        elif name == "tune":
            plan.append(Step(name, [py, "-m", "convzoo.tools.autotune", "--grid", grid, "--out",
                                    str(folder / "tables"), "--max-minutes", f"{minutes:g}"],
                             cwd, minutes, timeout, "tune.log"))
        else:
            plan.append(Step(name, [py, "-m", "convzoo.tools.bench", "--full", "--out", str(folder / "bench"),
                                    "--max-minutes", f"{minutes:g}"], cwd, minutes, timeout, "bench.log"))
    return plan


def describe_plan(plan: Sequence[Step], folder: Path, env: dict) -> str:
    """What a run would do: the GPU, the folder, each step's command, working folder, budget and log."""
    lines = [f"# GPU: {env.get('gpu') or '(no CUDA GPU here)'}",
             f"# results folder: {folder}",
             f"# each step: its own budget and a hard timeout {GRACE_S} s above it; "
             f"at most {sum(s.timeout_s for s in plan if not s.skip) / 60:g} min in all"]
    for s in plan:
        budget = (f"budget {s.budget_min:g} min, timeout {s.timeout_s:g} s" if s.budget_min is not None
                  else f"timeout {s.timeout_s:g} s (pytest has no budget of its own)")
        lines.append(f"{s.name}: {budget}, log {folder / s.log}" + (f", in {s.cwd}" if s.cwd else ""))
        lines.append(f"  SKIPPED: {s.skip}" if s.skip else f"  $ {shlex.join(s.command)}")
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


def collect_env() -> dict:
    """The machine and software a run is on, for ``env.json``; CUDA questions only when CUDA is there."""
    env = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
           "torch": torch.__version__, "cuda_runtime": torch.version.cuda or "", "triton": triton_version(),
           "python": platform.python_version(), "platform": platform.platform(),
           "convzoo": str(Path(convzoo.__file__).resolve().parent),
           "gpu": "", "capability": "", "memory_gib": "", "driver": "", "git_sha": ""}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=f"{props.total_memory / 2**30:.1f}")
        # torch does not report the driver; nvidia-smi does where it is installed
        env["driver"] = _capture(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"])
    env["git_sha"] = git_sha()
    return env


# ---------------------------------------------------------------------------------------------- running
def _kill_group(proc: subprocess.Popen) -> None:
    """End the step's whole process group (pytest workers, compile subprocesses): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(command: list[str], log_path: Path, cwd: Path | None, timeout_s: float,
                env: dict) -> tuple[int | None, bool]:
    """Run ``command`` with stdout and stderr into ``log_path``; ``(exit code, timed out)``. Past
    ``timeout_s`` its process group is ended (exit code then is the signal's, negative).

    Raises:
        OSError: it cannot be started (the message is also in the log).
    """
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
            return proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            log.write(f"\n[convzoo-gpu-check: stopped after the {timeout_s:g} s timeout]\n")
            return proc.returncode, True
        except BaseException:  # Ctrl-C: leave nothing running
            _kill_group(proc)
            raise


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_steps(folder: Path, records: list[dict]) -> None:
    _write_atomic(folder / STEPS_FILE, json.dumps(records, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- summary
def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit_counts(path: Path) -> dict | None:
    """passed/failed/errors/skipped and the failing test ids of a pytest junit xml; None if unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failing = []
    for suite in suites:
        for k in counts:
            try:
                n = float(suite.get(k, 0) or 0)
            except ValueError:
                return None
            if not (math.isfinite(n) and n >= 0 and n == int(n)):
                return None
            counts[k] += int(n)
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failing.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    # pytest counts a test that fails and then errors in teardown in both: never below zero
    passed = max(0, counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"])
    return {"passed": passed, "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"], "failing": failing}


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


def _step_details(folder: Path, rec: dict) -> list[str]:
    name, status = rec.get("name"), rec.get("status")
    if status in ("pending", "running") or str(status).startswith("skipped"):
        return []
    if status != "ok":
        return _details(folder, name, rec) + _log_tail(folder / rec.get("log", f"{name}.log"))
    return _details(folder, name, rec)


def _details(folder: Path, name: str, rec: dict) -> list[str]:
    if name == "tests":
        c = junit_counts(folder / JUNIT)
        if c is None:
            return [f"- no junit report ({JUNIT}): the run was cut short or did not start; see {rec.get('log')}"]
        out = [f"- {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"]
        out += [f"- failing: `{t}`" for t in c["failing"][:10]]
        if len(c["failing"]) > 10:
            out.append(f"- ... and {len(c['failing']) - 10} more (see {rec.get('log')})")
        return out
    if name == "tune":
        keys = table_keys(folder / "tables")
        out = [f"- {sum(keys.values())} table keys in tables/: "
               + (", ".join(f"{k} {n}" for k, n in keys.items()) or "none")]
        try:
            log = (folder / rec.get("log", "tune.log")).read_text(errors="replace")
        except OSError:
            log = ""
        if "--max-minutes reached" in log:
            out.append("- stopped at its budget: run it again to go on (tuned keys are skipped)")
        return out
    if name == "bench":
        csvs = sorted((folder / "bench").glob("*.csv"))
        if not csvs:
            return ["- no bench CSV in bench/"]
        out = []
        for path in csvs:
            try:
                rows = _read_rows(path)
            except (OSError, csv.Error, UnicodeDecodeError) as e:
                out.append(f"- {path.name}: unreadable ({e})")
                continue
            out += [f"**{path.relative_to(folder)}**", "", *bench_headline(rows), ""]
        return out
    return []


def build_summary(folder: Path) -> str:
    """``summary.md`` from the files in ``folder`` alone (``env.json``, ``steps.json``, the junit xml,
    the tables, the bench CSV and the logs), so it can be rebuilt, and tested, without a GPU."""
    env = _read_json(folder / ENV_FILE) or {}
    records = _read_json(folder / STEPS_FILE) or []
    gpu = env.get("gpu") or "(no GPU recorded)"
    lines = [f"# convzoo GPU check: {gpu}", ""]
    facts = [("date (UTC)", env.get("date")), ("GPU", gpu), ("compute capability", env.get("capability")),
             ("memory GiB", env.get("memory_gib")), ("driver", env.get("driver") or "(nvidia-smi not found)"),
             ("CUDA runtime", env.get("cuda_runtime")), ("torch", env.get("torch")), ("triton", env.get("triton")),
             ("python", env.get("python")), ("git", env.get("git_sha") or "(not a checkout)"),
             ("convzoo", env.get("convzoo")), ("command", env.get("command"))]
    lines += [f"- {k}: {v}" for k, v in facts if v]
    lines += ["", "## Steps", "", "| step | status | duration | log |", "|---|---|---|---|"]
    for rec in records:
        lines.append(f"| {rec.get('name')} | {rec.get('status')} | {_duration(rec.get('seconds'))} | "
                     f"{rec.get('log', '-')} |")
    for rec in records:
        details = _step_details(folder, rec)
        if rec.get("note") or details:
            lines += ["", f"### {rec.get('name')}", ""]
            if rec.get("note"):
                lines.append(str(rec["note"]))
            lines += details
            if rec.get("command"):
                lines += ["", f"`{shlex.join(rec['command'])}`"]
    return "\n".join(lines).rstrip() + "\n"


def write_summary(folder: Path) -> Path:
    """Rewrite ``summary.md``; a file a step left that the summary cannot read must not stop the steps
    still to run, so any error becomes a line of the summary."""
    path = folder / SUMMARY
    try:
        text = build_summary(folder)
    except Exception as e:  # a summary is never worth the remaining steps
        text = f"# convzoo GPU check\n\nThe summary could not be built: {type(e).__name__}: {e}\n" \
               f"See {STEPS_FILE} and the step logs.\n"
    _write_atomic(path, text)
    return path


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, validated before any work: unknown or empty ``--steps``, a bad ``--max-minutes``
    or a ``--tests`` that is not a folder exit 2 with a one-line message naming the argument."""
    ap = argparse.ArgumentParser(prog="convzoo-gpu-check", description=__doc__.split("\n\n")[0],
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default: a new one under ~/.cache/convzoo/gpu-check/, printed)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}; "
                    "they run in that order")
    ap.add_argument("--max-minutes", type=float, default=DEFAULT_MINUTES,
                    help=f"budget of each step in minutes (default {DEFAULT_MINUTES:g}); each is stopped "
                         f"{GRACE_S} s after it")
    ap.add_argument("--grid", default="all", choices=sorted(GRIDS), help="the tuning grid (default: all)")
    ap.add_argument("--tests", type=Path, default=None,
                    help="the tests folder (default: the checkout's tests/, beside the convzoo package)")
    ap.add_argument("--dry-run", action="store_true", help="print what would run and where; run nothing")
    args = ap.parse_args(argv)
    args.steps = check_names(ap, "--steps", args.steps, STEPS, "step")
    check_minutes(ap, args.max_minutes)
    if args.tests is not None and not args.tests.is_dir():
        ap.error(f"--tests: {args.tests} is not a folder")
    return ap, args


def _child_env() -> dict:
    env = dict(os.environ)
    # a leftover TRITON_INTERPRET=1 would run every step on the CPU interpreter instead of the GPU
    env.pop("TRITON_INTERPRET", None)
    return env


def main(argv=None) -> int:
    ap, args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("convzoo-gpu-check: no CUDA GPU here, and it checks one. Run it on the GPU machine, or pass "
              "--dry-run to see what it would run.", file=sys.stderr)
        return 1
    env = collect_env()
    env["command"] = shlex.join(["convzoo-gpu-check", *(sys.argv[1:] if argv is None else argv)])
    now = datetime.datetime.now(datetime.UTC)
    folder = (args.out or default_folder(device_slug(env["gpu"] or "no-gpu"), now)).expanduser().resolve()
    tests = args.tests or default_tests()
    tests = tests.expanduser().resolve() if tests is not None else None
    plan = build_plan(args.steps, folder, args.max_minutes, args.grid, tests)
    if args.dry_run:
        print("# convzoo-gpu-check --dry-run: nothing is run or written")
        print(describe_plan(plan, folder, env))
        return 0
    try:
        check_writable(folder)
    except (OSError, ValueError) as e:
        ap.error(f"--out: cannot write results to {folder} ({type(e).__name__}: {e})")
    print(f"convzoo-gpu-check: results in {folder}", flush=True)
    _write_atomic(folder / ENV_FILE, json.dumps(env, indent=1) + "\n")
    records = [{"name": s.name, "status": "pending", "log": s.log, "command": s.command} for s in plan]
    write_steps(folder, records)
    write_summary(folder)
    child_env = _child_env()
    for i, (step, rec) in enumerate(zip(plan, records), 1):
        if step.skip:
            rec.update(status="skipped", note=f"Skipped: {step.skip}.")
        else:
            print(f"[{i}/{len(plan)}] {step.name} (log {folder / step.log}): {shlex.join(step.command)}", flush=True)
            rec["status"] = "running"
            if step.name == "tests":  # a report left by an earlier run must not stand for this one
                (folder / JUNIT).unlink(missing_ok=True)
            write_steps(folder, records)
            write_summary(folder)
            start = time.monotonic()
            try:
                rc, timed_out = run_command(step.command, folder / step.log, step.cwd, step.timeout_s, child_env)
            except OSError as e:
                rec.update(status="failed", note=f"Could not start: {e}.")
            except KeyboardInterrupt:
                rec.update(status="interrupted", seconds=time.monotonic() - start)
                write_steps(folder, records)
                write_summary(folder)
                print(f"interrupted; summary: {folder / SUMMARY}", file=sys.stderr)
                return 130
            else:
                rec["exit_code"] = rc
                rec["status"] = (f"timed out ({step.timeout_s:g} s)" if timed_out
                                 else "ok" if rc == 0 else f"failed (exit {rc})")
            rec["seconds"] = time.monotonic() - start
        print(f"[{i}/{len(plan)}] {step.name}: {rec['status']}", flush=True)
        write_steps(folder, records)
        write_summary(folder)
    print(f"convzoo-gpu-check: summary in {folder / SUMMARY}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
