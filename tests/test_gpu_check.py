"""convzoo-gpu-check without a GPU: the plan (one budget, deadlines, timeouts that add up), argument errors, the
results folder (at most 8 files, no subfolders), the summary built from fake step outputs, steps that fail or
are stopped not stopping the others, the runner's interrupt-then-kill, the pytest deadline plugin, and one real
rehearsal of the whole plan on this CPU."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from _cli_helpers import assert_refused, minutes_cases, name_cases

from convzoo.tools import gpu_check as gc
from convzoo.tools import pytest_deadline
from convzoo.tools.bench import harness

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVZOO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gc.cli, "collect_env", lambda cuda=True: {"gpu": "Fake GPU", "driver": "1.0"})


def _timeouts(text: str) -> list[float]:
    return [float(t) for t in re.findall(r"^\w+: timeout (\d+) s", text, re.M)]


# ---------------------------------------------------------------------------------------------- the plan
@pytest.mark.parametrize("minutes", [2, 8, 30])
@pytest.mark.parametrize("rehearse", [False, True])
def test_dry_run_prints_one_budget_whose_timeouts_add_up(minutes, rehearse, tmp_path, cache, capsys, monkeypatch):
    out = tmp_path / "run"
    ran = []
    monkeypatch.setattr(gc.cli, "run_command", lambda *a, **k: ran.append(a))
    argv = ["--dry-run", "--out", str(out), "--minutes", str(minutes)] + (["--rehearse"] if rehearse else [])
    assert gc.main(argv) == 0
    text = capsys.readouterr().out
    timeouts = _timeouts(text)
    assert len(timeouts) == 3 and sum(timeouts) <= minutes * 60  # the whole budget: the bound
    assert sum(timeouts) <= minutes * 60 - gc.RESERVE_S + 1  # and the summary's seconds kept (+ rounding)
    assert f"# budget: {minutes} min = {minutes * 60} s" in text
    assert f"# results folder: {out} (at most 8 files: summary.md, run.json, tests-junit.xml" in text
    lines = text.splitlines()
    commands = {lines[i - 1].split(":")[0]: shlex.split(line.removeprefix("  $ "))
                for i, line in enumerate(lines) if line.startswith("  $ ")}
    assert list(commands) == ["tests", "tune", "bench"]
    tests, tune, bench = commands.values()
    assert tests[:3] == [PY, "-m", "pytest"] and tests[-1] == str(ROOT / "tests")
    assert {"convzoo.tools.pytest_deadline", "--convzoo-kernel-tests-first", "--convzoo-deadline"} <= set(tests)
    assert ("-n" in tests) == (not rehearse)  # the rehearsal stays one process
    assert tune[tune.index("--grid") + 1] == ("bench-tiny" if rehearse else "bench-quick")
    assert ("--tiny" if rehearse else "--quick") in bench and ("--device" in bench) == rehearse
    # each tool gets the minutes left until its deadline, less its start-up: at most its share
    for cmd, timeout in ((tune, timeouts[1]), (bench, timeouts[2])):
        assert 0 < float(cmd[cmd.index("--max-minutes") + 1]) * 60 < timeout
    assert not out.exists() and not ran and not cache.exists()


def test_the_steps_deadlines_and_timeouts():
    """Shares in order, a deadline before each end, the tests told an absolute time, the others minutes; the
    time a step leaves unused goes to the next (a later start, the same end)."""
    plan = gc.build_plan(["tests", "tune", "bench"], Path("/w"), 8, Path("/t"), xdist=True)
    assert [s.name for s in plan] == ["tests", "tune", "bench"]
    assert plan[-1].end_s == pytest.approx(8 * 60 - gc.RESERVE_S)
    assert sum(s.timeout_s for s in plan) == pytest.approx(plan[-1].end_s)
    for before, step in zip([None, *plan], plan):
        assert step.end_s - step.timeout_s == pytest.approx(before.end_s if before else 0)
        assert step.end_s - step.timeout_s < step.deadline_s < step.end_s
        assert step.end_s - step.deadline_s == pytest.approx(step.grace_s)
    tests, tune, _ = plan
    cmd = tests.command(0, 1000.0)
    assert cmd[cmd.index("--convzoo-deadline") + 1] == f"{1000 + tests.deadline_s:.1f}" and cmd[-1] == "/t"
    early, late = (float(c[c.index("--max-minutes") + 1]) for c in (tune.command(10, 0), tune.command(200, 0)))
    assert early > late > 0
    only = gc.build_plan(["bench"], Path("/w"), 8, None)
    assert len(only) == 1 and only[0].timeout_s == pytest.approx(8 * 60 - gc.RESERVE_S)  # the whole budget
    assert only[0].env["TRITON_INTERPRET"] is None and only[0].env[gc.GUARD] == "bench"
    rehearsal = gc.build_plan(["tune", "bench"], Path("/w"), 8, None, rehearse=True)
    assert [s.env["TRITON_INTERPRET"] for s in rehearsal] == ["1", None]
    assert all(s.env["CUDA_VISIBLE_DEVICES"] == "" for s in rehearsal)


@pytest.mark.parametrize("minutes, steps, error, message", [
    (1.5, ["tests"], ValueError, "minutes must be at least 2"),
    (float("nan"), ["tests"], ValueError, "minutes must be at least 2 and finite"),
    (float("inf"), ["tests"], ValueError, "and finite"),
    ("8", ["tests"], TypeError, "minutes must be a number, got str"),
    (True, ["tests"], TypeError, "got bool"),
    (8, ["tests", "lint"], ValueError, "steps must name some of tests,tune,bench"),
    (8, [], ValueError, "steps must name some of"),
])
def test_build_plan_refuses_bad_arguments(minutes, steps, error, message):
    with pytest.raises(error, match=re.escape(message)):
        gc.build_plan(steps, Path("/w"), minutes, None)


def test_dry_run_default_folder_steps_subset_and_missing_tests(cache, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(gc.cli, "default_tests", lambda: tmp_path / "no-tests-here")
    assert gc.main(["--dry-run", "--steps", "tests,bench"]) == 0
    text = capsys.readouterr().out
    gpu = gc.device_slug(torch.cuda.get_device_name()) if torch.cuda.is_available() else "no-gpu"
    folder = re.search(r"^# results folder: (\S*)", text, re.M).group(1)
    assert re.fullmatch(re.escape(str(cache / "gpu-check" / gpu)) + r"-\d{8}T\d{6}Z", folder), folder
    assert f"  SKIPPED: no tests folder at {tmp_path / 'no-tests-here'}" in text
    assert "tune:" not in text and "autotune" not in text
    assert sum(_timeouts(text)) <= 8 * 60  # two steps share the whole budget


def test_default_tests_are_the_checkouts(monkeypatch):
    assert (gc.default_tests() / "test_gpu_check.py").is_file()  # this checkout
    monkeypatch.setattr(gc.plan, "checkout_root", lambda: None)  # an installed package: no tests of ours
    assert gc.default_tests() is None
    text = gc.describe_plan(gc.build_plan(["tests"], Path("/w"), 8, None), Path("/r"), {}, 8, False, 0)
    assert "SKIPPED: no tests folder (convzoo is not imported from a checkout; pass --tests PATH)" in text


@pytest.mark.parametrize("argv, message", [
    *name_cases("--steps", "step", "tune", "foo", choices="tests,tune,bench"),
    *minutes_cases("--minutes", "0", "nan"),
    (["--minutes", "1"], "--minutes must be at least 2"),
    (["--minutes", "x"], "argument --minutes: invalid float value"),
    (["--tests", "/nonexistent/tests"], "--tests: /nonexistent/tests is not a folder"),
    (["--grid", "huge"], "invalid choice"),
])
def test_bad_arguments_exit_2_naming_the_argument(argv, message, capsys):
    assert_refused(lambda argv: gc.main([*argv, "--dry-run"]), argv, "convzoo-gpu-check", message, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_no_gpu_exits_1_and_writes_nothing(tmp_path, cache, capsys):
    assert gc.main(["--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "no CUDA GPU here" in err and "--rehearse" in err
    assert not (tmp_path / "run").exists() and not cache.exists()


def test_an_out_folder_that_cannot_hold_the_results_is_refused(tmp_path, fake_gpu, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        gc.main(["--out", str(tmp_path / "file" / "run")])
    assert e.value.code == 2 and "--out: cannot write results to" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        gc.main(["--out", str(busy)])
    assert e.value.code == 2 and "holds other files (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------- fake outputs
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="3" tests="7" time="1.0"><testcase classname="tests.test_unfold" name="test_a"/>
<testcase classname="tests.test_unfold" name="test_b"/><testcase classname="tests.test_fold" name="test_c"/>
<testcase classname="tests.test_fold" name="test_bad[bf16]"><failure message="boom">x</failure></testcase>
<testcase classname="tests.test_fold" name="test_gpu"><skipped message="no"/></testcase>
<testcase classname="tests.test_fold" name="test_late"><skipped message="{nr}">x</skipped></testcase>
<testcase classname="tests.test_unfold.TestX" name="test_late"><skipped message="{nr}">x</skipped></testcase>
</testsuite></testsuites>
""".replace("{nr}", pytest_deadline.NOT_RUN)


def _row(date, op, shape, mode, provider, speedup, noisy=""):
    """A row as convzoo-bench writes it (its own Row and CSV writer): ``noisy`` holds the reason, or ''."""
    return harness.Row(date, "Fake GPU", "2", "3", "abc", "do_bench", op, shape, mode, "float32", provider, 1.0, 0.9,
                       1.1, 6, 1.0, 1.0, float("nan"), float("nan"), 1.0, speedup, noisy)


def write_fake_bench(work):
    rows = [_row("2025-01-01T00:00:00Z", "unfold", "s1", "fwd", "F.unfold", 100.0)]  # an earlier run: left out
    new = "2025-02-02T00:00:00Z"
    rows += [_row(new, "unfold", "s1", "fwd", "convzoo", 1.0), _row(new, "unfold", "s1", "fwd", "F.unfold", 2.0),
             _row(new, "unfold", "s2", "fwd", "convzoo", 1.0), _row(new, "unfold", "s3", "fwd", "F.unfold", 4.5),
             _row(new, "unfold", "s2", "fwd", "F.unfold", 50.0, noisy="spread p80/p20 1.50 > 1.3"),
             _row(new, "unfold", "s1", "bwd", "F.unfold", 0.5), _row(new, "unfold", "s1", "fwd", "unfoldNd", 3.0),
             _row(new, "unfold", "s2", "fwd", "unfoldNd", float("nan"))]  # no convzoo time: no speedup
    harness.append_csv(work / "bench" / "fake-gpu.csv", rows)
    (work / "bench" / "fake-gpu.md").write_text("# bench tables\n")
    for op in ("unfold", "fold", "local_conv"):  # the plots: a folder the results folder must not get
        (work / "bench" / "fake-gpu").mkdir(parents=True, exist_ok=True)
        (work / "bench" / "fake-gpu" / f"{op}.png").write_bytes(b"\x89PNG fake")


def write_fake_tables(work):
    for kernel, n in (("unfold", 3), ("fold", 2)):
        path = work / "tables" / "fake-gpu" / f"{kernel}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        configs = {f"float32|L={2 ** i}|R=8": {"meta": {}, "num_warps": 4, "num_stages": 1} for i in range(n)}
        path.write_text(json.dumps({"kernel": kernel, "configs": configs}))


def test_hostile_step_outputs_never_stop_the_summary(tmp_path, monkeypatch):
    """A junit report with odd counts, a CSV of garbage: the summary says so, it does not raise."""
    (tmp_path / "steps.json").write_text(json.dumps([{"name": "tests", "status": "failed (exit 1)", "seconds": 1},
                                                     {"name": "bench", "status": "ok", "seconds": 1}]))
    (tmp_path / "tests-junit.xml").write_text('<testsuite tests="3.0" failures="x"/>')
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "g.csv").write_bytes(b"date,\x00\xff\nnoisy,speedup\n")
    text = gc.build_summary(tmp_path)
    assert "no junit report (tests-junit.xml) and no progress file" in text and "No peer rows with a speedup." in text
    (tmp_path / "tests-junit.xml").write_text('<testsuite tests="2" failures="1" errors="1" skipped="0">'
                                             '<testcase name="t"><failure/><error/></testcase></testsuite>')
    assert "- ran 2: 0 passed, 1 failed, 1 errors, 0 skipped; 0 not run" in gc.build_summary(tmp_path)
    (tmp_path / "tests-progress.tsv").write_bytes(b"collected\tmany\n\xff\tx\npassed\t\nfailed")  # garbage lines
    (tmp_path / "tests-junit.xml").unlink()
    assert "- ran 0: 0 passed" in gc.build_summary(tmp_path)
    monkeypatch.setattr(gc.results, "build_summary", lambda work: 1 / 0)
    out = tmp_path / "out"
    out.mkdir()
    gc.publish(tmp_path, out)
    assert "The summary could not be built: ZeroDivisionError" in (out / "summary.md").read_text()


def test_summary_from_fake_step_outputs(tmp_path):
    work = tmp_path
    (work / "env.json").write_text(json.dumps({"gpu": "Fake GPU 80GB", "driver": "555.42", "torch": "2.9",
                                               "triton": "3.5", "python": "3.12", "date": "2025-02-02 00:00:00Z",
                                               "git_sha": "abc1234", "budget": "8 min",
                                               "peers": {"unfoldNd": "0.2.3", "einconv": "missing"}}))
    steps = [{"name": "tests", "status": "failed (exit 1)", "seconds": 75.4, "log": "tests.log", "timeout_s": 232,
              "command": ["python", "-m", "pytest"]},
             {"name": "tune", "status": "ok, cut at its deadline", "seconds": 90, "log": "tune.log"},
             {"name": "bench", "status": "ok", "seconds": 3, "log": "bench.log"}]
    (work / "steps.json").write_text(json.dumps(steps))
    (work / "tests-junit.xml").write_text(JUNIT)
    write_fake_tables(work)
    (work / "tune.log").write_text("...\n--max-minutes reached: stopping during fold x\n")
    write_fake_bench(work)
    text = gc.build_summary(work)
    for fact in ("# convzoo GPU check: Fake GPU 80GB", "- driver: 555.42", "- torch: 2.9", "- triton: 3.5",
                 "- python: 3.12", "- git: abc1234", "- date (UTC): 2025-02-02 00:00:00Z", "- budget: 8 min",
                 "- peers missing: einconv"):
        assert fact in text, fact
    assert "| tests | failed (exit 1) | 1m 15s | 3m 52s | tests.log |" in text
    assert "| tune | ok, cut at its deadline | 1m 30s | - | tune.log |" in text
    assert "- ran 5: 3 passed, 1 failed, 0 errors, 1 skipped; 2 not run (past the deadline)" in text
    assert "- not run, by file: test_fold.py 1, test_unfold.py 1" in text
    assert "- failing: `tests.test_fold::test_bad[bf16]`" in text
    assert "- 5 table keys in tables.json: fold 2, unfold 3" in text and "stopped at its deadline" in text
    assert "Run of 2025-02-02T00:00:00Z: 8 rows, 1 noisy." in text and "quiet rows only" in text
    assert "| unfold | fwd | float32 | F.unfold | 3x | 2x | 4.5x | 2 |" in text  # sqrt(2 · 4.5); not the noisy 50
    assert "| unfold | bwd | float32 | F.unfold | 0.5x | 0.5x | 0.5x | 1 |" in text
    assert "- best: unfold s3 fwd float32 vs F.unfold: 4.5x" in text
    assert "- worst: unfold s1 bwd float32 vs F.unfold: 0.5x" in text
    assert "100x" not in text and "50x" not in text and "convzoo |" not in text  # earlier run, noisy row, self
    assert "`python -m pytest`" in text
    assert "last lines of" not in text  # no log here: nothing to show


def test_a_stopped_tests_step_is_counted_from_its_progress_file(tmp_path):
    (tmp_path / "steps.json").write_text(json.dumps([{"name": "tests", "status": "stopped at its timeout (52 s)",
                                                      "log": "tests.log"}]))
    (tmp_path / "tests-progress.tsv").write_text(
        "collected\t6\npassed\ttests/test_a.py::t1\nfailed\ttests/test_a.py::t2\npassed\ttests/test_b.py::t3\n"
        "error\ttests/test_b.py::t3\nskipped\ttests/test_b.py::t4\nnotrun\ttests/test_c.py::t5\n")
    text = gc.build_summary(tmp_path)
    assert "- no junit report (tests-junit.xml): the step was stopped before pytest wrote it" in text
    assert "- ran 4: 1 passed, 1 failed, 1 errors, 1 skipped; 1 not run" in text  # t3 passed, then its teardown erred
    assert "- 1 of the 6 collected never reported (the step was stopped)" in text
    assert "- not run, by file: test_c.py 1" in text and "- failing: `tests/test_b.py::t3`" in text


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
    steps = [{"name": "tests", "status": "stopped at its timeout (232 s)", "seconds": 232, "log": "tests.log"},
             {"name": "tune", "status": "failed (exit 1)", "log": "tune.log"},
             {"name": "bench", "status": "pending", "log": "bench.log"}]
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    text = gc.build_summary(tmp_path)
    assert "# convzoo GPU check: (no GPU recorded)" in text
    assert "no junit report (tests-junit.xml) and no progress file" in text
    assert "- 0 table keys in tables.json: none" in text and "| bench | pending | - | - | bench.log |" in text
    assert "no bench CSV" not in text  # a pending step has no details yet


# ---------------------------------------------------------------------------------------------- the results folder
def _assert_fits(folder: Path) -> list[str]:
    """What a lent GPU machine sends back: at most 8 files, at most 2 folders deep, plain names."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) <= gc.MAX_FILES, files
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        assert len(rel.parts) <= 2 and all(gc.NAME_RE.fullmatch(part) for part in rel.parts), rel
    return sorted(p.name for p in files)


def test_the_result_names_fit_what_comes_back():
    assert len(gc.OUTPUTS) == len(set(gc.OUTPUTS)) <= gc.MAX_FILES == 8
    assert all(gc.NAME_RE.fullmatch(n) and "/" not in n for n in gc.OUTPUTS)
    assert gc.STATIC_CSV in gc.OUTPUTS  # the slot kept for the static report


def test_publish_packs_a_crowded_work_folder_into_at_most_8_files(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "env.json").write_text(json.dumps({"gpu": "Fake GPU"}))
    (work / "steps.json").write_text(json.dumps([{"name": "tests", "status": "ok", "log": "tests.log"}]))
    (work / "tests-junit.xml").write_text(JUNIT)
    (work / "tests-progress.tsv").write_text("collected\t1\n")
    for name in ("tests", "tune", "bench"):
        (work / f"{name}.log").write_text(f"{name} log\n")
    write_fake_tables(work)
    write_fake_bench(work)
    (work / "cache" / "autotune" / "x").mkdir(parents=True)
    (work / "cache" / "autotune" / "x" / "unfold.json").write_text("{}")
    written = gc.publish(work, out)
    assert _assert_fits(out) == sorted(written) == sorted(
        ["summary.md", "run.json", "tests-junit.xml", "tables.json", "bench.csv", "bench.md", "logs.tar.gz"])
    run = json.loads((out / "run.json").read_text())
    assert run["env"]["gpu"] == "Fake GPU" and run["steps"][0]["status"] == "ok"
    assert run["tests"]["passed"] == 3 and run["tests"]["not_run"] == 2
    tables = json.loads((out / "tables.json").read_text())
    assert sorted(tables) == ["fake-gpu/fold.json", "fake-gpu/unfold.json"]
    assert len(tables["fake-gpu/unfold.json"]["configs"]) == 3
    assert (out / "bench.md").read_text() == "# bench tables\n"
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = sorted(tar.getnames())
    assert names == ["bench.log", "bench/fake-gpu/fold.png", "bench/fake-gpu/local_conv.png",
                     "bench/fake-gpu/unfold.png", "env.json", "steps.json", "tests-progress.tsv", "tests.log",
                     "tune.log"]


def test_an_earlier_runs_tables_seed_the_next_run(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    good = {"kernel": "unfold", "configs": {"k": {}}}
    (out / "tables.json").write_text(json.dumps({"fake-gpu/unfold.json": good, "../evil/x.json": good,
                                                 "a/b/c.json": good, "fake-gpu/notes.txt": good, "x/y.json": 3}))
    assert gc.seed_tables(out, work) == 1
    assert json.loads((work / "cache" / "autotune" / "fake-gpu" / "unfold.json").read_text()) == good
    assert json.loads((work / "tables" / "fake-gpu" / "unfold.json").read_text()) == good
    assert not (tmp_path / "evil").exists() and sorted(p.name for p in (work / "tables").iterdir()) == ["fake-gpu"]
    (out / "tables.json").write_text("not json")
    assert gc.seed_tables(out, tmp_path / "work2") == 0


# ---------------------------------------------------------------------------------------------- running the steps
def test_a_failing_step_does_not_stop_the_others(tmp_path, fake_gpu, monkeypatch, capsys):
    """tests fail, tune is stopped at its timeout, bench passes: all three run, in order, each with the time left
    until its end and its own environment, the results folder is rewritten after each step (at most 8 files
    throughout), and the exit code is 1."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    folder = tmp_path / "run"
    calls = []

    def fake_run(command, log_path, cwd, timeout_s, env, stop_s=None):
        step = log_path.stem
        work = log_path.parent
        calls.append((step, timeout_s, stop_s, "TRITON_INTERPRET" in env, env[gc.GUARD],
                      env["CONVZOO_CACHE_DIR"] == str(work / "cache")))
        log_path.write_text(f"{step} output\n")
        _assert_fits(folder)
        summary = (folder / "summary.md").read_text()
        assert f"| {step} | running |" in summary  # written before the step starts
        if step == "tests":
            (work / "tests-junit.xml").write_text(JUNIT)
            return 1, False
        if step == "tune":
            assert "| tests | failed (exit 1) |" in summary and "3 passed, 1 failed" in summary
            write_fake_tables(work)
            return -2, True
        write_fake_bench(work)
        return 0, False

    monkeypatch.setattr(gc.cli, "run_command", fake_run)
    assert gc.main(["--out", str(folder), "--minutes", "4"]) == 1
    plan = gc.build_plan(list(gc.STEPS), tmp_path, 4, None)
    assert [c[0] for c in calls] == ["tests", "tune", "bench"]
    for (step, timeout, stop, interpret, guard, cache), planned in zip(calls, plan):
        assert timeout <= planned.end_s and stop == pytest.approx(planned.grace_s / 2)
        assert not interpret and guard == step and cache
    records = json.loads((folder / "run.json").read_text())["steps"]
    assert [(r["name"], r["status"]) for r in records] == [
        ("tests", "failed (exit 1)"), ("tune", f"stopped at its timeout ({calls[1][1]:.0f} s)"), ("bench", "ok")]
    assert [r["timeout_s"] for r in records] == [round(c[1]) for c in calls]  # what each was given
    summary = (folder / "summary.md").read_text()
    assert "| bench | ok |" in summary and "| F.unfold | 3x |" in summary and "5 table keys" in summary
    assert _assert_fits(folder) == ["bench.csv", "bench.md", "logs.tar.gz", "run.json", "summary.md", "tables.json",
                                    "tests-junit.xml"]
    with tarfile.open(folder / "logs.tar.gz") as tar:
        assert {"tests.log", "tune.log", "bench.log"} <= set(tar.getnames())
    out = capsys.readouterr().out
    assert f"results in {folder}" in out and "[2/3] tune: stopped at its timeout" in out


def test_all_steps_ok_exit_0_skipped_and_cut_steps_are_not_failures(tmp_path, fake_gpu, monkeypatch):
    monkeypatch.setattr(gc.cli, "default_tests", lambda: tmp_path / "none")

    def fake_run(command, log_path, *a, **k):
        log_path.write_text("# --max-minutes 1 reached: 3 rows not timed\n" if log_path.stem == "bench" else "")
        return 0, False

    monkeypatch.setattr(gc.cli, "run_command", fake_run)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "bench.csv").write_text("an earlier run's\n")  # ours: replaced, or removed when not written again
    (folder / ".summary.md.tmp").write_text("a write that was stopped\n")
    assert gc.main(["--out", str(folder)]) == 0
    assert not (folder / ".summary.md.tmp").exists()
    records = json.loads((folder / "run.json").read_text())["steps"]
    assert [r["status"] for r in records] == ["skipped", "ok", "ok, cut at its deadline"]
    assert "Skipped: no tests folder at" in (folder / "summary.md").read_text()
    assert not (folder / "bench.csv").exists()


def test_a_step_that_cannot_start_is_a_failure_and_one_without_time_is_skipped(tmp_path, fake_gpu, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(gc.cli.time, "monotonic", lambda: clock[0])

    def fake_run(command, log_path, cwd, timeout_s, env, stop_s=None):
        if log_path.stem == "tune":
            raise FileNotFoundError("no such python")
        clock[0] += timeout_s  # tests use all of their time and then some
        return 0, False

    monkeypatch.setattr(gc.cli, "run_command", fake_run)
    assert gc.main(["--out", str(tmp_path / "run"), "--steps", "tests,tune,bench", "--minutes", "2"]) == 1
    records = json.loads((tmp_path / "run" / "run.json").read_text())["steps"]
    assert [r["status"] for r in records] == ["ok", "failed (could not start)", "ok"]
    assert "no such python" in records[1]["note"]
    clock[0] = 0.0
    monkeypatch.setattr(gc.cli, "run_command", lambda command, log_path, cwd, timeout_s, env, stop_s=None: (
        clock.__setitem__(0, clock[0] + 10_000), (0, False))[1])  # the first step ran far past the budget
    assert gc.main(["--out", str(tmp_path / "run2"), "--steps", "tune,bench", "--minutes", "2"]) == 0
    records = json.loads((tmp_path / "run2" / "run.json").read_text())["steps"]
    assert [r["status"] for r in records] == ["ok", "skipped"] and "no time left" in records[1]["note"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_run_command_logs_interrupts_first_and_ends_the_whole_process_group(tmp_path):
    log = tmp_path / "step.log"
    rc, stopped = gc.run_command([PY, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                                 log, tmp_path, 30, dict(os.environ))
    assert (rc, stopped) == (3, False)
    text = log.read_text()
    assert text.startswith(f"$ {shlex.quote(PY)} -c") and "out\n" in text and "err\n" in text
    # a step that writes its results when interrupted (pytest's junit report) gets to write them (8 s: the child
    # must be inside its try before the interrupt), also when this process ignores SIGINT (inherited by a child:
    # run_command restores the default)
    marker = tmp_path / "wrote-results"
    script = f"import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    open({str(marker)!r}, 'w')"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc, stopped = gc.run_command([PY, "-c", script], log, None, 8, dict(os.environ), stop_s=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped and marker.exists()
    # one that ignores the interrupt and TERM is killed, its children with it
    pidfile = tmp_path / "grandchild.pid"
    script = ("import signal, subprocess, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); p = subprocess.Popen(['sleep', '60']); "
              f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    start = time.monotonic()
    rc, stopped = gc.run_command([PY, "-c", script], log, None, 3, dict(os.environ), stop_s=1.5)
    assert stopped and rc is not None and rc < 0 and time.monotonic() - start < 30
    assert "stopped at its 3.0 s timeout" in log.read_text()
    grandchild = int(pidfile.read_text())
    for _ in range(50):  # the killed group is reaped asynchronously by its new parent
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild)


# ---------------------------------------------------------------------------------------------- the pytest plugin
PLUGIN_TESTS = '''
import pytest

@pytest.fixture
def kernel_device():
    return "cpu"

@pytest.fixture(params=["triton", "torch"])
def path(request):
    return request.param

def test_plain():
    pass

def test_path(path):
    pass

@pytest.mark.gpu
def test_on_gpu():
    pass

def test_kernel(kernel_device):
    pass

def test_fails():
    assert False

def test_stops_the_clock(request):
    request.config.option.convzoo_deadline = 0.0  # as if the deadline passed here

def test_after_the_deadline():
    pass
'''


def test_the_pytest_plugin_orders_stops_at_the_deadline_and_reports_progress(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    (tmp_path / "test_some.py").write_text(PLUGIN_TESTS)
    (tmp_path / "test_x_kernels.py").write_text("def test_in_a_kernel_file():\n    pass\n")
    (tmp_path / "test_kernel_static.py").write_text("def test_static():\n    pass\n")  # not a kernel run
    progress, junit = tmp_path / "progress.tsv", tmp_path / "junit.xml"
    run = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "convzoo.tools.pytest_deadline",
                          "--convzoo-kernel-tests-first", "--convzoo-deadline", "1e12", "--convzoo-progress",
                          str(progress), "--junitxml", str(junit), "test_kernel_static.py", "test_some.py",
                          "test_x_kernels.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST")})
    assert run.returncode == 1, run.stdout + run.stderr  # test_fails
    lines = [line.split("\t") for line in progress.read_text().splitlines()]
    assert lines[0] == ["collected", "10"]
    assert [(o, n.split("::")[1]) for o, n in lines[1:]] == [
        ("passed", "test_on_gpu"), ("passed", "test_path[triton]"), ("passed", "test_kernel"),
        ("passed", "test_in_a_kernel_file"), ("passed", "test_static"), ("passed", "test_plain"),
        ("passed", "test_path[torch]"),
        ("failed", "test_fails"), ("passed", "test_stops_the_clock"), ("notrun", "test_after_the_deadline")]
    c = gc.junit_counts(junit)
    assert (c["passed"], c["failed"], c["not_run"], dict(c["not_run_files"])) == (8, 1, 1, {"test_some.py": 1})
    p = gc.progress_counts(progress)  # the same counts from either file
    assert all(p[k] == c[k] for k in ("passed", "failed", "errors", "skipped", "not_run")) and p["unreported"] == 0


def test_the_plugin_is_off_unless_asked(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_b():\n    pass\n\ndef test_a(kernel_device):\n    pass\n\n"
                                          "import pytest\n@pytest.fixture\ndef kernel_device():\n    return 1\n")
    run = subprocess.run([PY, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "convzoo.tools.pytest_deadline",
                          "test_one.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST")})
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.index("test_b PASSED") < run.stdout.index("test_a PASSED")  # collection order kept


# ---------------------------------------------------------------------------------------------- the rehearsal
@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get(gc.GUARD)), reason="a rehearsal's own tests step: no rehearsal inside it")
def test_the_rehearsal_runs_the_whole_plan_within_its_budget(tmp_path):
    """``--rehearse --minutes 2`` on this CPU, as CI runs it: it ends within the budget (+ 30 s for Python's own
    start), fills at most 8 files no folder deep, and its summary names each step with a status. Mostly one
    process at a time (the suite's pytest runs without workers)."""
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(CONVZOO_CACHE_DIR=str(tmp_path / "cache"))
    start = time.monotonic()
    run = subprocess.run([PY, "-m", "convzoo.tools.gpu_check", "--rehearse", "--minutes", "2", "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2 * 60 + 60)
    elapsed = time.monotonic() - start
    assert elapsed < 2 * 60 + 30, elapsed
    names = _assert_fits(out)
    assert {"summary.md", "run.json", "logs.tar.gz"} <= set(names), run.stdout + run.stderr
    summary = (out / "summary.md").read_text()
    steps = json.loads((out / "run.json").read_text())["steps"]
    assert [s["name"] for s in steps] == ["tests", "tune", "bench"]
    for s in steps:
        assert s["status"] not in ("pending", "running") and f"| {s['name']} | {s['status']} |" in summary
    assert "(rehearsal on the CPU)" in summary and "- ran " in summary  # the tests step reported its counts
    assert run.returncode == (0 if all(gc._succeeded(s["status"]) for s in steps) else 1), run.stdout + run.stderr
