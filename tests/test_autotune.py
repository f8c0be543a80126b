"""The config lookup: user cache → shipped table → heuristic; stale/corrupt tables warn once."""

import json
import os
import pathlib
import warnings

import pytest
import torch

from convzoo import autotune
from convzoo.autotune import Config
from convzoo.autotune.grids import GRIDS
from convzoo.autotune.lookup import triton_version
from convzoo.kernels import local_conv as _local_conv_kernels  # noqa: F401  (registers the kernels)
from convzoo.kernels import unfold as kernels
from convzoo.tools import autotune as cli

DIMS = {"R": 1000, "L": 300}


@pytest.fixture
def roots(tmp_path):
    autotune.clear_cache()
    yield tmp_path / "user", tmp_path / "shipped"
    autotune.clear_cache()


def _write(root, table, gpu="gpu-x", **override):
    spec = autotune.get_spec("unfold")
    path = root / gpu / "unfold.json"
    autotune.write_table(path, spec, table, "GPU X")
    if override:
        data = json.loads(path.read_text())
        data.update(override)
        path.write_text(json.dumps(data))
    return path


def test_bucket_key():
    assert autotune.bucket(1) == 1 and autotune.bucket(5) == 8 and autotune.bucket(8) == 8
    assert autotune.bucket_key(torch.float16, {"R": 1000, "L": 300}) == "float16|L=512|R=1024"


def test_order_user_then_shipped_then_heuristic(roots):
    user, shipped = roots
    key = autotune.bucket_key(torch.float32, DIMS)
    a, b = Config({"BLOCK_R": 2, "BLOCK_L": 128}, 2, 1), Config({"BLOCK_R": 4, "BLOCK_L": 64}, 8, 1)
    heuristic = autotune.get_spec("unfold").default_config(DIMS, torch.float32, False)
    assert autotune.resolve("unfold", "gpu-x", torch.float32, DIMS, (user, shipped)) == heuristic
    _write(shipped, {key: b})
    assert autotune.resolve("unfold", "gpu-x", torch.float32, DIMS, (user, shipped)) == b
    _write(user, {key: a})
    assert autotune.resolve("unfold", "gpu-x", torch.float32, DIMS, (user, shipped)) == a
    # another dtype or bucket is not in the tables
    assert autotune.resolve("unfold", "gpu-x", torch.float16, DIMS, (user, shipped)) == heuristic
    assert autotune.resolve("unfold", "gpu-y", torch.float32, DIMS, (user, shipped)) == heuristic


@pytest.mark.parametrize("override, why", [
    ({"source_hash": "0" * 16}, "stale"),
    ({"triton_version": "0.0.1"}, "Triton"),
    ({"kernel": "fold"}, "kernel"),
    ({"configs": []}, "unreadable"),
])
def test_bad_tables_ignored_with_one_warning(roots, override, why):
    user, shipped = roots
    key = autotune.bucket_key(torch.float32, DIMS)
    _write(user, {key: Config({"BLOCK_R": 2, "BLOCK_L": 128})}, **override)
    heuristic = autotune.get_spec("unfold").default_config(DIMS, torch.float32, False)
    with pytest.warns(RuntimeWarning, match=why):
        assert autotune.resolve("unfold", "gpu-x", torch.float32, DIMS, (user, shipped)) == heuristic
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autotune.resolve("unfold", "gpu-x", torch.float32, DIMS, (user, shipped)) == heuristic


def test_corrupt_json_ignored(roots):
    user, shipped = roots
    path = user / "gpu-x" / "unfold.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        autotune.resolve("unfold", "gpu-x", torch.float32, DIMS, (user, shipped))


def test_lookup_is_heuristic_without_gpu(roots, monkeypatch, tmp_path):
    monkeypatch.setenv("CONVZOO_CACHE_DIR", str(tmp_path))
    assert autotune.user_cache_dir() == tmp_path / "autotune"
    cfg = autotune.lookup("unfold", torch.device("cpu"), torch.float32, **DIMS)
    assert cfg == autotune.get_spec("unfold").default_config(DIMS, torch.float32, autotune.interpret_mode())


def test_unknown_kernel():
    with pytest.raises(ValueError, match="unknown kernel"):
        autotune.lookup("nope", torch.device("cpu"), torch.float32)


def test_device_slug():
    assert autotune.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


DOT_KERNELS = {"local_conv_fwd", "local_conv_grad_weight", "local_conv_grad_input"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["unfold", "fold", "extract_patches", *sorted(DOT_KERNELS)])
def test_configs_are_valid_powers_of_two(name, dtype):
    """The interpreter accepts any tile; NVIDIA needs power-of-2 tl.arange sizes and tl.dot tiles ≥ 16
    (fp64 runs as a broadcast-sum, not tl.dot). Check every candidate and default statically."""
    spec = autotune.get_spec(name)
    cands = list(spec.candidates({d: 4096 for d in spec.dims}, dtype))
    assert cands
    defaults = [spec.default_config({d: v for d in spec.dims}, dtype, interp)
                for v in (1, 7, 100, 10**6) for interp in (False, True)]
    for cfg in cands + defaults:
        for v in cfg.meta.values():
            assert v >= 1 and v & (v - 1) == 0, cfg
            assert v >= 16 or name not in DOT_KERNELS or dtype == torch.float64, cfg
        assert cfg.num_warps in (1, 2, 4, 8)


def test_write_table_is_atomic_and_round_trips(roots):
    user, _ = roots
    key = autotune.bucket_key(torch.float32, DIMS)
    cfg = Config({"BLOCK_R": 8, "BLOCK_L": 32}, 4, 1)
    path = _write(user, {key: cfg})
    assert [p.name for p in path.parent.iterdir()] == ["unfold.json"]  # no temp file left
    assert Config.from_json(json.loads(path.read_text())["configs"][key]) == cfg


# ---------------------------------------------------------------------------------------------- invalid tables
def test_every_config_the_tuner_may_write_is_one_the_reader_accepts():
    """Each kernel's declared space holds its candidates and its heuristic defaults (for any dims, as the
    table key buckets them), so the validation never drops an entry the tuner wrote."""
    sizes = (1, 3, 16, 100, 128, 1000, 4096, 10**5, 10**6)
    for name in ("unfold", "fold", *sorted(DOT_KERNELS)):
        spec = autotune.get_spec(name)
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            bucketed = {d: 4096 for d in spec.dims}
            for cfg in spec.candidates(bucketed, dtype):
                spec.check(cfg, dtype, bucketed)
            for i, v in enumerate(sizes):  # every dim at every size, the others at a rolling size
                dims = {d: sizes[(i + 3 * j) % len(sizes)] if j else v for j, d in enumerate(spec.dims)}
                bucketed = {d: autotune.bucket(x) for d, x in dims.items()}
                default = spec.default_config(dims, dtype, False)
                assert default == spec.default_config(bucketed, dtype, False), (name, dims)  # keyed by bucket
                spec.check(default, dtype, bucketed)


GOOD = {"unfold": Config({"BLOCK_R": 8, "BLOCK_L": 64}, 4, 1),
        "local_conv_fwd": Config({"BLOCK_N": 16, "BLOCK_O": 32, "BLOCK_R": 32}, 4, 3)}


def _entry(kernel, tiles=None, **top):
    """GOOD[kernel]'s JSON entry with ``tiles`` replaced in its meta and ``top`` at its top level (None: deleted)."""
    e = GOOD[kernel].to_json()
    for k, v in (tiles or {}).items():
        if v is None:
            e["meta"].pop(k)
        else:
            e["meta"][k] = v
    for k, v in top.items():
        if v is None:
            e.pop(k)
        else:
            e[k] = v
    return e


# entries of a well-formed table that no launcher may get: each is dropped, the table's other entry used
BAD_ENTRIES = {
    "block_0": ("unfold", _entry("unfold", {"BLOCK_R": 0})),
    "block_3": ("unfold", _entry("unfold", {"BLOCK_R": 3})),
    "block_minus16": ("unfold", _entry("unfold", {"BLOCK_R": -16})),
    "block_2pow20": ("unfold", _entry("unfold", {"BLOCK_R": 2**20})),
    "block_above_space": ("unfold", _entry("unfold", {"BLOCK_L": 1024})),
    "block_true": ("unfold", _entry("unfold", {"BLOCK_R": True})),
    "block_float": ("unfold", _entry("unfold", {"BLOCK_R": 16.0})),
    "block_string": ("unfold", _entry("unfold", {"BLOCK_R": "16"})),
    "block_1e999": ("unfold", _entry("unfold", {"BLOCK_R": "1e999"})),  # written raw below: JSON overflow → inf
    "meta_key_missing": ("unfold", _entry("unfold", {"BLOCK_L": None})),
    "meta_key_extra": ("unfold", _entry("unfold", {"BLOCK_X": 16})),
    "meta_list": ("unfold", _entry("unfold", meta=[8, 64])),
    "warps_0": ("unfold", _entry("unfold", num_warps=0)),
    "warps_3": ("unfold", _entry("unfold", num_warps=3)),
    "warps_64": ("unfold", _entry("unfold", num_warps=64)),
    "warps_1e999": ("unfold", _entry("unfold", num_warps="1e999")),
    "warps_nan": ("unfold", _entry("unfold", num_warps="NaN")),
    "warps_true": ("unfold", _entry("unfold", num_warps=True)),
    "warps_missing": ("unfold", _entry("unfold", num_warps=None)),
    "stages_0": ("unfold", _entry("unfold", num_stages=0)),
    "stages_minus1": ("unfold", _entry("unfold", num_stages=-1)),
    "stages_100": ("unfold", _entry("unfold", num_stages=100)),
    "stages_false": ("unfold", _entry("unfold", num_stages=False)),
    "extra_field": ("unfold", _entry("unfold", maxnreg=128)),
    "entry_list": ("unfold", [8, 64, 4, 1]),
    "entry_null": ("unfold", None),
    "keep_too_many_elements": ("unfold", _entry("unfold", {"BLOCK_R": 128, "BLOCK_L": 512})),
    "dot_tile_8": ("local_conv_fwd", _entry("local_conv_fwd", {"BLOCK_N": 8})),
    "dot_warps_2": ("local_conv_fwd", _entry("local_conv_fwd", num_warps=2)),
    "dot_registers": ("local_conv_fwd", _entry("local_conv_fwd", {"BLOCK_N": 128, "BLOCK_O": 128, "BLOCK_R": 128})),
}
# whole tables that are not tables: ignored, both entries
BAD_TABLES = {
    "nested_json": lambda head: head + '"configs": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "configs_list": lambda head: head + '"configs": [1, 2]}',
    "configs_missing": lambda head: head.rstrip(", ") + "}",
    "table_is_a_list": lambda head: "[" + head.rstrip(", ") + "}]",
    "not_utf8": lambda head: "\udcff",
}


def _jobs(kernel):
    """Two small-grid jobs of ``kernel`` in float32 with different table keys: (dims, key) each."""
    spec, out = autotune.get_spec(kernel), {}
    for layer in GRIDS["small"]:
        dims = dict(spec.problem(layer, torch.float32, torch.device("cpu")).dims)
        out.setdefault(autotune.bucket_key(torch.float32, dims), dims)
    (k1, d1), (k2, d2) = list(out.items())[:2]
    return (d1, k1), (d2, k2)


def _check_resolve_and_dry_run(root, kernel, ok_key_used, why, monkeypatch, capsys):
    """resolve() warns once and falls back to the heuristic for the bad key (and for the good key unless
    ``ok_key_used``); the tuner's --dry-run reads the same table without crashing, says it once, and
    re-tunes what is invalid."""
    spec = autotune.get_spec(kernel)
    (ok_dims, ok_key), (bad_dims, _) = _jobs(kernel)
    heuristic = spec.default_config(bad_dims, torch.float32, False)
    autotune.clear_cache()
    with pytest.warns(RuntimeWarning, match=why) as record:
        assert autotune.resolve(kernel, "triton-interpreter", torch.float32, bad_dims, (root,)) == heuristic
        got = autotune.resolve(kernel, "triton-interpreter", torch.float32, ok_dims, (root,))
    assert len([w for w in record if "convzoo" in str(w.message)]) == 1
    assert got == (GOOD[kernel] if ok_key_used else spec.default_config(ok_dims, torch.float32, False))
    with warnings.catch_warnings():  # once per table, not at every launch
        warnings.simplefilter("error")
        assert autotune.resolve(kernel, "triton-interpreter", torch.float32, bad_dims, (root,)) == heuristic

    autotune.clear_cache()
    monkeypatch.setenv("CONVZOO_CACHE_DIR", str(root.parent))
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match=why):
        assert cli.main(["--kernels", kernel, "--grid", "small", "--dtype", "float32", "--dry-run"],
                        timer=lambda fn, cfg, stage: 1.0) == 0
    out = capsys.readouterr().out
    assert out.count("tuned already") == (1 if ok_key_used else 0), out
    assert ok_key in out


def _table_head(kernel):
    spec = autotune.get_spec(kernel)
    head = {"kernel": kernel, "source_hash": spec.source_hash, "triton_version": triton_version(),
            "device": "test"}
    return json.dumps(head)[:-1] + ", "


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_invalid_entry_is_dropped_with_one_warning_and_the_rest_used(case, tmp_path, monkeypatch, capsys):
    kernel, entry = BAD_ENTRIES[case]
    (_, ok_key), (_, bad_key) = _jobs(kernel)
    root = tmp_path / "autotune"
    path = root / "triton-interpreter" / f"{kernel}.json"
    autotune.write_table(path, autotune.get_spec(kernel), {ok_key: GOOD[kernel]})
    data = json.loads(path.read_text())
    data["configs"][bad_key] = entry
    text = json.dumps(data)
    for raw in ("1e999", "NaN"):  # numbers json.dumps cannot write as such: an overflowing float, a NaN
        text = text.replace(f'"{raw}"', raw)
    path.write_text(text)
    _check_resolve_and_dry_run(root, kernel, True, "invalid entr", monkeypatch, capsys)


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_corrupt_table_is_ignored_with_one_warning(case, tmp_path, monkeypatch, capsys):
    root = tmp_path / "autotune"
    path = root / "triton-interpreter" / "unfold.json"
    path.parent.mkdir(parents=True)
    text = BAD_TABLES[case](_table_head("unfold"))
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    _check_resolve_and_dry_run(root, "unfold", False, "unreadable", monkeypatch, capsys)


def test_a_key_that_no_lookup_can_match_is_dropped_with_the_warning(roots):
    user, _ = roots
    key = autotune.bucket_key(torch.float32, DIMS)
    cfg = Config({"BLOCK_R": 2, "BLOCK_L": 128}, 2, 1)
    _write(user, {key: cfg, "float99|L=512|R=1024": cfg, "float32|L=500|R=1024": cfg, "float32|R=1024": cfg})
    with pytest.warns(RuntimeWarning, match="3 invalid entries.*float99"):
        assert autotune.resolve("unfold", "gpu-x", torch.float32, DIMS, (user,)) == cfg


def _deny_stat(monkeypatch, folder):
    """``Path.stat`` and ``Path.read_text`` of anything under ``folder`` raise PermissionError (as without rights)."""

    def denied(real):
        def method(self, *args, **kwargs):
            if str(self).startswith(str(folder) + os.sep):
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kwargs)

        return method

    for name in ("stat", "read_text"):
        monkeypatch.setattr(pathlib.Path, name, denied(getattr(pathlib.Path, name)))


@pytest.mark.parametrize("case", ["cache_is_a_file", "gpu_folder_is_a_file", "no_permission",
                                  "no_permission_chmod"])
def test_unreadable_table_folder_warns(case, tmp_path, monkeypatch, capsys):
    root = tmp_path / "autotune"
    gpu = root / "triton-interpreter"
    if case == "cache_is_a_file":
        root.write_text("not a folder")
        why = "not a folder"
    elif case == "gpu_folder_is_a_file":
        root.mkdir()
        gpu.write_text("not a folder")
        why = "not a folder"
    else:
        (_, ok_key), _ = _jobs("unfold")
        autotune.write_table(gpu / "unfold.json", autotune.get_spec("unfold"), {ok_key: GOOD["unfold"]})
        why = "no permission"
        if case == "no_permission":  # what a non-root user sees in a folder without permissions
            _deny_stat(monkeypatch, gpu)
        else:
            gpu.chmod(0)
            if os.access(gpu / "unfold.json", os.R_OK):
                gpu.chmod(0o755)
                pytest.skip("permissions are not enforced for this user (root)")
    try:
        _check_resolve_and_dry_run(root, "unfold", False, why, monkeypatch, capsys)
    finally:
        if case == "no_permission_chmod":
            gpu.chmod(0o755)


# ---------------------------------------------------------------------------------------------- forced configs
class _Spy:
    """Stands in for a @triton.jit kernel: records each launch's grid and keyword args, then launches.
    (The tests call the launchers, which look the config up, not the ops: the ops' dispatch checks
    how the module's kernel was decorated, which a spy is not.)"""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append((grid, {k: v for k, v in kwargs.items() if k.startswith(("BLOCK_", "num_"))}))
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def no_forcing(monkeypatch):
    monkeypatch.delenv(autotune.CONFIG_ENV, raising=False)
    autotune.clear_cache()
    yield
    autotune.clear_cache()


def test_forced_unfold_config_reaches_the_launch_and_stays_exact(no_forcing, monkeypatch, kernel_device):
    import torch.nn.functional as F

    spy = _Spy(kernels.unfold_kernel)
    monkeypatch.setattr(kernels, "unfold_kernel", spy)
    x = torch.randn(2, 3, 7, 6, device=kernel_device)
    expected = F.unfold(x.cpu(), 3, padding=1, stride=2)  # R = 54 rows, L = 12 blocks
    geom = ([3, 3], [1, 1], [1, 1, 1, 1], [2, 2])  # kernel_size, dilation, flat padding, stride
    forced = {"BLOCK_R": 8, "BLOCK_L": 32, "num_warps": 2, "num_stages": 1}
    with autotune.force_config("unfold", **forced):
        got = kernels.unfold(x, *geom)
    torch.testing.assert_close(got.cpu(), expected, atol=0, rtol=0)
    ((grid, kw),) = spy.launches
    assert kw == forced and grid == (7 * 1,)  # cdiv(54, 8) row tiles × cdiv(12, 32) block tiles
    # after the block: the config lookup() gives without forcing, not the forced one
    kernels.unfold(x, *geom)
    default = autotune.lookup("unfold", x.device, x.dtype, R=54, L=12)
    assert spy.launches[1][1] == default.launch_kwargs() != forced


def test_forced_local_conv_config_reaches_the_launch_and_stays_correct(no_forcing, monkeypatch, kernel_device):
    """A forced K tile (BLOCK_R=16) below the default's runs several reduction steps: still the right sums."""
    import torch.nn.functional as F

    from convzoo.kernels import local_conv as lc

    spy = _Spy(lc.local_conv_fwd_kernel)
    monkeypatch.setattr(lc, "local_conv_fwd_kernel", spy)
    x = torch.randn(2, 4, 5, 5, device=kernel_device)
    w = torch.randn(3, 36, 9, device=kernel_device)
    b = torch.randn(3, 9, device=kernel_device)
    cols = F.unfold(x.double().cpu(), 3)
    expected = (torch.einsum("nkl,okl->nol", cols, w.double().cpu()) + b.double().cpu()).view(2, 3, 3, 3)
    monkeypatch.setenv(autotune.CONFIG_ENV, "local_conv_fwd: BLOCK_N=16, BLOCK_O=16, BLOCK_R=16")
    got = lc.local_conv(x, w, b, [3, 3], [1, 1], [0, 0, 0, 0], [1, 1])
    torch.testing.assert_close(got.double().cpu(), expected, atol=1e-5, rtol=1.3e-6)
    assert spy.launches[0][1] == {"BLOCK_N": 16, "BLOCK_O": 16, "BLOCK_R": 16, "num_warps": 4, "num_stages": 1
                                  if kernel_device == "cpu" else 3}  # the heuristic's warps/stages


def test_env_var_is_read_at_every_lookup_and_the_context_wins(no_forcing, monkeypatch):
    dims = {"R": 100, "L": 50}
    heuristic = autotune.lookup("unfold", "cpu", torch.float32, **dims)
    monkeypatch.setenv(autotune.CONFIG_ENV, "unfold:BLOCK_R=8,BLOCK_L=64")
    assert autotune.lookup("unfold", "cpu", torch.float32, **dims).meta == {"BLOCK_R": 8, "BLOCK_L": 64}
    monkeypatch.setenv(autotune.CONFIG_ENV, "unfold:BLOCK_R=4,BLOCK_L=128,num_warps=8")  # changed: no stale value
    assert autotune.lookup("unfold", "cpu", torch.float32, **dims) == Config({"BLOCK_R": 4, "BLOCK_L": 128}, 8, 1)
    with autotune.force_config("unfold", Config({"BLOCK_R": 16, "BLOCK_L": 32}, 2, 1)):
        with autotune.force_config("unfold", BLOCK_R=2, BLOCK_L=256):
            assert autotune.lookup("unfold", "cpu", torch.float32, **dims).meta == {"BLOCK_R": 2, "BLOCK_L": 256}
        assert autotune.lookup("unfold", "cpu", torch.float32, **dims) == Config({"BLOCK_R": 16, "BLOCK_L": 32}, 2, 1)
        # another kernel is not affected
        assert autotune.lookup("fold", "cpu", torch.float32, R=8, P=64) == \
            autotune.get_spec("fold").default_config({"R": 8, "P": 64}, torch.float32, autotune.interpret_mode())
    assert autotune.lookup("unfold", "cpu", torch.float32, **dims).meta == {"BLOCK_R": 4, "BLOCK_L": 128}
    monkeypatch.delenv(autotune.CONFIG_ENV)
    assert autotune.lookup("unfold", "cpu", torch.float32, **dims) == heuristic


def test_force_config_exits_on_error_too(no_forcing):
    with pytest.raises(RuntimeError), autotune.force_config("unfold", BLOCK_R=8, BLOCK_L=64):
        raise RuntimeError
    assert autotune.lookup("unfold", "cpu", torch.float32, R=1, L=1).meta != {"BLOCK_R": 8, "BLOCK_L": 64}


@pytest.mark.parametrize("kernel, params, message", [
    ("unfold", {"BLOCK_R": 8, "BLOCK_L": 48}, r"force_config\('unfold'\): refused for unfold: BLOCK_L=48 is not a "
                                              r"power of two in \[16, 512\]"),
    ("unfold", {"BLOCK_R": 8, "BLOCK_L": 1024}, "BLOCK_L=1024 is not a power of two in"),
    ("unfold", {"BLOCK_R": 8}, "unfold needs every tile; BLOCK_L missing"),
    ("unfold", {"BLOCK_R": 8, "BLOCK_L": 64, "BLOCK_X": 2}, "unfold has no parameter 'BLOCK_X'"),
    ("unfold", {"BLOCK_R": 8, "BLOCK_L": 64, "num_warps": 3}, "num_warps=3 is not a power of two"),
    ("unfold", {"BLOCK_R": 8, "BLOCK_L": 64, "num_stages": 2}, r"num_stages=2 is not in \[1, 1\]"),
    ("unfold", {"BLOCK_R": 8, "BLOCK_L": True}, "BLOCK_L=True is not an integer"),
    ("local_conv_fwd", {"BLOCK_N": 8, "BLOCK_O": 16, "BLOCK_R": 16}, "BLOCK_N=8 is not a power of two in "
                                                                     r"\[16, 128\]"),
    ("conv9d", {"BLOCK": 8}, r"force_config\('conv9d'\): unknown kernel 'conv9d'"),
])
def test_bad_forced_configs_are_refused_on_entry(kernel, params, message, no_forcing):
    with pytest.raises(ValueError, match=message), autotune.force_config(kernel, **params):
        pass
    assert autotune.lookup("unfold", "cpu", torch.float32, R=1, L=1).meta != params  # nothing left forced


def test_keep_rule_refuses_at_the_launch_and_nothing_runs(no_forcing, monkeypatch, kernel_device):
    """The space allows the tiles, the kernel's keep() rule does not (for this dtype / these dims):
    a clear error at the call, no launch, no fallback."""
    spy = _Spy(kernels.unfold_kernel)
    monkeypatch.setattr(kernels, "unfold_kernel", spy)
    x = torch.randn(1, 2, 6, 6, device=kernel_device)
    # 16 elements: below keep()'s 256
    with autotune.force_config("unfold", BLOCK_R=1, BLOCK_L=16), \
            pytest.raises(ValueError, match=r"force_config\('unfold'\): forced config refused for unfold "
                                            r"\(float32, .*keep\(\) rule rejects it"):
        kernels.unfold(x, [3, 3], [1, 1], [0, 0, 0, 0], [1, 1])
    assert spy.launches == []
    # fp64 runs the GEMM kernels as broadcast-sums: keep() allows only small M·N·K products there
    with autotune.force_config("local_conv_fwd", BLOCK_N=64, BLOCK_O=64, BLOCK_R=64, num_stages=1):
        autotune.lookup("local_conv_fwd", "cpu", torch.float32, N=64, O=64, R=64)  # fine in fp32
        with pytest.raises(ValueError, match=r"refused for local_conv_fwd \(float64.*keep"):
            autotune.lookup("local_conv_fwd", "cpu", torch.float64, N=64, O=64, R=64)


@pytest.mark.parametrize("value, message", [
    ("unfold BLOCK_R=8", r"CONVZOO_CONFIG: 'unfold BLOCK_R=8' is not 'kernel:NAME=int,...'"),
    ("unfold:BLOCK_R=eight,BLOCK_L=64", r"CONVZOO_CONFIG: unfold: 'BLOCK_R=eight' is not NAME=<integer>"),
    ("unfold:BLOCK_R=8,,BLOCK_L=64", "CONVZOO_CONFIG: unfold: '' is not NAME=<integer>"),
    ("unfold:BLOCK_R=-8,BLOCK_L=64", "'BLOCK_R=-8' is not NAME=<integer>"),
    ("unfold:BLOCK_R=8,BLOCK_R=8,BLOCK_L=64", "CONVZOO_CONFIG: unfold: BLOCK_R is named twice"),
    ("unfold:BLOCK_R=8,BLOCK_L=64;unfold:BLOCK_R=8,BLOCK_L=64", "CONVZOO_CONFIG: kernel 'unfold' is named twice"),
    ("unfld:BLOCK_R=8,BLOCK_L=64", "CONVZOO_CONFIG: unknown kernel 'unfld'"),
    # a bad entry for another kernel is refused too, not ignored until that kernel runs
    ("fold:BLOCK_R=8,BLOCK_P=100;unfold:BLOCK_R=8,BLOCK_L=64", "CONVZOO_CONFIG: fold: refused for fold: BLOCK_P=100"),
])
def test_malformed_env_var_is_refused_at_lookup(value, message, no_forcing, monkeypatch):
    monkeypatch.setenv(autotune.CONFIG_ENV, value)
    with pytest.raises(ValueError, match=message):
        autotune.lookup("unfold", "cpu", torch.float32, R=8, L=8)
    with pytest.raises(ValueError, match=message):  # every time, not only the first
        autotune.lookup("unfold", "cpu", torch.float32, R=8, L=8)


def test_parse_config_env_grammar():
    assert autotune.parse_config_env(" unfold : BLOCK_R = 8 , BLOCK_L=64 ;; fold:BLOCK_R=2,BLOCK_P=128,num_warps=8;") \
        == {"unfold": {"BLOCK_R": 8, "BLOCK_L": 64}, "fold": {"BLOCK_R": 2, "BLOCK_P": 128, "num_warps": 8}}
    assert autotune.parse_config_env("") == {}
