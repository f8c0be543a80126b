"""Checks that several test files run on their own family of layers, written once.

- RigL (``regrow='gradient'``) on a dynamic-sparse layer, conv or linear: ``topk_by_hand`` (the oracle of which
  connections one prune/regrow step swaps) and ``check_rigl_period`` (one update period against the caller's own
  brute-force dense gradient).
- Two gloo ranks against one process: ``assert_two_ranks_match_one_process`` trains the caller's model under
  DistributedDataParallel (or another wrapper) in 2 CPU processes and compares both ranks' final state with one
  process trained on the whole batch.

Each check compares against a reference the calling test passes in (a dense-gradient function, a model and its
training loop): the helper holds the loop and the assertions, never the oracle of the family under test.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

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
