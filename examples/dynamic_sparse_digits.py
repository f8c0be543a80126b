"""Dynamic sparse training on 8×8 digits: a small CNN of ``convzoo.DynamicSparseConv2d`` layers against the same
network dense (``nn.Conv2d``), trained identically (same initial weights, batches, optimizer and epochs).

    python examples/dynamic_sparse_digits.py [--epochs 10] [--density 0.25] [--seed 0] [--score magnitude]

The data are scikit-learn's 8×8 handwritten digits (``sklearn.datasets.load_digits``: shipped inside scikit-learn,
no download); without scikit-learn, a synthetic 10-class 8×8 set of the same size (seeded class prototypes,
shifted by up to a pixel, plus noise). Each sparse conv keeps ``--density`` of its weights, the same number in
every output channel. Each training forward adds the layer's coactivation counts (how often a connection's input
and output are both positive: ``convzoo.functional.coactivation``) to its statistics; every ``--every`` steps
``PruneRegrowSchedule`` drops the weakest fraction of each channel's kept weights (lowest ``|w|`` or lowest
count, ``--score``) and regrows as many dropped ones, those with the highest counts, the fraction decaying to 0
over the first 3/4 of the training (RigL's cosine schedule). The density never changes.

It shows the mechanics, not a gain: on a problem this small a fixed random mask (``--fraction 0``) does as well.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from torch import nn

import convzoo


def load_data(samples: int | None, seed: int):
    """``(x_train, y_train, x_test, y_test, name)``: images ``[n, 1, 8, 8]`` in [0, 1], 80 / 20 split."""
    try:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
        y = torch.tensor(digits.target)
        name = "scikit-learn's 8×8 digits"
    except ImportError:
        g = torch.Generator().manual_seed(1234)  # the same data whatever --seed (which seeds the training)
        protos = (torch.rand(10, 1, 10, 10, generator=g) > 0.6).float()  # a blob of ink per class, 10×10
        y = torch.arange(1797) % 10
        dy, dx = torch.randint(0, 3, (2, 1797), generator=g)  # an 8×8 crop: shifted by -1, 0 or +1 pixel
        x = torch.stack([protos[c, :, i:i + 8, j:j + 8] for c, i, j in zip(y, dy, dx)])
        x = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        name = "synthetic 8×8 digits (scikit-learn is not installed)"
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:samples]
    x, y = x[order], y[order]
    cut = len(y) * 4 // 5
    return x[:cut], y[:cut], x[cut:], y[cut:], name


def parse(ap: argparse.ArgumentParser, argv, methods=None) -> argparse.Namespace:
    """The options every digits example ends with (``--samples``; ``--methods``, a comma-separated subset of
    ``methods``, where it compares some; ``--threads``), parsed and applied: ``args.methods`` becomes the list."""
    ap.add_argument("--samples", type=int, default=None, help="use at most this many of the 1797 images")
    if methods is not None:
        ap.add_argument("--methods", default=",".join(methods), help=f"comma-separated, of {', '.join(methods)}")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    if methods is not None:
        args.methods = args.methods.split(",")
        if unknown := [m for m in args.methods if m not in methods]:
            ap.error(f"unknown --methods {unknown}; choose from {list(methods)}")
    # one thread by default: on 8×8 images an OpenMP team costs more than it saves, and on a busy machine a
    # descheduled team member stalls every op (10× slower measured on a loaded 2-core box)
    torch.set_num_threads(args.threads)
    return args


def load(args: argparse.Namespace):
    """``(x_train, y_train, x_test, y_test)`` of ``--samples`` images split by ``--seed``, the data named."""
    x_train, y_train, x_test, y_test, name = load_data(args.samples, args.seed)
    print(f"data: {name}: {len(y_train)} train / {len(y_test)} test images")
    return x_train, y_train, x_test, y_test


def make_net(conv) -> nn.Sequential:
    """Three 3×3 convs (8×8 → 4×4 → 2×2) and a linear classifier; ``conv`` builds each conv."""
    return nn.Sequential(conv(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         conv(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         conv(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 2 * 2, 10))


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()  # no statistics collected in eval mode
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    net.train()
    return acc


def masks(net: nn.Module) -> list[torch.Tensor]:
    return [m.mask for m in net.modules() if isinstance(m, convzoo.DynamicSparseConv2d)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--density", type=float, default=0.25, help="kept fraction of each sparse conv (default 0.25)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the split, the initial weights and masks, the batches")
    ap.add_argument("--score", choices=("magnitude", "count"), default="magnitude",
                    help="what prunes: lowest |w| (default) or lowest coactivation count")
    ap.add_argument("--every", type=int, default=20, help="training steps between prune/regrow updates")
    ap.add_argument("--fraction", type=float, default=0.1, help="initial fraction of kept weights replaced")
    args = parse(ap, argv)
    t0 = time.perf_counter()
    x_train, y_train, x_test, y_test = load(args)
    batch = 32
    steps = args.epochs * -(-len(y_train) // batch)

    torch.manual_seed(args.seed)
    dense = make_net(nn.Conv2d)
    sparse = make_net(functools.partial(convzoo.DynamicSparseConv2d, density=args.density, score=args.score))
    with torch.no_grad():  # the same initial weights (the sparse convs use only their masks' share)
        for p, q in zip(sparse.parameters(), dense.parameters(), strict=True):
            p.copy_(q)
    opts = {net: torch.optim.Adam(net.parameters(), lr=3e-3) for net in (dense, sparse)}
    schedule = convzoo.PruneRegrowSchedule(sparse, opts[sparse], every=args.every, end=max(1, steps * 3 // 4),
                                           fraction=args.fraction, generator=torch.Generator().manual_seed(args.seed))
    total = sum(m.numel() for m in masks(sparse))
    print(f"sparse convs: {sum(int(m.sum()) for m in masks(sparse))} of {total} weights kept, per conv "
          f"{', '.join(f'{m.float().mean().item():.3f}' for m in masks(sparse))} (asked {args.density:g}); "
          f"score={args.score!r}, regrow='coactivation', fraction {args.fraction:g} every {args.every} steps until "
          f"step {schedule.end}")
    print("epoch  dense acc  sparse acc  density  kept  regrown")
    for epoch in range(1, args.epochs + 1):
        before = [m.clone() for m in masks(sparse)]
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            for net, opt in opts.items():  # the same batch for both
                opt.zero_grad()
                nn.functional.cross_entropy(net(x_train[idx]), y_train[idx]).backward()
                opt.step()
            schedule.step()  # prunes and regrows every `every` steps
        kept = sum(int(m.sum()) for m in masks(sparse))
        regrown = sum(int((a & ~b).sum()) for a, b in zip(masks(sparse), before))  # kept now, not at the start
        print(f"{epoch:>5}  {accuracy(dense, x_test, y_test):>9.3f}  {accuracy(sparse, x_test, y_test):>10.3f}  "
              f"{kept / total:>7.4f}  {kept:>4}  {regrown:>7}")
    print(f"done in {time.perf_counter() - t0:.1f} s (both networks)")


if __name__ == "__main__":
    main()
