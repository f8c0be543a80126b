"""The config lookup: user cache → shipped table → heuristic; stale/corrupt tables warn once."""

import json
import warnings

import pytest
import torch

from convzoo import autotune
from convzoo.autotune import Config
from convzoo.kernels import local_conv as _local_conv_kernels  # noqa: F401  (registers the kernels)
from convzoo.kernels import unfold as kernels  # noqa: F401

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
    a, b = Config({"BLOCK_R": 2, "BLOCK_L": 128}, 2, 1), Config({"BLOCK_R": 4, "BLOCK_L": 64}, 8, 3)
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
    ({"configs": {"float32|L=512|R=1024": {"meta": "x"}}}, "unreadable"),
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
@pytest.mark.parametrize("name", ["unfold", "fold", *sorted(DOT_KERNELS)])
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
    cfg = Config({"BLOCK_R": 8, "BLOCK_L": 32}, 4, 2)
    path = _write(user, {key: cfg})
    assert [p.name for p in path.parent.iterdir()] == ["unfold.json"]  # no temp file left
    assert Config.from_json(json.loads(path.read_text())["configs"][key]) == cfg
