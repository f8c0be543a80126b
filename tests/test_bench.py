"""The quick bench runs on CPU and prints one row per (op, shape, provider). No timing assertions."""

import bench.__main__ as bench


def test_bench_tiny_runs_and_prints_every_provider(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert bench.main(["--tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "CPU (plain-torch paths)" in out
    for needle in ("unfold  2d_tiny     convzoo", "fold    2d_tiny     F.fold", "3d_tiny     unfoldNd"):
        assert needle in out


def test_bench_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bench.main(["--tiny", "--device", "cpu"]) == 2
