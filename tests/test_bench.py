"""The bench harness on CPU with tiny shapes: it runs every provider and writes well-formed CSV rows,
a markdown table and plots. No timing assertions."""

import math
import os

import pytest
import torch

import convzoo.tools.bench.cli as bench
from convzoo.tools.bench import harness, ops


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_tiny_run_prints_every_provider_and_writes_results(capsys, no_interpreter, tmp_path):
    assert bench.main(["--tiny", "--device", "cpu", "--reps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "plain-torch paths" in out and "measured: copy" in out
    expected = {("unfold", "2d_tiny", p) for p in ("convzoo", "F.unfold", "unfoldNd")}
    expected |= {("fold", "3d_tiny", p) for p in ("convzoo", "unfoldNd")}
    expected |= {("local_conv", "2d_tiny", p) for p in ("convzoo", "hypnettorch", "unfold+bmm", "unfold+einsum")}
    (csv_path,) = tmp_path.glob("*.csv")
    rows = harness.read_csv(csv_path)
    assert list(rows[0]) == harness.Row.columns()
    assert expected <= {(r["op"], r["shape"], r["provider"]) for r in rows}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert not any("compile" in r["provider"] for r in rows)  # --full only
    for r in rows:
        assert r["device"].startswith("CPU") and r["torch"] and r["date"].endswith("Z")
        p50, p20, p80 = float(r["ms_p50"]), float(r["ms_p20"]), float(r["ms_p80"])
        assert 0 < p20 <= p50 <= p80
        assert float(r["peak_mib"]) >= 0 and float(r["pct_of_limit"]) > 0
        assert (float(r["tflop_per_s"]) > 0) == (r["op"] == "local_conv")
        if r["provider"] == "convzoo":
            assert float(r["vs_convzoo"]) == 1.0
    md = csv_path.with_suffix(".md").read_text()
    assert md.count("| local_conv |") == 8 and "Measured limits" in md
    # a second run appends rows under the same header
    assert bench.main(["--tiny", "--device", "cpu", "--ops", "local_conv", "--modes", "bwd", "--reps", "2",
                       "--no-memory",
                       "--out", str(tmp_path)]) == 0
    rows2 = harness.read_csv(csv_path)
    assert len(rows2) == len(rows) + 4 and {r["mode"] for r in rows2[len(rows):]} == {"bwd"}
    assert math.isnan(float(rows2[-1]["peak_mib"]))


def test_plots_written_when_matplotlib_is_installed(no_interpreter, tmp_path):
    pytest.importorskip("matplotlib")
    assert bench.main(["--tiny", "--device", "cpu", "--ops", "fold", "--reps", "2", "--no-memory",
                       "--out", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*/fold.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_format_table_and_csv_round_trip(tmp_path):
    row = harness.Row("2026-01-01T00:00:00Z", "dev", "2.11", "3.6", "abc", "unfold", "s", "fwd", "float32",
                      "convzoo", 1.5, 1.0, 2.0, 3.0, 0.0, 50.0, 1.25, 1.0)
    harness.append_csv(tmp_path / "x.csv", [row, row])
    back = harness.read_csv(tmp_path / "x.csv")
    assert len(back) == 2 and float(back[0]["ms_p50"]) == 1.5 and back[0]["provider"] == "convzoo"
    table = harness.format_table([row])
    assert table.splitlines()[0].split()[:4] == ["op", "shape", "mode", "provider"] and "1.500" in table
    assert harness.format_table([row], markdown=True).splitlines()[1].startswith("|---|")


@pytest.mark.parametrize("argv, message", [
    (["--ops", "conv"], "--ops: unknown op"),
    (["--ops", ","], "--ops: no op named"),
    (["--modes", "fwd,sideways"], "--modes: unknown mode"),
    (["--modes", ","], "--modes: no mode named"),
    (["--dtype", "int8"], "argument --dtype: invalid choice"),
    (["--dtype", ","], "argument --dtype: invalid choice"),
    (["--quick", "--full"], "not allowed with"),
    (["--reps", "1"], "--reps must be at least 2"),
    (["--device", "bogus"], "--device: 'bogus' is not a device"),
    (["--device", "meta"], "--device: bench runs on cpu or cuda, not on 'meta'"),
    pytest.param(["--device", "cuda"], "--device: 'cuda', but there is no CUDA device here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")),
])
def test_bad_arguments_exit_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args([*argv, "--no-save"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err.splitlines()[-1]  # after the usage, one line naming it
    assert err.splitlines()[-1].startswith("convzoo-bench: error: ")


def test_a_cuda_device_that_is_not_here_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--device", "cuda:1", "--no-save"])
    assert e.value.code == 2 and "--device: no CUDA device 1; this machine has 1" in capsys.readouterr().err
    assert bench.parse_args(["--device", "cuda:0", "--no-save"]).device == "cuda:0"


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


@pytest.mark.gpu
def test_tiny_run_on_cuda(tmp_path):
    """On a GPU: do_bench quantiles, CUDA peak memory, and the GPU's name in every row."""
    import torch

    assert bench.main(["--tiny", "--device", "cuda", "--dtype", "float16", "--reps", "2", "--out", str(tmp_path)]) == 0
    (csv_path,) = tmp_path.glob("*.csv")
    rows = harness.read_csv(csv_path)
    assert rows and all(r["device"] == torch.cuda.get_device_name() for r in rows)
    assert all(0 < float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"]) for r in rows)
