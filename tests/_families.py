"""Checks that several test files run on their own family of layers, written once.

- RigL (``regrow='gradient'``) on a dynamic-sparse layer, conv or linear: ``topk_by_hand`` (the oracle of which
  connections one prune/regrow step swaps) and ``check_rigl_period`` (one update period against the caller's own
  brute-force dense gradient).
- A kernel launcher's tables (the masked_conv forward, grad-input and grad-weight tests): ``assert_matches_reference``
  (an output against its float64 reference), ``check_config_space`` (every heuristic default and candidate of a
  kernel's autotune spec is one the table reader accepts),
  ``density_mask`` (the masks of a density id), ``assert_refuses`` (one row of a bad-input table, from the
  ``BAD_INPUT_GEOMETRY`` every masked_conv launcher's accepted case has), ``float32_matmul_precision`` (torch's
  setting, restored).
- Two gloo ranks against one process: ``assert_two_ranks_match_one_process`` trains the caller's model under
  DistributedDataParallel (or another wrapper) in 2 CPU processes and compares both ranks' final state with one
  process trained on the whole batch.

Each check compares against a reference the calling test passes in (a dense-gradient function, a model and its
training loop): the helper holds the loop and the assertions, never the oracle of the family under test.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from problems import TOL
from torch import nn

from convzoo import autotune

TAP = dict(rtol=1e-5, atol=1e-6)  # the tapped gradients against autograd's: fp32 sums in another order


# ---------------------------------------------------------------------------------------------- RigL
def cubic_loss(y):
    return (y ** 3).mean()  # not linear in y: the gradient depends on the sample, every entry differs


def topk_by_hand(mask, prune_score, regrow_score, fraction, dims=(0,)):
    """Per slice of ``dims`` (``(0,)``: per output row; ``()``: the whole tensor): the round(fraction·a) kept
    entries of lowest prune score and as many dropped ones of highest regrow score (Python sorts; the data is
    continuous, no ties)."""
    rows = (lambda t: t.reshape(t.shape[0], -1)) if dims else (lambda t: t.reshape(1, -1))
    m, p, r = rows(mask), rows(prune_score), rows(regrow_score)
    pruned, regrown = torch.zeros_like(m), torch.zeros_like(m)
    for i in range(m.shape[0]):
        kept = [j for j in range(m.shape[1]) if m[i, j]]
        off = [j for j in range(m.shape[1]) if not m[i, j]]
        k = min(round(len(kept) * fraction), len(off))
        for j in sorted(kept, key=lambda j: p[i, j].item())[:k]:
            pruned[i, j] = True
        for j in sorted(off, key=lambda j: -r[i, j].item())[:k]:
            regrown[i, j] = True
    return pruned.view(mask.shape), regrown.view(mask.shape)


def check_rigl_period(layer, xs, dense_grad, prune_dims=(0,)):
    """One update period of ``layer`` (``regrow='gradient'``, ``update_every=3``, magnitude scores) on the four
    inputs ``xs`` (``requires_grad``): on each of the first three forwards the input's and the weight's gradients
    are autograd's (``dense_grad(layer, x)``: the caller's dense gradient of ``cubic_loss`` of the same model on
    ``weight·mask``, which also leaves the plain model's input gradient in ``x.grad``), masked; the third (the
    update step) taps the dense gradient off the mask, exactly 0 on it; ``prune_regrow(0.3)`` swaps the
    connections ``topk_by_hand`` picks (regrown ones start at 0, the tap is cleared); the fourth forward does
    not tap."""
    for i, x in enumerate(xs[:3]):  # the third forward (calls 0, 1, 2) is the update step
        layer.zero_grad()
        cubic_loss(layer(x)).backward()
        dx, x.grad = x.grad, None
        want = dense_grad(layer, x)
        torch.testing.assert_close(dx, x.grad, **TAP)
        # the weight's gradient is exactly the masked one on every step
        torch.testing.assert_close(layer.weight.grad, want * layer.mask, **TAP)
        if i < 2:
            assert layer.dense_grad is None
    dense = layer.dense_grad
    torch.testing.assert_close(dense, want * ~layer.mask, **TAP)
    assert torch.equal(dense[layer.mask], torch.zeros_like(dense[layer.mask]))
    mask, w = layer.mask.clone(), layer.weight.detach().clone()
    out = layer.prune_regrow(fraction=0.3)
    pruned, regrown = topk_by_hand(mask, w.abs(), want.abs(), 0.3, prune_dims)
    assert regrown.any() and torch.equal(out.pruned, pruned) and torch.equal(out.regrown, regrown)
    assert torch.equal(layer.mask, (mask & ~pruned) | regrown)
    # RigL's init: regrown weights start at zero; the tap is cleared for the next period
    assert torch.equal(layer.weight[regrown], torch.zeros_like(layer.weight[regrown])) and layer.dense_grad is None
    # the next forward (call 3) is not an update step
    cubic_loss(layer(xs[3])).backward()
    assert layer.dense_grad is None


# ---------------------------------------------------------------------------------------------- launchers
def assert_matches_reference(got, want, dtype):
    """``got``, a launcher's output in ``dtype``, is allocated like its float64 reference ``want`` (same shape,
    contiguous) and within ``dtype``'s tolerance of it."""
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


def check_config_space(name, blocks, dims, dtype, bounds=None, keep_default=False):
    """The autotune spec ``name`` at every block ``(BO, BK)`` of ``blocks`` and ``M`` positions in (1, 7, 100,
    4096, 10^6) (``dims``: the other lookup dims): the heuristic default is the same for raw and bucketed dims
    and (with ``keep_default``, even by the ``keep`` rule) one the table reader accepts; so is every candidate;
    each has ``BLOCK_M`` a power of two, >= 16 where tl.dot runs (not fp64's broadcast-sum), and passes the
    family's own ``bounds(cfg, bo, bk)``; every block has candidates."""
    spec = autotune.get_spec(name)
    for bo in blocks:
        for bk in blocks:
            for m in (1, 7, 100, 4096, 10**6):
                raw = {"M": m, **dims, "BO": bo, "BK": bk}
                bucketed = {d: autotune.bucket(v) for d, v in raw.items()}
                default = spec.default_config(raw, dtype, False)
                assert default == spec.default_config(bucketed, dtype, False)
                spec.check(default, dtype, bucketed)
                assert spec.space.keep(default, dtype) or not keep_default, default
                cands = list(spec.candidates(bucketed, dtype))
                for cfg in [default, *cands]:
                    spec.check(cfg, dtype, bucketed)
                    bm = cfg.meta["BLOCK_M"]
                    assert bm & (bm - 1) == 0 and (bm >= 16 or dtype == torch.float64), cfg
                    if bounds is not None:
                        bounds(cfg, bo, bk)
            assert cands, (bo, bk)


def density_mask(shape, density, whole_blocks):
    """A bool mask of ``shape``: ``"zero"``, ``"one"``, ``"block<share>"`` (``whole_blocks(share)``: the family's
    own mask of whole kept blocks), or a float (random elements, each kept with that probability)."""
    if density == "zero":
        return torch.zeros(shape, dtype=torch.bool)
    if density == "one":
        return torch.ones(shape, dtype=torch.bool)
    if isinstance(density, str):
        return whole_blocks(float(density.removeprefix("block")))
    return torch.rand(shape) < density


# the accepted base case of every masked_conv launcher's bad-input table: 3x3, stride 1, padding 1, 2 groups
BAD_INPUT_GEOMETRY = dict(kernel_size=[3, 3], dilation=[1, 1], padding=[1, 1, 1, 1], stride=[1, 1],
                          padding_mode="zeros", groups=2, block=(16, 16))


def assert_refuses(launcher, args, case):
    """One row ``(changes, exc, match)`` of a bad-input table: each change ``name: f(args)`` replaces one of the
    accepted ``args`` (each file's ``_good``); the launcher raises ``exc`` matching ``match``."""
    changes, exc, match = case
    for name, f in changes.items():
        args[name] = f(args)
    with pytest.raises(exc, match=match):
        launcher(**args)


@contextlib.contextmanager
def float32_matmul_precision(precision):
    """``torch.set_float32_matmul_precision(precision)`` inside the block, the previous setting after it."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


# ---------------------------------------------------------------------------------------------- two ranks
def _rank_worker(rank, world, out_dir, make_model, train, wrap):
    # a file rendezvous (no port to race for) and a timeout: a lost peer fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        model = make_model()
        train(wrap(model), rank, world)
        # FSDP2 leaves sharded DTensors: the whole tensor is what one process would hold
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
                 for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(out_dir, f"{rank}.pt"))
        # no rank tears its group down while the other may still be in a collective, and none with FSDP2's
        # modules and their pending work alive (torch 2.11: without this, a gloo rank of the fully_shard test
        # aborted at exit, "terminate called without an active exception", in 2 of 14 runs)
        del model, state
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def assert_two_ranks_match_one_process(tmp_path, make_model, train, *, wrap=nn.parallel.DistributedDataParallel,
                                       atol, rtol):
    """``train(wrap(make_model()), rank, 2)`` in 2 gloo CPU processes (``train`` takes its rank's half of each
    batch), against ``train(make_model())`` in this one on the whole batches: both ranks end with the same state
    to the bit, and the one process's to ``atol``/``rtol``. ``make_model``, ``train`` and ``wrap`` are module-level
    (pickled into the spawned ranks). Returns rank 0's state dict."""
    mp.spawn(_rank_worker, args=(2, str(tmp_path), make_model, train, wrap), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    single = train(make_model()).state_dict()
    assert list(r0) == list(r1) == list(single)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], single[k], atol=atol, rtol=rtol, msg=k)
    return r0
