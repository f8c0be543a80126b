"""convzoo-gpu-check without a GPU: the dry run (commands, folder, budgets), argument errors, the summary
built from fake step outputs, steps that fail or time out not stopping the others, and the runner's timeout."""

import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch

from convzoo.tools import gpu_check as gc
from convzoo.tools.bench import harness

PY = sys.executable


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVZOO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------------------------------------- dry run
def test_dry_run_prints_the_commands_folder_and_budgets_and_runs_nothing(tmp_path, cache, capsys, monkeypatch):
    out = tmp_path / "run"
    tests = tmp_path / "mytests"
    tests.mkdir()
    ran = []
    monkeypatch.setattr(gc, "run_command", lambda *a: ran.append(a))
    argv = ["--dry-run", "--out", str(out), "--max-minutes", "4", "--grid", "small", "--tests", str(tests)]
    assert gc.main(argv) == 0
    text = capsys.readouterr().out
    assert f"# results folder: {out}" in text
    assert "at most 15 min in all" in text  # 3 × (4 min + 60 s)
    lines = text.splitlines()
    assert f"tests: timeout 300 s (pytest has no budget of its own), log {out / 'tests.log'}, in {tmp_path}" in lines
    assert "  $ " + shlex.join([PY, "-m", "pytest", "-q", str(tests), "--junitxml", str(out / "tests-junit.xml")]) \
        in lines
    assert any(line.startswith(f"tune: budget 4 min, timeout 300 s, log {out / 'tune.log'}") for line in lines)
    assert "  $ " + shlex.join([PY, "-m", "convzoo.tools.autotune", "--grid", "small", "--out", str(out / "tables"),
                                "--max-minutes", "4"]) in lines
    assert any(line.startswith(f"bench: budget 4 min, timeout 300 s, log {out / 'bench.log'}") for line in lines)
    assert "  $ " + shlex.join([PY, "-m", "convzoo.tools.bench", "--full", "--out", str(out / "bench"),
                                "--max-minutes", "4"]) in lines
    assert not out.exists() and not ran and not cache.exists()


def test_dry_run_default_folder_steps_subset_and_missing_tests(cache, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(gc, "default_tests", lambda: tmp_path / "no-tests-here")
    assert gc.main(["--dry-run", "--steps", "tests,bench"]) == 0
    text = capsys.readouterr().out
    gpu = gc.device_slug(torch.cuda.get_device_name()) if torch.cuda.is_available() else "no-gpu"
    folder = re.search(r"^# results folder: (.*)$", text, re.M).group(1)
    assert re.fullmatch(re.escape(str(cache / "gpu-check" / gpu)) + r"-\d{8}T\d{6}Z", folder), folder
    assert f"  SKIPPED: no tests folder at {tmp_path / 'no-tests-here'}" in text
    assert "bench: budget 9 min, timeout 600 s" in text and "tune:" not in text and "autotune" not in text
    assert "at most 10 min in all" in text  # the skipped step takes no time


def test_default_tests_are_the_checkouts(monkeypatch):
    assert (gc.default_tests() / "test_gpu_check.py").is_file()  # this checkout
    monkeypatch.setattr(gc, "checkout_root", lambda: None)  # an installed package: no tests of ours
    assert gc.default_tests() is None
    text = gc.describe_plan(gc.build_plan(["tests"], Path("/r"), 9, "all", None), Path("/r"), {})
    assert "SKIPPED: no tests folder (convzoo is not imported from a checkout; pass --tests PATH)" in text


def test_hostile_step_outputs_never_stop_the_summary(tmp_path):
    """A junit report with odd counts, a CSV of garbage: the summary says so, it does not raise."""
    (tmp_path / "steps.json").write_text(json.dumps([{"name": "tests", "status": "failed (exit 1)", "seconds": 1},
                                                     {"name": "bench", "status": "ok", "seconds": 1}]))
    (tmp_path / "tests-junit.xml").write_text('<testsuite tests="3.0" failures="x"/>')
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "g.csv").write_bytes(b"date,\x00\xff\nnoisy,speedup\n")
    text = gc.build_summary(tmp_path)
    assert "no junit report" in text and "No peer rows with a speedup." in text
    (tmp_path / "tests-junit.xml").write_text('<testsuite tests="2" failures="1" errors="1" skipped="0">'
                                             '<testcase name="t"><failure/><error/></testcase></testsuite>')
    assert "- 0 passed, 1 failed, 1 errors" in gc.build_summary(tmp_path)  # never below zero
    monkeypatch_target = gc.build_summary
    try:
        gc.build_summary = lambda folder: 1 / 0
        assert "The summary could not be built: ZeroDivisionError" in gc.write_summary(tmp_path).read_text()
    finally:
        gc.build_summary = monkeypatch_target


@pytest.mark.parametrize("argv, message", [
    (["--steps", "tests,foo"], "--steps: unknown step 'foo'; choose from tests,tune,bench"),
    (["--steps", ","], "--steps: no step named in ','; choose from tests,tune,bench"),
    (["--steps", "tune,tune"], "--steps: 'tune' is named twice"),
    (["--max-minutes", "0"], "--max-minutes must be positive and finite"),
    (["--max-minutes", "nan"], "--max-minutes must be positive and finite"),
    (["--tests", "/nonexistent/tests"], "--tests: /nonexistent/tests is not a folder"),
    (["--grid", "huge"], "invalid choice"),
])
def test_bad_arguments_exit_2_naming_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gc.main([*argv, "--dry-run"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and err.startswith("convzoo-gpu-check: error: ") and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_no_gpu_exits_1_and_writes_nothing(tmp_path, cache, capsys):
    assert gc.main(["--out", str(tmp_path / "run")]) == 1
    assert "no CUDA GPU here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not cache.exists()


def test_unwritable_out_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gc, "collect_env", lambda: {"gpu": "Fake GPU"})
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        gc.main(["--out", str(tmp_path / "file" / "run")])
    assert e.value.code == 2 and "--out: cannot write results to" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- fake outputs
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="1" tests="5" time="1.0"><testcase classname="tests.test_unfold" name="test_a"/>
<testcase classname="tests.test_unfold" name="test_b"/><testcase classname="tests.test_fold" name="test_c"/>
<testcase classname="tests.test_fold" name="test_bad[bf16]"><failure message="boom">x</failure></testcase>
<testcase classname="tests.test_fold" name="test_gpu"><skipped message="no"/></testcase></testsuite></testsuites>
"""
def _row(date, op, shape, mode, provider, speedup, noisy=""):
    """A row as convzoo-bench writes it (its own Row and CSV writer): ``noisy`` holds the reason, or ''."""
    return harness.Row(date, "Fake GPU", "2", "3", "abc", "do_bench", op, shape, mode, "float32", provider, 1.0, 0.9,
                       1.1, 6, 1.0, 1.0, float("nan"), float("nan"), 1.0, speedup, noisy)


def write_fake_bench(folder):
    rows = [_row("2025-01-01T00:00:00Z", "unfold", "s1", "fwd", "F.unfold", 100.0)]  # an earlier run: left out
    new = "2025-02-02T00:00:00Z"
    rows += [_row(new, "unfold", "s1", "fwd", "convzoo", 1.0), _row(new, "unfold", "s1", "fwd", "F.unfold", 2.0),
             _row(new, "unfold", "s2", "fwd", "convzoo", 1.0), _row(new, "unfold", "s3", "fwd", "F.unfold", 4.5),
             _row(new, "unfold", "s2", "fwd", "F.unfold", 50.0, noisy="spread p80/p20 1.50 > 1.3"),
             _row(new, "unfold", "s1", "bwd", "F.unfold", 0.5), _row(new, "unfold", "s1", "fwd", "unfoldNd", 3.0),
             _row(new, "unfold", "s2", "fwd", "unfoldNd", float("nan"))]  # no convzoo time: no speedup
    harness.append_csv(folder / "bench" / "fake-gpu.csv", rows)


def write_fake_tables(folder):
    for kernel, n in (("unfold", 3), ("fold", 2)):
        path = folder / "tables" / "fake-gpu" / f"{kernel}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        configs = {f"float32|L={2 ** i}|R=8": {"meta": {}, "num_warps": 4, "num_stages": 1} for i in range(n)}
        path.write_text(json.dumps({"kernel": kernel, "configs": configs}))


def test_summary_from_fake_step_outputs(tmp_path):
    folder = tmp_path
    (folder / "env.json").write_text(json.dumps({"gpu": "Fake GPU 80GB", "driver": "555.42", "torch": "2.9",
                                                 "triton": "3.5", "python": "3.12", "date": "2025-02-02 00:00:00Z",
                                                 "git_sha": "abc1234"}))
    steps = [{"name": "tests", "status": "failed (exit 1)", "seconds": 75.4, "log": "tests.log",
              "command": ["python", "-m", "pytest"]},
             {"name": "tune", "status": "ok", "seconds": 540, "log": "tune.log"},
             {"name": "bench", "status": "ok", "seconds": 3, "log": "bench.log"}]
    (folder / "steps.json").write_text(json.dumps(steps))
    (folder / "tests-junit.xml").write_text(JUNIT)
    write_fake_tables(folder)
    (folder / "tune.log").write_text("...\n--max-minutes reached: stopping before fold x\n")
    write_fake_bench(folder)
    text = gc.build_summary(folder)
    for fact in ("# convzoo GPU check: Fake GPU 80GB", "- driver: 555.42", "- torch: 2.9", "- triton: 3.5",
                 "- python: 3.12", "- git: abc1234", "- date (UTC): 2025-02-02 00:00:00Z"):
        assert fact in text, fact
    assert "| tests | failed (exit 1) | 1m 15s | tests.log |" in text and "| tune | ok | 9m 00s | tune.log |" in text
    assert "- 3 passed, 1 failed, 0 errors, 1 skipped" in text
    assert "- failing: `tests.test_fold::test_bad[bf16]`" in text
    assert "- 5 table keys in tables/: fold 2, unfold 3" in text and "stopped at its budget" in text
    assert "Run of 2025-02-02T00:00:00Z: 8 rows, 1 noisy." in text and "quiet rows only" in text
    assert "| unfold | fwd | float32 | F.unfold | 3x | 2x | 4.5x | 2 |" in text  # sqrt(2 · 4.5); not the noisy 50
    assert "| unfold | bwd | float32 | F.unfold | 0.5x | 0.5x | 0.5x | 1 |" in text
    assert "| unfold | fwd | float32 | unfoldNd | 3x | 3x | 3x | 1 |" in text
    assert "- best: unfold s3 fwd float32 vs F.unfold: 4.5x" in text
    assert "- worst: unfold s1 bwd float32 vs F.unfold: 0.5x" in text
    assert "100x" not in text and "50x" not in text and "convzoo |" not in text  # earlier run, noisy row, self
    assert "`python -m pytest`" in text
    assert "last lines of" not in text  # no log here: nothing to show


def test_summary_shows_the_end_of_a_failed_steps_log(tmp_path):
    steps = [{"name": "bench", "status": "failed (exit 2)", "seconds": 1, "log": "bench.log"},
             {"name": "tune", "status": "ok", "seconds": 1, "log": "tune.log"}]
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    (tmp_path / "bench.log").write_text("".join(f"line {i}\n" for i in range(20)) + "error: --max-minutes?\n")
    (tmp_path / "tune.log").write_text("tune went fine\n")
    text = gc.build_summary(tmp_path)
    assert "last lines of bench.log:\n```\nline 13\n" in text and "line 19\nerror: --max-minutes?\n```" in text
    assert "line 12" not in text and "tune went fine" not in text


def test_summary_of_missing_outputs_says_so(tmp_path):
    steps = [{"name": "tests", "status": "timed out (600 s)", "seconds": 600, "log": "tests.log"},
             {"name": "tune", "status": "failed (exit 1)", "log": "tune.log"},
             {"name": "bench", "status": "pending", "log": "bench.log"}]
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    text = gc.build_summary(tmp_path)
    assert "# convzoo GPU check: (no GPU recorded)" in text
    assert "no junit report (tests-junit.xml): the run was cut short" in text
    assert "- 0 table keys in tables/: none" in text and "| bench | pending | - | bench.log |" in text
    assert "no bench CSV" not in text  # a pending step has no details yet


# ---------------------------------------------------------------------------------------------- running the steps
def test_a_failing_step_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    """tests fail, tune times out, bench passes: all three run, in order, each gets its log and its
    status, the summary is rewritten after each step, and the exit code is 1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gc, "collect_env", lambda: {"gpu": "Fake GPU", "driver": "1.0"})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    folder = tmp_path / "run"
    calls = []

    def fake_run(command, log_path, cwd, timeout_s, env):
        step = log_path.stem
        calls.append((step, timeout_s, "TRITON_INTERPRET" in env))
        log_path.write_text(f"{step} output\n")
        summary = (folder / "summary.md").read_text()
        assert f"| {step} | running |" in summary  # written before the step starts
        if step == "tests":
            (folder / "tests-junit.xml").write_text(JUNIT)
            return 1, False
        if step == "tune":
            assert "| tests | failed (exit 1) |" in summary and "3 passed, 1 failed" in summary
            write_fake_tables(folder)
            return -9, True
        write_fake_bench(folder)
        return 0, False

    monkeypatch.setattr(gc, "run_command", fake_run)
    assert gc.main(["--out", str(folder), "--max-minutes", "2"]) == 1
    assert calls == [("tests", 180, False), ("tune", 180, False), ("bench", 180, False)]
    records = json.loads((folder / "steps.json").read_text())
    assert [(r["name"], r["status"]) for r in records] == [
        ("tests", "failed (exit 1)"), ("tune", "timed out (180 s)"), ("bench", "ok")]
    summary = (folder / "summary.md").read_text()
    assert "| bench | ok |" in summary and "| F.unfold | 3x |" in summary and "5 table keys" in summary
    assert [p.name for p in sorted(folder.glob("*.log"))] == ["bench.log", "tests.log", "tune.log"]
    out = capsys.readouterr().out
    assert f"results in {folder}" in out and "[2/3] tune: timed out" in out


def test_all_steps_ok_exit_0_and_a_skipped_step_is_not_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gc, "collect_env", lambda: {"gpu": "Fake GPU"})
    monkeypatch.setattr(gc, "default_tests", lambda: tmp_path / "none")
    monkeypatch.setattr(gc, "run_command", lambda command, log_path, *a: (log_path.write_text(""), (0, False))[1])
    assert gc.main(["--out", str(tmp_path / "run")]) == 0
    records = json.loads((tmp_path / "run" / "steps.json").read_text())
    assert [r["status"] for r in records] == ["skipped", "ok", "ok"]
    assert "Skipped: no tests folder at" in (tmp_path / "run" / "summary.md").read_text()


def test_a_step_that_cannot_start_is_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gc, "collect_env", lambda: {"gpu": "Fake GPU"})

    def fake_run(command, log_path, *a):
        if log_path.stem == "tune":
            raise FileNotFoundError("no such python")
        return 0, False

    monkeypatch.setattr(gc, "run_command", fake_run)
    assert gc.main(["--out", str(tmp_path / "run"), "--steps", "tune,bench"]) == 1
    records = json.loads((tmp_path / "run" / "steps.json").read_text())
    assert [r["status"] for r in records] == ["failed", "ok"] and "no such python" in records[0]["note"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_run_command_logs_and_its_timeout_ends_the_whole_process_group(tmp_path):
    log = tmp_path / "step.log"
    rc, timed_out = gc.run_command([PY, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                                   log, tmp_path, 30, dict(os.environ))
    assert (rc, timed_out) == (3, False)
    text = log.read_text()
    assert text.startswith(f"$ {shlex.quote(PY)} -c") and "out\n" in text and "err\n" in text
    pidfile = tmp_path / "grandchild.pid"
    script = f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); open({str(pidfile)!r}, 'w')" \
             ".write(str(p.pid)); time.sleep(60)"
    start = time.monotonic()
    rc, timed_out = gc.run_command([PY, "-c", script], log, None, 1.5, dict(os.environ))
    assert timed_out and rc is not None and rc < 0 and time.monotonic() - start < 30
    assert "stopped after the 1.5 s timeout" in log.read_text()
    grandchild = int(pidfile.read_text())
    for _ in range(50):  # the killed group is reaped asynchronously by its new parent
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild)
