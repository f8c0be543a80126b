"""The bench (``convzoo-bench``) on CPU with tiny shapes: every provider runs, rows are well-formed CSV,
the results go where the user was told and nowhere tracked, noisy rows are marked, the overhead rows and
the pytest-benchmark entry cover the same problems. No timing assertions: fake timers decide the numbers
where a test reads them."""

import hashlib
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cli_helpers import (
    assert_absent_cuda_device_refused,
    assert_refused,
    cases,
    device_cases,
    minutes_cases,
    name_cases,
)

import convzoo.tools.bench.cli as bench
from convzoo.tools.bench import harness, ops, ops_patches, ops_sparse, timing

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--reps", "2", "--min-time", "0.01"]


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("CONVZOO_CACHE_DIR", str(folder))
    return folder


class FakeTimer:
    """Samples chosen per provider (by the call's closure): ``ms[provider name]``; records call order."""

    name = "fake"

    def __init__(self, ms=None, spread=None):
        self.ms, self.spread, self.calls = ms or {}, spread or {}, []

    def __call__(self, fn):
        name = _provider_of(fn)
        self.calls.append(name)
        base = self.ms.get(name, 1.0)
        hi = base * self.spread.get(name, 1.0)
        return [base, base, base, hi, hi, hi]


def _provider_of(fn):
    """The provider a harness callable runs (its closure holds the Provider), or the limits' lambdas."""
    for cell in fn.__closure__ or ():
        v = cell.cell_contents
        if isinstance(v, harness.Provider):
            return v.name
    return "limits"


class FakeLoad:
    def __init__(self, value):
        self.value = value

    def start(self):
        pass

    def stop(self):
        return self.value


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def test_tiny_run_prints_every_provider_and_writes_results(capsys, no_interpreter, tmp_path):
    assert bench.main(["--tiny", "--device", "cpu", *FAST, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "plain-torch paths" in out and "measured: copy" in out and "timer: torch.utils.benchmark" in out
    assert f"# results: {tmp_path} (--out)" in out
    assert "[  1/" in out  # progress: one line per row while timing
    assert out.count(harness.SPEEDUP_LEGEND) == 8  # one legend under each op's table
    assert out.count(ops.NOTES["masked_conv"]) == 1  # and masked_conv's note under its own
    assert out.count(ops.NOTES["coactivation"]) == 1
    assert out.count(ops.NOTES["dynamic_sparse"]) == 1
    assert out.count(ops.NOTES["kfac"]) == 1
    unfold_2d, fold_3d, local_2d = "N2 C3 8×8 k3 p1 s1", "N1 C2 4×4×4 k2 p0 s1", "N2 C3→4 6×6 k3 p1 s1"
    expected = {("unfold", unfold_2d, p) for p in ("convzoo", "F.unfold", "unfoldNd")}
    expected |= {("fold", fold_3d, p) for p in ("convzoo", "unfoldNd")}
    expected |= {("local_conv", local_2d, p) for p in ("convzoo", "hypnettorch", "unfold+bmm", "unfold+einsum")}
    kfac = ("convzoo", "unfold+matmul", "einconv")
    expected |= {("patch_covariance", f"{unfold_2d} {m}", p) for m in ("expand", "reduce")
                 for p in (*kfac, "curvlinops")}
    expected |= {("patch_covariance", f"{fold_3d} {m}", p) for m in ("expand", "reduce") for p in kfac}
    # masked_conv: every density on a 2-d and a 3-d shape; on a CPU the convzoo rows say they time the CPU path
    masked_2d, masked_3d = "N2 C16→64 8×8 k3 p1 s1", "N1 C4→64 4×4×4 k3 p1 s1"
    expected |= {("masked_conv", f"{masked_2d} d1 dense", p) for p in ("convzoo (CPU path)", "F.conv2d(x, w*mask)")}
    expected |= {("masked_conv", f"{masked_3d} d0.1 unstructured", p)
                 for p in ("convzoo (CPU path)", "F.conv3d(x, w*mask)")}
    expected |= {("coactivation", "N2 C4→8 8×8 k3 p1 s1", p)
                 for p in ("convzoo (CPU path)", "conv_weight(x>0, y>0)", ops.SEED_F2)}
    expected |= {("dynamic_sparse", "3×conv N2 C4→16→16→16 8×8 k3 p1", label) for label, *_ in ops._DYNAMIC_KINDS}
    expected |= {("kfac", "N2 C3→8 8×8 2 convs (cnn_tiny)", p)
                 for p in ("convzoo", "convzoo A only", "plain step", "curvlinops")}
    (csv_path,) = tmp_path.glob("*.csv")
    rows = harness.read_csv(csv_path)
    assert list(rows[0]) == harness.Row.columns()
    assert expected <= {(r["op"], r["shape"], r["provider"]) for r in rows}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}  # --tiny: no overhead rows
    assert {r["mode"] for r in rows if r["op"] == "patch_covariance"} == {"fwd"}  # a statistic: no backward
    assert {r["mode"] for r in rows if r["op"] == "coactivation"} == {"fwd"}  # a statistic too
    assert {r["mode"] for r in rows if r["op"] == "dynamic_sparse"} == {"fwd"}  # the call is the training step
    assert {r["mode"] for r in rows if r["op"] == "kfac"} == {"fwd"}  # its own forward and backward inside
    assert not any(r["provider"] == "curvlinops" and "×4×" in r["shape"] for r in rows)  # curvlinops: 2-d only
    assert not any("compile" in r["provider"] for r in rows)  # --full only
    masked = [r for r in rows if r["op"] == "masked_conv"]
    assert len(masked) == 2 * 5 * 2 * 2  # shapes x densities x modes x providers
    assert {r["provider"] for r in masked if "×4×" in r["shape"]} == {"convzoo (CPU path)", "F.conv3d(x, w*mask)"}
    assert {r["provider"] for r in masked if "×4×" not in r["shape"]} == {"convzoo (CPU path)",
                                                                           "F.conv2d(x, w*mask)"}
    assert not any(r["provider"] == "convzoo" for r in masked)  # never unlabelled on a CPU
    for r in rows:
        assert r["device"].startswith("CPU") and r["torch"] and r["date"].endswith("Z")
        assert r["timer"].startswith("torch.utils.benchmark") and int(r["samples"]) >= 2
        p50, p20, p80 = float(r["ms_p50"]), float(r["ms_p20"]), float(r["ms_p80"])
        assert 0 < p20 <= p50 <= p80
        assert float(r["peak_mib"]) >= 0 and float(r["gb_per_s"]) > 0 and float(r["pct_copy_bw"]) > 0
        # FLOP columns only where FLOPs matter; empty (NaN) for data movement, not 0.000
        assert math.isnan(float(r["tflop_per_s"])) == (r["op"] in ("unfold", "fold"))
        assert math.isnan(float(r["pct_matmul_peak"])) == (r["op"] in ("unfold", "fold"))
        if r["provider"] in ("convzoo", "convzoo (CPU path)"):
            assert float(r["speedup"]) == 1.0
    md = csv_path.with_suffix(".md").read_text()
    assert md.count(f"| {local_2d} |") == 8 and "Measured limits" in md and md.count(harness.SPEEDUP_LEGEND) == 8
    assert md.count(ops.NOTES["masked_conv"]) == 1 and "### masked_conv (FLOPs matter" in md
    assert md.count(ops.NOTES["coactivation"]) == 1 and "### coactivation (FLOPs matter" in md
    assert md.count(ops.NOTES["dynamic_sparse"]) == 1 and "### dynamic_sparse (FLOPs matter" in md
    assert "### unfold (data movement" in md and "### local_conv (FLOPs matter" in md
    assert "### patch_covariance (FLOPs matter" in md
    # a second run appends rows under the same header
    assert bench.main(["--tiny", "--device", "cpu", "--ops", "local_conv", "--modes", "bwd", *FAST, "--no-memory",
                       "--out", str(tmp_path)]) == 0
    rows2 = harness.read_csv(csv_path)
    assert len(rows2) == len(rows) + 4 and {r["mode"] for r in rows2[len(rows):]} == {"bwd"}
    assert math.isnan(float(rows2[-1]["peak_mib"]))


def test_plots_have_spread_labels_and_titles(no_interpreter, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes
    import matplotlib.figure

    bars, labels, titles = [], [], []
    real_bar, real_suptitle = matplotlib.axes.Axes.bar, matplotlib.figure.Figure.suptitle
    real_ylabel = matplotlib.axes.Axes.set_ylabel
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, *a, **k: bars.append(k) or real_bar(self, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel",
                        lambda self, t, **k: labels.append(t) or real_ylabel(self, t, **k))
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda self, t, **k: titles.append(t) or real_suptitle(self, t, **k))
    timer = FakeTimer(spread={"convzoo": 1.2})
    assert bench.main(["--overhead", "--device", "cpu", "--ops", "fold", "--reps", "2", "--no-memory",
                       "--out", str(tmp_path)], timer=timer, load=FakeLoad(0.0)) == 0
    (png,) = tmp_path.glob("*/overhead.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.main(["--tiny", "--device", "cpu", "--ops", "fold", "--reps", "2", "--no-memory",
                       "--out", str(tmp_path)], timer=timer, load=FakeLoad(0.0)) == 0
    (png,) = tmp_path.glob("*/*.png")  # the plots show the latest run: the overhead plot of the last is gone
    assert png.name == "fold.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # error bars p20-p80: the convzoo bars have a non-zero upper error (p80 - p50 > 0 with this timer)
    assert all("yerr" in k for k in bars) and any(max(k["yerr"][1]) > 0 for k in bars)
    assert titles and all("float32" in t and "CPU" in t for t in titles)
    assert any(lb.startswith("time per call, µs") for lb in labels) and any("ms (p50" in lb for lb in labels)


def test_results_default_to_the_user_cache_and_never_touch_tracked_files(cache, no_interpreter, capsys):
    """The default run writes under $CONVZOO_CACHE_DIR/bench, says so, and leaves bench/reference and the
    checkout as they were (git status, where this is a git checkout)."""
    ref = ROOT / "bench" / "reference"
    before = _tree_digest(ref)
    git = shutil.which("git") and (ROOT / ".git").exists()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout \
        if git else None
    assert bench.main(["--tiny", "--device", "cpu", "--ops", "unfold", "--no-memory", "--reps", "2"],
                      timer=FakeTimer(), load=FakeLoad(0.0)) == 0
    out = capsys.readouterr().out
    assert f"# results: {cache / 'bench'} (the user cache; --out DIR to choose)" in out
    assert len(list((cache / "bench").glob("*.csv"))) == 1 and len(list((cache / "bench").glob("*.md"))) == 1
    assert _tree_digest(ref) == before
    if git:
        assert subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                              text=True).stdout == status


def test_update_reference_writes_only_to_the_checkouts_reference_folder(tmp_path, monkeypatch, capsys,
                                                                           no_interpreter, cache):
    assert bench.reference_dir() == ROOT / "bench" / "reference"  # this test runs from a checkout
    ref = tmp_path / "reference"
    ref.mkdir()
    monkeypatch.setattr(bench, "reference_dir", lambda: ref)
    monkeypatch.setattr(ops, "for_size", lambda size, chosen: ops.problems("tiny", ["fold"]))  # a fast "quick"
    assert bench.main(["--quick", "--device", "cpu", "--no-memory", "--reps", "2", "--update-reference"],
                      timer=FakeTimer(), load=FakeLoad(0.0)) == 0
    assert f"# results: {ref} (the checkout's reference results" in capsys.readouterr().out
    assert len(list(ref.glob("*.csv"))) == 1 and not (cache / "bench").exists()
    monkeypatch.setattr(bench, "reference_dir", lambda: None)  # an installed package: no checkout
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--update-reference"])
    assert e.value.code == 2 and "--update-reference: this convzoo is not a checkout" in capsys.readouterr().err


def test_noisy_rows_are_marked_by_spread_and_by_load(no_interpreter, capsys):
    timer = FakeTimer(ms={"convzoo": 1.0, "F.unfold": 2.0, "unfoldNd": 4.0}, spread={"unfoldNd": 1.5})
    args = ["--tiny", "--device", "cpu", "--ops", "unfold", "--modes", "fwd", "--reps", "2", "--no-memory",
            "--no-save"]
    rows = _rows(args, timer, FakeLoad(0.0), capsys)
    by = {r.provider: r for r in rows if r.shape.startswith("N2")}
    assert by["convzoo"].noisy == "" and by["F.unfold"].noisy == ""
    assert by["unfoldNd"].noisy.startswith("spread p80/p20 1.50 > 1.3")
    assert by["F.unfold"].speedup == 2.0 and by["unfoldNd"].speedup == pytest.approx(6.0 / 1.0, rel=0.5)
    out = capsys.readouterr().out
    assert "rows are noisy" in out and "noisy" in out.splitlines()[-1]
    loaded = _rows(args, FakeTimer(), FakeLoad(timing.load_bound() + 0.5), capsys)
    assert loaded and all("other processes busy on" in r.noisy for r in loaded)
    assert all(r.noisy == "" for r in _rows(args, FakeTimer(), FakeLoad(None), capsys))  # no /proc/stat


def _rows(argv, timer, load, capsys):
    """The rows a run hands to the table (captured from harness.format_table's argument)."""
    seen = []
    real = harness.format_table

    def spy(rows, markdown=False, notes=None):
        seen.extend(rows)
        return real(rows, markdown, notes)

    harness.format_table = spy
    try:
        assert bench.main(argv, timer=timer, load=load) == 0
    finally:
        harness.format_table = real
    return seen


def test_what_is_in_the_way_of_the_results_is_refused_before_any_timing(tmp_path, no_interpreter, capsys):
    slug = harness.device_slug(harness.environment(torch.device("cpu"))["device"])
    argv = ["--tiny", "--device", "cpu", "--ops", "fold", "--reps", "2", "--no-memory", "--out", str(tmp_path)]
    for in_the_way in (tmp_path / f"{slug}.md", tmp_path / f"{slug}.csv"):
        in_the_way.mkdir()
        timer = FakeTimer()
        assert bench.main(argv, timer=timer, load=FakeLoad(0.0)) == 2 and timer.calls == []
        assert f"--out: {in_the_way} is a folder; the bench writes a file there" in capsys.readouterr().err
        in_the_way.rmdir()
    (tmp_path / slug).write_text("")  # where the plots go
    assert bench.main(argv, timer=FakeTimer(), load=FakeLoad(0.0)) == 2
    assert "is a file; the bench writes a dir there" in capsys.readouterr().err
    (tmp_path / slug).unlink()
    (tmp_path / f"{slug}.csv").write_bytes(b"date,\x00\xff\n1,2\n")  # not a CSV of ours: moved aside, kept
    assert bench.main(argv, timer=FakeTimer(), load=FakeLoad(0.0)) == 0
    assert (tmp_path / f"{slug}.old-1.csv").read_bytes() == b"date,\x00\xff\n1,2\n"
    assert list(harness.read_csv(tmp_path / f"{slug}.csv")[0]) == harness.Row.columns()


def test_rows_are_saved_as_they_are_timed(tmp_path, no_interpreter):
    """A run stopped half way (Ctrl-C, gpu-check's hard timeout) keeps the rows it timed."""

    class StopsLater(FakeTimer):
        def __call__(self, fn):
            if len(self.calls) == 2 * 3 * 2 + 2:  # limits (2), then the first (shape, mode): 3 providers x 2 rounds
                raise KeyboardInterrupt
            return super().__call__(fn)

    with pytest.raises(KeyboardInterrupt):
        bench.main(["--tiny", "--device", "cpu", "--ops", "unfold", "--reps", "2", "--no-memory", "--out",
                    str(tmp_path)], timer=StopsLater(), load=FakeLoad(0.0))
    (csv_path,) = tmp_path.glob("*.csv")
    rows = harness.read_csv(csv_path)
    assert [r["provider"] for r in rows] == ["convzoo", "F.unfold", "unfoldNd"] * 2  # two (shape, mode) groups


def test_compiled_peers_never_fall_back_to_eager_silently():
    """Past dynamo's recompile limit a compiled function runs eager code; under the bench's guard that is an
    error instead of rows labelled compile(...) that time eager code."""
    import torch._dynamo

    f = torch.compile(lambda t: t * 2, dynamic=False, backend="eager")
    torch._dynamo.reset()
    with harness.compile_guard(limit=1):
        f(torch.ones(2))
        with pytest.raises(Exception, match=r"recompil"):
            f(torch.ones(3))
    torch._dynamo.reset()


def test_git_sha_and_home_paths(monkeypatch, tmp_path):
    from convzoo.autotune import user_cache_dir
    from convzoo.tools import _cli

    if (ROOT / ".git").exists() and shutil.which("git"):
        assert _cli.git_sha().removesuffix("+dirty").isalnum()
    monkeypatch.setattr(_cli, "checkout_root", lambda: ROOT / "bench")  # sources inside another repository
    assert _cli.git_sha() == ""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CONVZOO_CACHE_DIR", "~/cz")  # quoted: no shell expanded it
    assert user_cache_dir() == tmp_path / "cz" / "autotune"
    assert bench.parse_args(["--out=~/zz", "--no-save"]).out == tmp_path / "zz"


def test_providers_are_timed_in_interleaved_rounds(no_interpreter):
    timer = FakeTimer()
    problems = ops.problems("tiny", ["local_conv"])
    rows = harness.run(problems, ops.providers(), ["fwd"], torch.device("cpu"), torch.float32,
                       harness.Limits(1e10, 1e11, "float32"), rounds=3, timer=timer, load=FakeLoad(0.0),
                       memory=False, progress=None)
    provs = [r.provider for r in rows]
    assert timer.calls == provs * 3  # round robin, not all rounds of one provider, then the next
    assert all(r.samples == 18 for r in rows)  # 3 rounds x 6 samples


def test_foreign_load_reads_other_processes_busy_time(tmp_path):
    stat = tmp_path / "stat"
    meter = timing.ForeignLoad(str(stat))
    hz = os.sysconf("SC_CLK_TCK")
    stat.write_text("cpu  100 0 100 5000 0 0 0 0 0 0\n")
    meter.start()
    t = __import__("time")
    t.sleep(0.2)
    stat.write_text(f"cpu  {100 + 2 * hz} 0 100 5000 0 0 0 0 0 0\n")  # 2 CPU-seconds busy in 0.2 s
    load = meter.stop()
    assert 5 < load <= 10  # ~10 CPUs minus this process's own (small) CPU time
    assert timing.ForeignLoad(str(tmp_path / "missing")).stop() is None
    meter2 = timing.ForeignLoad(str(tmp_path / "missing"))
    meter2.start()
    assert meter2.stop() is None
    assert timing.noise(1.0, 1.2, None) == "" and "spread" in timing.noise(1.0, 1.4, None)


def test_overhead_rows(no_interpreter, capsys):
    """--overhead: µs per eager call of each op against F.unfold / F.fold / unfold+einsum only."""
    rows = _rows(["--overhead", "--device", "cpu", *FAST, "--no-save", "--no-memory"], None, None, capsys)
    out = capsys.readouterr().out
    section = out[out.index("## host overhead"):]
    assert "p50 µs" in section and out.count("## ") == 1 and harness.SPEEDUP_LEGEND in section
    assert {(r.op, r.provider) for r in rows} == {("unfold", "convzoo"), ("unfold", "F.unfold"), ("fold", "convzoo"),
                                                  ("fold", "F.fold"), ("local_conv", "convzoo"),
                                                  ("local_conv", "unfold+einsum"), ("patch_covariance", "convzoo"),
                                                  ("patch_covariance", "unfold+matmul"),
                                                  ("masked_conv", "convzoo (CPU path)"),
                                                  ("masked_conv", "F.conv2d(x, w*mask)"),
                                                  ("coactivation", "convzoo (CPU path)"),
                                                  ("coactivation", "conv_weight(x>0, y>0)"),
                                                  ("kfac", "convzoo"), ("kfac", "plain step")}
    assert {r.mode for r in rows} == {"call", "call+grad"} and all(r.shape.startswith("N2 C3") for r in rows)
    assert {r.mode for r in rows if r.op in ("patch_covariance", "coactivation")} == {"call"}  # no grad
    assert all(r.timer.startswith("torch.utils.benchmark") for r in rows)
    assert f"{rows[0].ms_p50 * 1e3:.1f}" in section  # printed in µs
    # --quick carries the overhead rows too
    quick = [p for p in ops.for_size("quick") if p.overhead]
    assert {p.op for p in quick} == set(ops.OPS) - {"dynamic_sparse"}  # a step of layers: no call of its own


def test_max_minutes_stops_starting_rows(no_interpreter, capsys):
    rows = _rows(["--tiny", "--device", "cpu", "--max-minutes", "1e-9", "--reps", "2", "--no-memory",
                  "--no-save"], FakeTimer(), FakeLoad(0.0), capsys)
    assert len({(r.op, r.shape, r.mode) for r in rows}) == 1  # the first (problem, mode) only
    assert "# --max-minutes 1e-09 reached:" in capsys.readouterr().out


def test_a_missing_peer_drops_its_column_with_one_line(monkeypatch, no_interpreter, capsys):
    monkeypatch.setattr(ops_patches, "unfoldNd", None)
    monkeypatch.setattr(ops_patches, "convNd_kfc", None)
    monkeypatch.setattr(ops_patches, "extract_patches", None)
    rows = _rows(["--tiny", "--device", "cpu", "--reps", "2", "--no-memory", "--no-save"], FakeTimer(),
                 FakeLoad(0.0), capsys)
    assert rows and not any(r.provider in ("unfoldNd", "einconv", "curvlinops") for r in rows)
    assert not any(r.op in ("fold", "patch_covariance") and r.shape.startswith("N1") and r.provider != "convzoo"
                   for r in rows)
    assert {r.provider for r in rows if r.op == "patch_covariance"} == {"convzoo", "unfold+matmul"}
    lines = capsys.readouterr().out.splitlines()
    assert sum("unfoldNd is not installed" in ln and "pip install unfoldNd" in ln for ln in lines) == 1
    assert sum("einconv is not installed" in ln and "pip install einconv" in ln for ln in lines) == 1
    assert sum("curvlinops is not installed" in ln and "curvlinops-for-pytorch" in ln for ln in lines) == 1


def test_csv_append_and_an_older_schema_moved_aside(tmp_path):
    row = harness.Row("2026-01-01T00:00:00Z", "dev", "2.11", "3.6", "abc", "fake", "unfold", "N1 C1 4×4 k1 p0 s1",
                      "fwd", "float32", "convzoo", 1.5, 1.0, 2.0, 6, 3.0, 5.0, float("nan"), float("nan"), 1.25,
                      1.0, "")
    path = tmp_path / "x.csv"
    assert harness.append_csv(path, [row, row]) is None
    assert harness.append_csv(path, [row]) is None
    back = harness.read_csv(path)
    assert len(back) == 3 and float(back[0]["ms_p50"]) == 1.5 and back[0]["shape"] == "N1 C1 4×4 k1 p0 s1"
    assert back[0]["tflop_per_s"] == "nan" and list(back[0]) == harness.Row.columns()
    old = tmp_path / "y.csv"
    old.write_text("date,device,op,ms_p50\n2026,dev,unfold,1.0\n")
    moved = harness.append_csv(old, [row])
    assert moved == tmp_path / "y.old-1.csv" and moved.read_text().startswith("date,device,op,ms_p50")
    assert list(harness.read_csv(old)[0]) == harness.Row.columns()
    table = harness.format_table([row])
    assert "## unfold (data movement" in table and "1.500" in table and "TFLOP/s" not in table
    assert harness.format_table([row], markdown=True).splitlines()[3].startswith("|---|")


def test_shape_labels_state_the_shape():
    assert ops.problems("quick", ["unfold"])[0].label == "N8 C64 32×32 k3 p1 s1"
    kfac = [p.label for p in ops.problems("quick", ["patch_covariance"])]
    assert kfac[:2] == ["N8 C64 32×32 k3 p1 s1 expand", "N8 C64 32×32 k3 p1 s1 reduce"]
    assert {p.ndim for p in ops.problems("quick", ["patch_covariance"])} == {2, 3}
    local = [p.label for p in ops.problems("quick", ["local_conv"])]
    assert "N16 C32→32 32×32 k3 p1 s1" in local and "N16 C32→32 32×32 k3 p1 s1 hypnettorch-W" in local
    masked = [p.label for p in ops.problems("quick", ["masked_conv"])]
    resnet = "N8 C64→64 32×32 k3 p1 s1"
    assert masked[:5] == [f"{resnet} d1 dense", f"{resnet} d0.5 block", f"{resnet} d0.25 block",
                          f"{resnet} d0.1 block (0.111 kept)", f"{resnet} d0.1 unstructured"]  # 4 of 36 tiles
    assert "N8 C64→128 32×32 k3 p1 s2 d0.5 block" in masked and len(masked) == 3 * 5
    assert {p.ndim for p in ops.problems("quick", ["masked_conv"])} == {2, 3}
    ids = [p.id for size in ops.SIZES for p in ops.problems(size)]
    assert all(i.isascii() and " " not in i for i in ids)
    for size in ops.SIZES:  # one id per density: pytest-benchmark's ids and groups tell them apart
        masked_ids = [p.id for p in ops.problems(size, ["masked_conv"])]
        assert len(set(masked_ids)) == len(masked_ids)


@pytest.mark.parametrize("argv, message", [
    *name_cases("--ops", "op", "fold", "conv"),
    *name_cases("--modes", "mode", "fwd", "sideways"),
    (["--overhead", "--modes", "bwd"], "--modes: the --overhead rows have their own modes"),
    (["--tiny", "--update-reference"], "--update-reference: the reference results are whole --quick or --full "
                                       "runs, not --tiny"),
    *[(["--update-reference", flag, value], f"not {flag}") for flag, value in (("--ops", "fold"),
                                                                               ("--max-minutes", "2"))],
    *cases("--dtype", "argument --dtype: invalid choice", "int8", ","),
    *[(argv, "not allowed with") for argv in (["--quick", "--full"], ["--overhead", "--tiny"],
                                              ["--out", "x", "--update-reference"])],
    (["--reps", "1"], "--reps must be at least 2"),
    *cases("--min-time", "--min-time must be in (0, 60)", "0", "nan"),
    (["--threads", "0"], "--threads must be between 1 and"),
    (["--threads", "100000"], "--threads must be between 1 and this machine's"),
    *minutes_cases("--max-minutes", "-1", "inf"),
    *device_cases("bench runs on cpu or cuda"),
    pytest.param(["--device", "cuda"], "--device: 'cuda', but there is no CUDA device here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")),
])
def test_bad_arguments_exit_with_usage(argv, message, capsys):
    save = ["--no-save"] if "--out" not in argv and "--update-reference" not in argv else []
    assert_refused(bench.parse_args, [*argv, *save], "convzoo-bench", message, capsys)


def test_a_cuda_device_that_is_not_here_is_refused(monkeypatch, capsys):
    assert_absent_cuda_device_refused(bench.parse_args, ["--no-save"], "convzoo-bench", 1, monkeypatch, capsys)


@pytest.mark.parametrize("where", ["a_file", "under_a_file", "read_only"])
def test_unwritable_out_is_refused_before_any_timing(where, tmp_path, monkeypatch, capsys, no_interpreter):
    """Checked up front: the run would otherwise fail at its first write, after all the timing."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = {"a_file": blocker, "under_a_file": blocker / "results", "read_only": tmp_path / "ro"}[where]
    if where == "read_only":
        out.mkdir()
        out.chmod(0o555)
        if os.access(out, os.W_OK):
            pytest.skip("permissions are not enforced for this user (root)")
    timed = []
    monkeypatch.setattr(harness, "measure_limits", lambda *a: timed.append(a))
    with pytest.raises(SystemExit) as e:
        bench.main(["--tiny", "--device", "cpu", "--out", str(out)])
    assert e.value.code == 2 and "--out: cannot write results to" in capsys.readouterr().err and not timed
    assert bench.parse_args(["--out", str(out), "--no-save"]).no_save  # nothing to write: not asked
    writable = tmp_path / "new" / "results"
    assert bench.parse_args(["--out", str(writable)]).out == writable and list(writable.iterdir()) == []


def test_defaults_per_size():
    assert bench.parse_args([]).size == "quick" and bench.parse_args([]).modes == ["fwd", "fwd+bwd"]
    full = bench.parse_args(["--full"])
    assert full.modes == ["fwd", "bwd", "fwd+bwd"] and full.ops == list(ops.OPS)
    assert {p.op for p in ops.problems("full")} == set(ops.OPS)


def test_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bench.main(["--tiny", "--device", "cpu", "--no-save"]) == 2


def test_the_console_scripts_are_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'convzoo-bench = "convzoo.tools.bench.cli:main"' in text
    assert 'convzoo-autotune = "convzoo.tools.autotune:main"' in text
    run = subprocess.run([sys.executable, "-m", "convzoo.tools.bench", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "speedup = peer time / convzoo time" in run.stdout


def _pytest_bench(*args, timeout=300):
    # a clean pytest: not an xdist worker (pytest-benchmark disables itself under xdist)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env["TRITON_INTERPRET"] = "0"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
                           str(ROOT / "bench"), "--bench-device", "cpu", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # ~12 s: a pytest subprocess that imports torch and times every row
def test_pytest_benchmark_times_the_same_problems_and_providers(tmp_path):
    """`pytest bench --benchmark-only` parametrizes over the bench's own tables (the same (op, shape, mode,
    provider) as convzoo-bench runs, in its order), times each and records what it is; nothing of it is in
    the default test run."""
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "b.json"
    run = _pytest_bench("--benchmark-only", "-q", "--bench-size", "tiny", "--benchmark-max-time=0.0001",
                        "--benchmark-min-rounds=2", "--benchmark-warmup=off", f"--benchmark-json={out}")
    assert run.returncode == 0, run.stdout + run.stderr
    import json

    benches = json.loads(out.read_text())["benchmarks"]
    cpu = torch.device("cpu")
    jobs = harness.jobs(ops.for_size("tiny"), ops.providers(), ["fwd", "fwd+bwd"], cpu)
    want = [(p.op, p.label, m, v.label(cpu)) for p, m, provs in jobs for v in provs]
    got = [tuple(b["extra_info"][k] for k in ("op", "shape", "mode", "provider")) for b in benches]
    assert sorted(got) == sorted(want) and len(want) > 10
    assert all(b["group"] == " ".join(g[:3]) for b, g in zip(benches, got))  # providers of a row side by side
    assert all(b["stats"]["rounds"] >= 2 and b["stats"]["median"] > 0 for b in benches)
    assert [p.label for p in ops.for_size("quick") if p.overhead] == [p.label for p in ops.for_size("overhead")]
    assert 'testpaths = ["tests"]' in (ROOT / "pyproject.toml").read_text()  # `pytest` alone never runs them


def test_pytest_benchmark_refuses_the_interpreter():
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(ROOT / "bench"),
                          "--collect-only", "-q"], cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "TRITON_INTERPRET is set" in run.stderr


@pytest.mark.slow  # ~8 s: builds and installs a wheel, then runs the tools in subprocesses
def test_installed_without_a_checkout_the_tools_work(tmp_path):
    """A wheel built from the tracked files, installed into a bare folder and run from elsewhere: the console
    scripts are declared, the bench runs and writes where it is told, and there is no reference folder to
    update (that needs a checkout)."""
    src, site, out = tmp_path / "src", tmp_path / "site", tmp_path / "out"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split() \
        if (ROOT / ".git").exists() and shutil.which("git") else None
    if tracked:
        for name in tracked:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    else:
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv*", ".git", "build", "*.egg-info"))
    isolation = ["--no-build-isolation"] if __import__("importlib").util.find_spec("setuptools") else []
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", *isolation, "-w", str(tmp_path / "whl"), str(src)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "whl").glob("convzoo-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    (entry_points,) = site.glob("convzoo-*.dist-info/entry_points.txt")
    scripts = entry_points.read_text()
    assert "convzoo-bench = convzoo.tools.bench.cli:main" in scripts
    assert "convzoo-autotune = convzoo.tools.autotune:main" in scripts
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(PYTHONPATH=str(site), TRITON_INTERPRET="0", CONVZOO_CACHE_DIR=str(tmp_path / "cache"))
    code = ("import sys, convzoo; from convzoo.tools.bench import cli; "
            f"assert convzoo.__file__.startswith({str(site)!r}), convzoo.__file__; "
            "assert cli.reference_dir() is None; sys.exit(cli.main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", code, "--tiny", "--ops", "fold", "--modes", "fwd", *FAST,
                          "--no-memory", "--device", "cpu", "--out", str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"# results: {out} (--out)" in run.stdout and len(list(out.glob("*.csv"))) == 1


@pytest.mark.gpu
def test_tiny_run_on_cuda(tmp_path):
    """On a GPU: do_bench samples, CUDA peak memory, and the GPU's name in every row."""
    assert bench.main(["--tiny", "--device", "cuda", "--dtype", "float16", "--reps", "2", "--out", str(tmp_path)]) == 0
    (csv_path,) = tmp_path.glob("*.csv")
    rows = harness.read_csv(csv_path)
    assert rows and all(r["device"] == torch.cuda.get_device_name() for r in rows)
    assert all(0 < float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"]) for r in rows)
    assert {r["timer"] for r in rows if r["mode"] in harness.MODES} == {"triton.testing.do_bench"}


def _tiles_all_or_none(mask, groups, tile):
    """Brute force: every tile-square of each group's [C_out/G, C_in/G·∏k] matrix is all kept or all masked."""
    m = mask.reshape(groups, mask.shape[0] // groups, -1)
    for g in range(groups):
        for i in range(0, m.shape[1], tile):
            for j in range(0, m.shape[2], tile):
                t = m[g, i:i + tile, j:j + tile]
                if not (t.all() or not t.any()):
                    return False
    return True


@pytest.mark.parametrize("shape, groups, density", [((64, 64, 3, 3), 1, 0.25), ((128, 64, 3, 3), 1, 0.1),
                                                    ((64, 16, 3, 3, 3), 2, 0.5), ((40, 5, 7), 1, 0.5)])
def test_masked_conv_bench_masks_are_seeded_whole_tiles(shape, groups, density):
    """The block masks keep whole 32×32 tiles of each group's weight matrix, round(ρ·tiles) of them per group
    (edge tiles partial), the same on every build; the unstructured ones keep about ρ of the weights."""
    tile = ops.MASK_TILE
    mask = ops._mask(shape, groups, density, "block")
    assert mask.shape == shape and mask.dtype == torch.bool and _tiles_all_or_none(mask, groups, tile)
    rows, cols = -(-shape[0] // groups // tile), -(-math.prod(shape[1:]) // tile)
    per_group = mask.reshape(groups, shape[0] // groups, -1)[:, ::tile, ::tile]  # one corner per tile
    assert per_group.flatten(1).sum(1).tolist() == [max(1, round(density * rows * cols))] * groups
    assert torch.equal(mask, ops._mask(shape, groups, density, "block"))
    loose = ops._mask(shape, groups, density, "unstructured")
    assert torch.equal(loose, ops._mask(shape, groups, density, "unstructured"))
    assert abs(loose.float().mean().item() - density) < 0.1 and not _tiles_all_or_none(loose, groups, 2)
    assert ops._mask(shape, groups, 1.0, "dense").all()
    with pytest.raises(ValueError, match="structure"):
        ops._mask(shape, groups, density, "random")


def test_masked_conv_bench_rows_time_the_masked_convolution(no_interpreter):
    """Each provider computes F.convNd(x, w·mask) of the problem's own mask; the FLOPs are the dense
    convolution's at every density; the compiled peer is a --full extra, named for its rank."""
    cpu = torch.device("cpu")
    found = ops.problems("tiny", ["masked_conv"])
    assert [(p.ndim, p.label.split(" d", 1)[1]) for p in found[:5]] == [
        (2, "1 dense"), (2, "0.5 block"), (2, "0.25 block (0.167 kept)"), (2, "0.1 block (0.056 kept)"),
        (2, "0.1 unstructured")]
    for p in found:
        x, w, m, b, a = p.make(cpu, torch.float64, False)
        assert m.dtype == torch.bool and bool(m.all()) == p.label.endswith("dense")
        conv = (torch.nn.functional.conv2d, torch.nn.functional.conv3d)[p.ndim - 2]
        want = conv(x, w * m, b, a["stride"], a["padding"], groups=a["groups"])
        provs = [v for v in ops.providers()["masked_conv"] if v.runs(p, cpu, full=False)]
        assert [v.label(cpu) for v in provs] == ["convzoo (CPU path)", f"F.conv{p.ndim}d(x, w*mask)"]
        for v in provs:
            torch.testing.assert_close(v.fn(x, w, m, b, a), want, rtol=1e-12, atol=1e-12)
        n, c, o, L = x.shape[0], x.shape[1], w.shape[0], want[0, 0].numel()
        dense = 2 * n * L * o * c * w[0, 0].numel()
        assert [p.flops(mode) for mode in harness.MODES] == [dense, 2 * dense, 3 * dense]
        full = [v.name for v in ops.providers()["masked_conv"] if v.runs(p, cpu, full=True)]
        assert full[2:] == [f"compile(F.conv{p.ndim}d(x, w*mask))"]
    # the backward modes differentiate x and the weight only (the mask is a constant, the bias not asked for)
    x, w, m, b, _ = found[1].make(cpu, torch.float32, True)
    assert x.requires_grad and w.requires_grad and not m.requires_grad and not b.requires_grad


def test_a_provider_renamed_on_cpu_is_still_the_speedup_base(no_interpreter):
    """masked_conv's convzoo rows carry "convzoo (CPU path)" on a CPU, its own name elsewhere; the speedups are
    still peer time over its time."""
    prov = next(v for v in ops.providers()["masked_conv"] if v.name == "convzoo")
    assert prov.label(torch.device("cpu")) == "convzoo (CPU path)" and prov.label(torch.device("cuda")) == "convzoo"
    timer = FakeTimer(ms={"convzoo": 1.0, "F.conv2d(x, w*mask)": 3.0})
    rows = harness.run(ops.problems("tiny", ["masked_conv"])[:1], ops.providers(), ["fwd"], torch.device("cpu"),
                       torch.float32, harness.Limits(1e10, 1e11, "float32"), rounds=2, timer=timer,
                       load=FakeLoad(0.0), memory=False, progress=None)
    assert {r.provider: r.speedup for r in rows} == {"convzoo (CPU path)": 1.0, "F.conv2d(x, w*mask)": 3.0}


@pytest.mark.parametrize("shape", [("2d_tiny", 2, 4, 8, (8, 8), 3, 1, 1), ("strided", 3, 3, 5, (7, 9), 3, 2, 1),
                                   ("unpadded", 2, 2, 3, (6, 5), 2, 1, 0)])
def test_coactivation_bench_rows_count_what_the_op_counts(shape, no_interpreter):
    """Every provider, the transcribed seed f2 included (its stacked grouped conv, the H[connection_indxs]
    unpacking, stride and padding), gives the count of the binarized weight gradient, exactly (float64); the
    FLOPs are that GEMM's; the rows are fwd only."""
    cpu = torch.device("cpu")
    p = ops._coactivation_problem(*shape)
    x, y, a = p.make(cpu, torch.float64, False)
    want = torch.nn.grad.conv2d_weight((x > 0).double(), a["weight_shape"], (y > 0).double(), a["stride"],
                                       a["padding"])
    assert a["weight_shape"] == (shape[3], shape[2], shape[5], shape[5]) and want.sum() > 0
    provs = [v for v in ops.providers()["coactivation"] if v.runs(p, cpu, full=False)]
    assert [v.label(cpu) for v in provs] == ["convzoo (CPU path)", "conv_weight(x>0, y>0)", ops.SEED_F2]
    for v in provs:
        torch.testing.assert_close(v.fn(x, y, a).double(), want, rtol=0, atol=0)
    n, L = x.shape[0], y[0, 0].numel()
    assert p.flops("fwd") == 2 * n * L * want.numel() and not p.differentiable
    assert [m for _, m, _ in harness.jobs([p], ops.providers(), list(harness.MODES), cpu)] == ["fwd"]


def test_seed_f2_is_skipped_where_it_would_not_fit(no_interpreter, monkeypatch, capsys):
    """The seed's method holds (X + 4·Y)·C_in·∏k elements (the profiler measures that, plus its result); where
    that exceeds 2 GiB (the --full set's batch-128 shapes) it is not run, the run prints why and the note lists
    those shapes; batch 32 runs it."""
    from convzoo.tools.bench.memory import peak_bytes

    cpu = torch.device("cpu")
    shape = ("small", 4, 8, 8, (16, 16), 3, 1, 1)
    p = ops._coactivation_problem(*shape)
    x, y, a = p.make(cpu, torch.float32, False)
    extra = peak_bytes(lambda: ops._coactivation_seed_f2(x, y, a)) - ops._seed_f2_bytes(*shape[1:])
    assert 0 <= extra <= 2 * 4 * math.prod(a["weight_shape"])  # beside the stacked tensors: the [C_out, R] sums
    full = {q.label: q for q in ops.problems("full", ["coactivation"])}
    seed = next(v for v in ops.providers()["coactivation"] if v.name == ops.SEED_F2)
    big, fits = full["N128 C16→16 32×32 k3 p1 s1"], full["N32 C16→16 32×32 k3 p1 s1"]
    assert not seed.runs(big, cpu, full=True) and "5.6 GiB" in big.skip[ops.SEED_F2]
    assert seed.runs(fits, cpu, full=True) and not fits.skip
    assert "--full N128 C16→16 32×32 k3 p1 s1 (5.6 GiB)" in ops.NOTES["coactivation"]
    assert "N32" not in ops.NOTES["coactivation"]
    # a run says which provider it leaves out and why, once per shape, and times the others
    monkeypatch.setattr(ops_sparse, "SEED_F2_LIMIT", 1024)
    tiny = ops.problems("tiny", ["coactivation"])
    lines = []
    rows = harness.run(tiny, ops.providers(), ["fwd"], cpu, torch.float32, harness.Limits(1e10, 1e11, "float32"),
                       rounds=2, timer=FakeTimer(), load=FakeLoad(0.0), memory=False, progress=lines.append)
    assert [ln for ln in lines if ln.startswith("#")] == [
        f"# {ops.SEED_F2} not run on coactivation N2 C4→8 8×8 k3 p1 s1: its stacked tensors would take 0.0 GiB "
        "(fp32) > 0 GiB"]
    assert {r.provider for r in rows} == {"convzoo (CPU path)", "conv_weight(x>0, y>0)"}
