"""convzoo-gpu-check's summary: test counts (junit report or progress file), tuned table keys, the bench's
headline, and ``summary.md`` built from the work folder's files alone."""

from __future__ import annotations

import csv
import json
import math
import shlex
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from convzoo.tools.gpu_check.plan import BENCH_CSV, BENCH_MD, ENV_FILE, JUNIT, LOGS, PROGRESS, STEPS_FILE, TABLES_JSON
from convzoo.tools.pytest_deadline import NOT_RUN


def _succeeded(status: str) -> bool:
    return status.startswith(("ok", "skipped"))

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


def _bench_file(work: Path, suffix: str) -> Path | None:
    """The bench's ``<device>.csv`` / ``.md`` in the work folder (one device per run; the newest if more)."""
    found = sorted((work / "bench").glob(f"*{suffix}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


