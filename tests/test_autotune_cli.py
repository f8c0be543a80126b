"""The tuning command under the interpreter with a fake timer: control flow, tables, early abort,
correctness check, --force / --max-minutes / --dry-run, and two concurrent tuners on one table."""

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from _cli_helpers import assert_absent_cuda_device_refused, assert_refused, device_cases, minutes_cases, name_cases

import convzoo.kernels.local_conv  # noqa: F401  (registers every kernel while TRITON_INTERPRET is set)
from convzoo import autotune
from convzoo.autotune import Config, KernelSpec, TuneProblem
from convzoo.autotune import tune as tuner
from convzoo.autotune.grids import GRIDS, Layer
from convzoo.autotune.lookup import triton_version
from convzoo.tools import autotune as cli

# where the tables of this run go: the GPU's folder on a GPU, else the interpreter's
SLUG = autotune.device_slug(torch.cuda.get_device_name()) if torch.cuda.is_available() else "triton-interpreter"


def fake_timer(fn, cfg, stage):
    """Deterministic 'timings': smaller tiles and fewer warps are 'faster'; nothing is launched."""
    return 1.0 + sum(cfg.meta.values()) / 1000 + cfg.num_warps / 100


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVZOO_CACHE_DIR", str(tmp_path / "cache"))
    autotune.clear_cache()
    yield tmp_path / "cache" / "autotune"
    autotune.clear_cache()


def _table(root, kernel):
    return json.loads((root / SLUG / f"{kernel}.json").read_text())


def test_tunes_writes_both_tables_and_lookup_reads_them(cache, tmp_path, capsys):
    out = tmp_path / "ship"
    argv = ["--kernels", "unfold,local_conv_fwd", "--grid", "small", "--dtype", "float32", "--out", str(out),
            "--quiet"]
    assert cli.main(argv, timer=fake_timer) == 0
    text = capsys.readouterr().out
    assert "best config" in text and "speedup" in text and "local_conv_fwd" in text
    for kernel in ("unfold", "local_conv_fwd"):
        shipped, user = _table(out, kernel), _table(cache, kernel)
        assert shipped["configs"] == user["configs"] and len(user["configs"]) == 3  # one per small layer
        spec = autotune.get_spec(kernel)
        assert user["source_hash"] == spec.source_hash and user["triton_version"] == triton_version()
        for layer in GRIDS["small"]:
            problem = spec.problem(layer, torch.float32, torch.device("cpu"))
            job = tuner.Job(spec, layer, torch.float32, dict(problem.dims), "")
            expected = min(tuner.candidates(job), key=lambda c: fake_timer(None, c, "final"))
            # the runtime reader resolves the tuned entry from the table root
            got = autotune.resolve(kernel, SLUG, torch.float32, problem.dims, roots=(out,))
            assert got == expected
    names = sorted(p.name for p in (out / SLUG).iterdir() if not p.name.endswith(".lock"))
    assert names == ["local_conv_fwd.json", "unfold.json"]  # no temp file left


def test_skips_tuned_keys_unless_forced_and_dry_run_says_so(cache, capsys):
    argv = ["--kernels", "unfold", "--grid", "small", "--dtype", "float16", "--quiet"]
    assert cli.main(argv, timer=fake_timer) == 0
    capsys.readouterr()
    calls = []

    def counting(fn, cfg, stage):
        calls.append(cfg)
        return fake_timer(fn, cfg, stage)

    assert cli.main([*argv, "--out", str(cache.parent / "ship")], timer=counting) == 0
    assert calls == [] and "nothing to tune" in capsys.readouterr().out
    # the cached entries were copied, untimed, to the folder to ship
    assert _table(cache.parent / "ship", "unfold")["configs"] == _table(cache, "unfold")["configs"]
    assert cli.main([*argv, "--dry-run"], timer=fake_timer) == 0
    assert capsys.readouterr().out.count("tuned already") == 3
    assert cli.main([*argv, "--force"], timer=counting) == 0
    assert len(calls) > 3


def test_an_invalid_entry_is_retuned_and_dropped_from_the_table(cache, capsys):
    argv = ["--kernels", "unfold", "--grid", "small", "--dtype", "float32", "--quiet"]
    assert cli.main(argv, timer=fake_timer) == 0
    tuned = _table(cache, "unfold")["configs"]
    key = sorted(tuned)[0]
    data = _table(cache, "unfold")
    data["configs"][key]["meta"]["BLOCK_R"] = 0  # a launch would divide by it
    (cache / SLUG / "unfold.json").write_text(json.dumps(data))
    autotune.clear_cache()
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="ignoring 1 invalid entry"):
        assert cli.main(argv, timer=fake_timer) == 0
    assert key in capsys.readouterr().out  # timed again, not "tuned already"
    assert _table(cache, "unfold")["configs"] == tuned  # the fake timer picks the same winner


def test_max_minutes_stops_starting_jobs(cache, capsys):
    argv = ["--kernels", "unfold,fold", "--grid", "small", "--dtype", "float32", "--max-minutes", "1e-9",
            "--quiet"]
    assert cli.main(argv, timer=fake_timer) == 0
    out = capsys.readouterr().out
    assert "--max-minutes reached" in out
    assert not (cache / SLUG / "fold.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_no_gpu_exits_nonzero_unless_dry_run(cache, capsys):
    assert cli.main(["--grid", "small"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err
    assert cli.main(["--grid", "small", "--dry-run"]) == 0
    out = capsys.readouterr().out
    n_jobs = 3 * len(GRIDS["small"]) * len(autotune.registered())
    assert f"would tune {n_jobs}" in out and "configs" in out


@pytest.mark.parametrize("argv, message", [
    *name_cases("--kernels", "kernel", "unfold", "conv9d"),
    *name_cases("--dtype", "dtype", "float16", "float8"),
    (["--grid", "huge"], "invalid choice"),
    *minutes_cases("--max-minutes", "0", "-1", "nan", "inf", "1e999"),
    *device_cases("tuning times the kernels on a CUDA GPU"),
    (["--device", "cpu", "--dry-run"], "--device: tuning times the kernels on a CUDA GPU, not on 'cpu'"),
])
def test_bad_arguments(argv, message, capsys, cache):
    assert_refused(cli.parse_args, argv, "convzoo-autotune", message, capsys)


def test_a_cuda_device_that_is_not_here_is_refused(monkeypatch, capsys, cache):
    assert_absent_cuda_device_refused(cli.parse_args, ["--dry-run"], "convzoo-autotune", 2, monkeypatch, capsys)


@pytest.mark.parametrize("where", ["out_is_a_file", "out_under_a_file", "out_read_only", "cache_is_a_file"])
def test_unwritable_table_folder_is_refused_before_any_work(where, tmp_path, monkeypatch, capsys):
    """Checked up front: the tuner would otherwise fail at its first write, after timing a job."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("CONVZOO_CACHE_DIR", str(tmp_path / "cache"))
    out, name = tmp_path / "ship", "--out"
    if where == "out_is_a_file":
        out = blocker
    elif where == "out_under_a_file":
        out = blocker / "ship"
    elif where == "out_read_only":
        out.mkdir()
        out.chmod(0o555)
        if os.access(out, os.W_OK):
            pytest.skip("permissions are not enforced for this user (root)")
    else:
        monkeypatch.setenv("CONVZOO_CACHE_DIR", str(blocker))
        name = "the user cache (set CONVZOO_CACHE_DIR)"
    argv = ["--kernels", "unfold", "--grid", "small", "--dtype", "float32", "--out", str(out), "--quiet"]
    timed = []
    with pytest.raises(SystemExit) as e:
        cli.main(argv, timer=lambda fn, cfg, stage: timed.append(cfg) or 1.0)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{name}: cannot write tables to" in err and not timed
    if where != "cache_is_a_file":
        assert not (tmp_path / "cache" / "autotune" / SLUG / "unfold.json").exists()
    assert list(tmp_path.glob("**/.convzoo-write-probe-*")) == []
    autotune.clear_cache()
    with warnings.catch_warnings():  # a dry run writes nothing: it does not ask (the cache case warns)
        warnings.simplefilter("ignore")
        assert cli.main([*argv, "--dry-run"], timer=lambda fn, cfg, stage: 1.0) == 0


# ---------------------------------------------------------------------------------------------- one job
def _fake_spec(wrong: set, fail: set):
    """A registered spec whose 'kernel' returns ``x * BLOCK`` — right only for BLOCK = 1 — except
    configs in ``wrong`` (wrong results) or ``fail`` (raise at launch)."""

    def kernel(x):  # hashed for the table, never launched
        return x

    def problem(layer, dtype, device):
        x = torch.ones(4, dtype=dtype)

        def run(cfg):
            if cfg.meta["BLOCK"] in fail:
                raise RuntimeError("out of resources")
            return x * (2 if cfg.meta["BLOCK"] in wrong else 1)

        return TuneProblem({"n": 4}, lambda: (run, lambda: x))

    return KernelSpec("fake", kernel, ("n",), lambda d, t, i: Config({"BLOCK": 64}, 4, 1),
                      lambda d, t: (Config({"BLOCK": b}, 4, 1) for b in (1, 2, 4, 8, 16, 32)), problem)


def test_early_abort_failures_and_correctness_check():
    spec = _fake_spec(wrong={1}, fail={2})
    times = {1: 1.0, 2: 1.0, 4: 1.5, 8: 9.0, 16: 1.2, 32: 50.0, 64: 3.0}
    job = tuner.Job(spec, GRIDS["small"][0], torch.float32, {"n": 4}, "k")
    timed = []

    def timer(fn, cfg, stage):
        timed.append((cfg.meta["BLOCK"], stage))
        fn()
        return times[cfg.meta["BLOCK"]]

    result = tuner.tune_job(job, torch.device("cpu"), timer, abort_ratio=2.0, finalists=3)
    # 64 (default, 3.0) first; 1 (1.0) sets the best; 8 and 32 are > 2x best: dropped; 2 fails
    assert result.failed == 1 and result.dropped == 2 and result.tried == 7
    assert {b for b, s in timed if s == "final"} == {1, 16, 4, 64}  # finalists, and the default
    # 1 is fastest but wrong: the next finalist that matches the reference wins
    assert result.best == Config({"BLOCK": 16}, 4, 1) and result.checked
    assert any("wrong results" in n for n in result.notes)
    assert result.default_ms == 3.0 and result.speedup == pytest.approx(2.5)


def test_all_wrong_keeps_the_default():
    spec = _fake_spec(wrong={1, 2, 4, 8, 16, 32, 64}, fail=set())
    job = tuner.Job(spec, GRIDS["small"][0], torch.float32, {"n": 4}, "k")
    result = tuner.tune_job(job, torch.device("cpu"), lambda fn, cfg, stage: 1.0)
    assert result.best == Config({"BLOCK": 64}, 4, 1) and not result.checked and "kept the default" in result.notes


# ---------------------------------------------------------------------------------------------- concurrency
WORKER = textwrap.dedent("""
    import os, sys, time
    os.environ["TRITON_INTERPRET"] = "1"
    from convzoo.tools.autotune import main

    def timer(fn, cfg, stage):
        time.sleep(0.0005)  # interleave the two processes
        return 1.0 + sum(cfg.meta.values()) / 1000 + cfg.num_warps / 100

    sys.exit(main(sys.argv[1:], timer=timer))
""")


def test_two_concurrent_tuners_do_not_corrupt_or_drop_entries(tmp_path):
    env = {**os.environ, "CONVZOO_CACHE_DIR": str(tmp_path / "cache"), "TRITON_INTERPRET": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, "--kernels", "unfold,fold", "--grid", "small",
                               "--dtype", dtype, "--quiet", "--out", str(tmp_path / "ship")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for dtype in ("float16", "float32")]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    for root in (tmp_path / "cache" / "autotune", tmp_path / "ship"):
        for kernel in ("unfold", "fold"):
            keys = _table(root, kernel)["configs"]  # valid JSON, and
            assert {k.split("|")[0] for k in keys} == {"float16", "float32"}  # both tuners' entries
            assert len(keys) == 6


@pytest.mark.gpu
def test_real_tuning_on_the_gpu(cache):
    """On a GPU: do_bench timings, a checked winner per key, a table lookup() then uses."""
    argv = ["--kernels", "unfold,local_conv_fwd", "--grid", "small", "--dtype", "float16", "--quiet"]
    assert cli.main(argv) == 0
    for kernel in ("unfold", "local_conv_fwd"):
        assert len(_table(cache, kernel)["configs"]) == 3
    spec = autotune.get_spec("local_conv_fwd")
    dims = dict(spec.problem(GRIDS["small"][0], torch.float16, torch.device("cuda")).dims)
    key = autotune.bucket_key(torch.float16, dims)
    tuned = Config.from_json(_table(cache, "local_conv_fwd")["configs"][key])
    assert autotune.lookup("local_conv_fwd", torch.device("cuda"), torch.float16, **dims) == tuned


def test_layer_geometry():
    layer = Layer("x", 2, 3, (7, 9), 3, 2, "same", 5)
    ks, dil, pad, st, mode = layer.geometry()
    assert ks == [3, 3] and dil == [1, 1] and pad == [1, 1, 1, 1] and st == [2, 2] and mode == "zeros"
    assert layer.resolved().out_size == (4, 5)
    assert layer.out_channels == 5 and Layer("y", 1, 4, (8,)).out_channels == 4


# ---------------------------------------------------------------------------------------------- dry run and help
def test_dry_run_header_job_count_and_estimate(cache, capsys):
    """The header names the device, grid, dtypes and table folders; the job count and the estimate
    cover only the jobs still to time, and the estimate is tuner.estimate_seconds summed over them."""
    argv = ["--kernels", "unfold", "--grid", "small", "--dtype", "float32", "--max-minutes", "7"]
    assert cli.main([*argv, "--dry-run"], timer=fake_timer) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("# device: ") and "# grid: small (3 layers)" in lines
    assert "# dtypes: float32" in lines and f"# tables: {cache / SLUG}" in lines
    spec = autotune.get_spec("unfold")
    jobs = tuner.plan([spec], GRIDS["small"], [torch.float32], torch.device("cpu"))
    total = sum(tuner.estimate_seconds(len(tuner.candidates(j))) for j in jobs)
    assert f"would tune 3 (kernel, dtype, shape bucket) jobs, 3 to time (0 in the table), estimated " \
           f"{cli._minutes(total)}; --max-minutes 7" in out
    # tune one dtype's keys; the dry run then counts them as done and leaves them out of the estimate
    assert cli.main([*argv, "--quiet"], timer=fake_timer) == 0
    capsys.readouterr()
    assert cli.main([*argv, "--dry-run"], timer=fake_timer) == 0
    out = capsys.readouterr().out
    assert "bucket) jobs, 0 to time (3 in the table), estimated 0 s" in out and out.count("tuned already (--force") == 3


def test_estimate_reuses_the_do_bench_windows(monkeypatch):
    """The estimate follows tune.BENCH_MS (what do_bench_timer passes to do_bench), not its own copy."""
    base = tuner.estimate_seconds(10, compile_s=0)
    assert base == pytest.approx(10 * 0.025 + 6 * 0.125)
    monkeypatch.setitem(tuner.BENCH_MS, "first", (50, 200))
    assert tuner.estimate_seconds(10, compile_s=0) == pytest.approx(10 * 0.25 + 6 * 0.125)
    assert tuner.estimate_seconds(3, compile_s=1) == pytest.approx(3 * 1.25 + 3 * 0.125)  # fewer than 6 finalists
    seen = {}
    monkeypatch.setattr("triton.testing.do_bench",
                        lambda fn, warmup, rep, quantiles: seen.setdefault("w", (warmup, rep)))
    tuner.do_bench_timer(lambda: None, Config({}), "first")
    assert seen["w"] == (50, 200)


def test_help_explains_every_registered_kernel_key():
    """The --help legend names each kernel's lookup dims and tiles exactly as the registered specs have them."""
    cli._import_kernels()
    assert set(cli.KEY_LEGEND) == set(autotune.registered())
    for name, spec in autotune.registered().items():
        dims, tiles = cli.KEY_LEGEND[name]
        assert set(dims) == set(spec.dims), name
        tile_names = set(spec.default_config(dict.fromkeys(spec.dims, 64), torch.float32, False).meta)
        words = tiles.replace(",", " ").split()
        assert {w for w in words if w.startswith("BLOCK_") or w == "SPLIT"} == tile_names, name
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--help"])
    assert e.value.code == 0


def test_help_text_shows_the_legend(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "Table keys: 'dtype|DIM=bucket|...'" in out and "CONVZOO_CONFIG=" in out
    assert "  local_conv_grad_input: C = input channels C_in; N = batch; O = output channels" in out


# ---------------------------------------------------------------------------------------------- budgets and grids
def test_plan_gives_each_kernel_its_turn_and_honours_a_layers_kernels():
    """Jobs alternate between kernels (a budget cut leaves every kernel its first keys), and a layer that names
    its kernels gives the others no job."""
    specs = [autotune.get_spec(k) for k in ("unfold", "fold", "local_conv_fwd")]
    layers = [*GRIDS["small"], Layer("only_fold", 2, 4, (32, 32), 3, 1, 1, 8, kernels=("fold",))]
    jobs = tuner.plan(specs, layers, [torch.float32], torch.device("cpu"))
    names = [j.spec.name for j in jobs]
    assert names[:9] == ["unfold", "fold", "local_conv_fwd"] * 3 and names[9:] == ["fold"]
    assert [j.layer.name for j in jobs if j.layer.name == "only_fold"] == ["only_fold"]


def test_the_deadline_stops_a_job_in_flight_and_writes_nothing_of_it(cache, capsys):
    """Past the budget a job stops before its next timing: its timings are dropped, the table is not written."""
    spec = autotune.get_spec("unfold")
    jobs = tuner.plan([spec], GRIDS["small"], [torch.float32], torch.device("cpu"))
    calls, lines = [], []

    def slow(fn, cfg, stage):
        calls.append(cfg)
        time.sleep(0.05)
        return fake_timer(fn, cfg, stage)

    results = tuner.tune(jobs, torch.device("cpu"), [cache / SLUG], "x", timer=slow, max_minutes=0.12 / 60,
                         progress=False, log=lines.append)
    assert results == [] and 1 <= len(calls) < len(tuner.candidates(jobs[0]))
    assert lines == [f"--max-minutes reached: stopping during unfold {jobs[0].layer.name} float32 "
                     "(its timings are dropped)"]
    assert not (cache / SLUG / "unfold.json").exists()


def test_bench_grids_are_the_bench_shapes_with_their_ops_kernels(cache, capsys):
    from convzoo.tools.bench import ops

    cli._import_kernels()
    assert set(ops.OP_KERNELS) == set(ops.OPS)
    assert {k for ks in ops.OP_KERNELS.values() for k in ks} <= set(autotune.registered())
    layers = cli.grid_layers("bench-quick")
    by_geom = {(la.n, la.c, la.size, la.kernel, la.stride, la.padding, la.c_out): la for la in layers}
    assert len(by_geom) == len(layers)  # one layer per geometry
    for n, c, size, k, s, p in [shape[1:] for shape in ops._UNFOLD["quick"]]:
        assert {"unfold", "fold"} <= set(by_geom[n, c, size, k, s, p, None].kernels)
    for _, n, c, o, size, k, s, p in ops._MASKED["quick"]:
        assert set(ops.OP_KERNELS["masked_conv"]) <= set(by_geom[n, c, size, k, s, p, o].kernels)
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        ops.tune_layers("huge")
    with pytest.raises(ValueError, match="unknown op 'conv9d'"):
        ops.tune_layers("quick", ["conv9d"])
    assert cli.main(["--grid", "bench-tiny", "--dtype", "float32", "--dry-run"], timer=fake_timer) == 0
    out = capsys.readouterr().out
    assert f"# grid: bench-tiny ({len(cli.grid_layers('bench-tiny'))} layers)" in out
    listed = [line.split()[:2] for line in out.splitlines() if not line.startswith("#")]
    assert listed and all(kernel in next(la.kernels for la in cli.grid_layers("bench-tiny") if la.name == layer)
                          for kernel, layer in listed)
    assert ["local_conv_fwd", "local_conv_2d_tiny"] in listed and ["unfold", "local_conv_2d_tiny"] not in listed
