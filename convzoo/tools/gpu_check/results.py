"""convzoo-gpu-check's results folder: at most :data:`~convzoo.tools.gpu_check.plan.MAX_FILES` files, each
rewritten atomically from the work folder after every step, and an earlier run's tables seeding the next."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

from convzoo.tools.gpu_check.plan import (
    BENCH_CSV,
    BENCH_MD,
    ENV_FILE,
    JUNIT,
    LOGS,
    NAME_RE,
    OUTPUTS,
    RUN_JSON,
    STEPS_FILE,
    SUMMARY,
    TABLES_JSON,
)
from convzoo.tools.gpu_check.summary import _bench_file, _read_json, build_summary, test_counts


def _write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


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


