"""The runnable examples run: ``examples/dynamic_sparse_digits.py`` with tiny settings, in a subprocess on the
plain-torch path (TRITON_INTERPRET=0), as a user runs it."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "dynamic_sparse_digits.py"


def _example_module():
    spec = importlib.util.spec_from_file_location("dynamic_sparse_digits", DIGITS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~8 s on a loaded 2-core box, most of it the subprocess importing torch
def test_dynamic_sparse_digits_prints_accuracy_and_keeps_the_density():
    """Two tiny epochs with a prune/regrow every 2 steps: one line per epoch with both accuracies, connections
    regrown, and exactly the initial count of kept weights every epoch: round(density·fan-in) per output channel
    of each conv (MaskedConv's initial mask), never drifting through the prune/regrow steps."""
    density = 0.5
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                                        "")]))
    run = subprocess.run([sys.executable, str(DIGITS), "--epochs", "2", "--samples", "300", "--every", "2",
                          "--density", str(density), "--seed", "3"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    convs = [m for m in _example_module().make_net(torch.nn.Conv2d).modules() if isinstance(m, torch.nn.Conv2d)]
    total = sum(m.weight.numel() for m in convs)
    kept = sum(m.out_channels * round(density * m.weight[0].numel()) for m in convs)
    assert f"{kept} of {total} weights kept" in run.stdout
    epochs = re.findall(r"^ +(\d+) +([\d.]+) +([\d.]+) +([\d.]+) +(\d+) +(\d+)$", run.stdout, re.MULTILINE)
    assert [int(e[0]) for e in epochs] == [1, 2], run.stdout
    for _, dense_acc, sparse_acc, dens, k, _ in epochs:
        assert 0 <= float(dense_acc) <= 1 and 0 <= float(sparse_acc) <= 1
        assert int(k) == kept and float(dens) == round(kept / total, 4)
    assert int(epochs[0][5]) > 0  # the masks did change: the count held through real prune/regrow steps
    assert "240 train / 60 test images" in run.stdout and "done in" in run.stdout


METHODS = ROOT / "examples" / "sparse_methods_digits.py"


@pytest.mark.slow  # ~15 s: five networks, the subprocess importing torch
def test_sparse_methods_digits_compares_every_method_at_the_same_exact_density():
    """Two tiny epochs, prune/regrow every 2 steps, 16×16 tiles: the final table has a row per method, every sparse
    method keeps exactly round(density·P) weights (the same count for all: sparsify's exact total) and, with whole
    tiles, visits exactly that fraction of the tiles (the example's layers have no partial edge tiles)."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                                        "")]))
    run = subprocess.run([sys.executable, str(METHODS), "--epochs", "2", "--samples", "300", "--every", "2",
                          "--block", "16", "--seed", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    kept = re.search(r"(\d+) of (\d+) weights kept", run.stdout)
    assert kept, run.stdout
    assert int(kept.group(1)) == round(0.1 * int(kept.group(2)))
    rows = dict((m, (float(a), float(d), float(t))) for m, a, d, t in
                re.findall(r"^(\w+) +([\d.]+) +([\d.]+) +([\d.]+)$", run.stdout, re.MULTILINE))
    assert set(rows) == {"dense", "static", "SET", "RigL", "Hebbian"}, run.stdout
    assert rows["dense"][1:] == (1.0, 1.0)
    for method in ("static", "SET", "RigL", "Hebbian"):
        acc, dens, tiles = rows[method]
        assert 0 <= acc <= 1
        assert dens == round(int(kept.group(1)) / int(kept.group(2)), 4)
        assert tiles == round(dens, 3)
    epochs = re.findall(r"^ +(\d+)(?: +[\d.]+){5}$", run.stdout, re.MULTILINE)
    assert epochs == ["1", "2"], run.stdout


KFAC_DIGITS = ROOT / "examples" / "kfac_digits.py"


@pytest.mark.slow  # ~15 s: four networks, the subprocess importing torch
def test_kfac_digits_trains_every_optimiser():
    """Two tiny epochs of each optimiser: a loss and an accuracy per method and epoch, finite, and the
    preconditioned runs actually differ from plain SGD (KFAC.step() changed the gradients it was given)."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                                        "")]))
    run = subprocess.run([sys.executable, str(KFAC_DIGITS), "--epochs", "2", "--samples", "300", "--inverse-every",
                          "3", "--seed", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    header = re.search(r"^epoch((?:\s+\w+ loss\s+\w+ acc)+)$", run.stdout, re.MULTILINE)
    assert header and re.findall(r"(\w+) loss", header.group(1)) == ["SGD", "Adam", "KFAC", "EKFAC"], run.stdout
    epochs = [line.split() for line in re.findall(r"^ +\d+(?: +[\d.]+){8}$", run.stdout, re.MULTILINE)]
    assert [int(e[0]) for e in epochs] == [1, 2], run.stdout
    for e in epochs:
        losses, accs = [float(v) for v in e[1::2]], [float(v) for v in e[2::2]]
        assert all(0 < v < 10 for v in losses) and all(0 <= a <= 1 for a in accs)
        assert losses[2] != losses[0] and losses[3] != losses[0] and losses[3] != losses[2]
    assert "240 train / 60 test images" in run.stdout and "done in" in run.stdout
