"""convzoo.KFAC under DistributedDataParallel (gloo, 2 CPU processes): the factors are all-reduced before each
eigendecomposition, so both ranks precondition identically, and as one process on the concatenated batch."""

import pytest
import torch
import torch.nn.functional as F
from _families import assert_two_ranks_match_one_process
from torch import nn

import convzoo


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, groups=1), nn.ReLU(), nn.ConvTranspose2d(3, 2, 2, stride=2),
                         nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
            for _ in range(4)]


def _train(model, rank=None, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kfac = convzoo.KFAC(model, inverse_every=2, beta=0.5)
    for x, y in _batches():
        if rank is not None:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        kfac.step()
        opt.step()
    return model


@pytest.mark.slow
def test_two_ranks_precondition_identically_and_as_one_process(tmp_path):
    """Each rank's local factors differ (half the batch each); all-reduced before each inverse they are the
    whole batch's (the EMA is linear), so both ranks end with the same weights as one process on it."""
    assert_two_ranks_match_one_process(tmp_path, _model, _train, atol=1e-10, rtol=1e-10)
