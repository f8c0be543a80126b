"""Sparse training methods side by side on 8×8 digits: the same small CNN trained dense, with a fixed random mask,
and with three dynamic-sparse methods — SET (random regrowth), RigL (gradient regrowth) and Hebbian coactivation
regrowth (the Sparse-CNN notebook's) — at the same density, ERK-distributed, on the same data, batches, initial
weights, optimizer and prune/regrow schedule.

    python examples/sparse_methods_digits.py [--epochs 10] [--density 0.1] [--seed 0] [--block 0]

Every sparse model is made by one call, ``convzoo.sparsify(model, density, distribution="erk", ...)``: every conv
and linear layer but the first and the last (the usual exclusions) is swapped for its masked
(``kind="masked"``: the fixed mask) or dynamic-sparse layer, keeping exactly ``round(density · P)`` of the ``P``
prunable weights. ``convzoo.PruneRegrowSchedule`` prunes the smallest ``|w|`` and regrows as many connections every
``--every`` steps (RigL's cosine-decayed fraction, ending at 3/4 of the training). With ``--block B`` the masks are
whole ``B×B`` tiles and every update keeps them so; the last column, the fraction of weight tiles the masked-conv
kernels visit, then equals the density.

The data are scikit-learn's 8×8 handwritten digits (``sklearn.datasets.load_digits``: shipped inside scikit-learn,
no download) or, without scikit-learn, seeded synthetic 8×8 digits (see ``dynamic_sparse_digits.py``). The table
reports what happens, whichever method wins: on a problem this small, none has to.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from pathlib import Path

import torch
from torch import nn

import convzoo
from convzoo import sparsity

# the data, the network and the options every digits example ends with are the other digits example's: one definition
_spec = importlib.util.spec_from_file_location("dynamic_sparse_digits", Path(__file__).with_name(
    "dynamic_sparse_digits.py"))
digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits)

# name -> sparsify's kind and the dynamic layers' options (None: the dense network)
METHODS = {
    "dense": None,
    "static": {"kind": "masked"},
    "SET": {"kind": "dynamic", "score": "magnitude", "regrow": "random"},
    "RigL": {"kind": "dynamic", "score": "magnitude", "regrow": "gradient"},
    "Hebbian": {"kind": "dynamic", "score": "magnitude", "regrow": "coactivation"},
}


def sparse_layers(net: nn.Module) -> list[nn.Module]:
    """The masked / dynamic-sparse layers of ``net`` (those with a ``mask`` and ``tile_lists``), in module order."""
    return [m for m in net.modules() if hasattr(m, "tile_lists") and isinstance(getattr(m, "mask", None),
                                                                              torch.Tensor)]


def tile_fraction(net: nn.Module) -> float:
    """The fraction of weight tiles the kernels visit, over all sparse layers (tiles counted, not averaged)."""
    lists = [m.tile_lists() for m in sparse_layers(net)]
    visited = sum(float(sparsity.tile_fraction(t)) * t.occupancy.numel() for t in lists)
    return visited / max(sum(t.occupancy.numel() for t in lists), 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--density", type=float, default=0.1, help="kept fraction of the prunable weights (default 0.1)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the split, the initial weights and masks, the batches")
    ap.add_argument("--every", type=int, default=20, help="training steps between prune/regrow updates")
    ap.add_argument("--fraction", type=float, default=0.3, help="initial fraction of kept weights replaced (RigL's)")
    ap.add_argument("--block", type=int, default=0, help="masks of whole B×B tiles (16, 32, 64; 0: unstructured)")
    args = digits.parse(ap, argv, METHODS)
    methods = args.methods
    t0 = time.perf_counter()
    x_train, y_train, x_test, y_test = digits.load(args)
    batch = 32
    steps = args.epochs * -(-len(y_train) // batch)

    torch.manual_seed(args.seed)
    base = digits.make_net(nn.Conv2d)
    nets, opts, schedules = {}, {}, {}
    block = (args.block, args.block) if args.block else None
    for method in methods:
        net = copy.deepcopy(base)  # the same initial weights for all
        options = METHODS[method]
        if options is not None:
            if options.get("regrow") == "gradient":  # RigL's dense gradient: of the step before each update only
                options = {**options, "update_every": args.every}
            convzoo.sparsify(net, args.density, distribution="erk", block=block, init="random",
                             generator=torch.Generator().manual_seed(args.seed), **options)
        nets[method] = net
        opts[method] = torch.optim.Adam(net.parameters(), lr=3e-3)
        if options is not None and options["kind"] == "dynamic":
            schedules[method] = convzoo.PruneRegrowSchedule(
                net, opts[method], every=args.every, end=max(1, steps * 3 // 4), fraction=args.fraction,
                generator=torch.Generator().manual_seed(args.seed))
    some = next((n for n in nets.values() if sparse_layers(n)), None)
    if some is not None:
        layers = sparse_layers(some)
        kept = sum(int(m.mask.sum()) for m in layers)
        total = sum(m.mask.numel() for m in layers)
        print(f"sparse layers (ERK, first and last layer dense): {kept} of {total} weights kept "
              f"({kept / total:.4f}; asked {args.density:g}), per layer "
              f"{', '.join(f'{m.mask.float().mean().item():.3f}' for m in layers)}"
              + (f"; {args.block}×{args.block} tiles" if block else ""))
    print(f"{-(-len(y_train) // batch)} steps per epoch; prune/regrow every {args.every} steps, fraction "
          f"{args.fraction:g} cosine-decayed to 0 at step {max(1, steps * 3 // 4)}")
    header = "epoch  " + "  ".join(f"{m:>8}" for m in methods)
    print(header)
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            for method, net in nets.items():  # the same batch for all
                opts[method].zero_grad()
                nn.functional.cross_entropy(net(x_train[idx]), y_train[idx]).backward()
                opts[method].step()
                if method in schedules:
                    schedules[method].step()
        accs = {m: digits.accuracy(net, x_test, y_test) for m, net in nets.items()}
        print(f"{epoch:>5}  " + "  ".join(f"{accs[m]:>8.3f}" for m in methods))
    print()
    print("method    test acc  density  tiles visited")
    result = {}
    for method, net in nets.items():
        layers = sparse_layers(net)
        dens = (sum(int(m.mask.sum()) for m in layers) / sum(m.mask.numel() for m in layers)) if layers else 1.0
        tiles = tile_fraction(net) if layers else 1.0
        acc = digits.accuracy(net, x_test, y_test)
        result[method] = {"accuracy": acc, "density": dens, "tiles": tiles}
        print(f"{method:<8}  {acc:>8.3f}  {dens:>7.4f}  {tiles:>13.3f}")
    print(f"done in {time.perf_counter() - t0:.1f} s ({len(nets)} networks)")
    return result


if __name__ == "__main__":
    main()
