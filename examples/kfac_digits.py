"""K-FAC and EKFAC against SGD and Adam on 8×8 digits: the same small CNN, initial weights, batches and epochs,
four ways — SGD with momentum, Adam, and SGD with momentum on gradients preconditioned by ``convzoo.KFAC`` (K-FAC)
and by ``convzoo.KFAC(..., ekfac=True)`` (EKFAC's eigenvalue correction).

    python examples/kfac_digits.py [--epochs 10] [--seed 0] [--lr 0.05] [--damping 0.01]

The preconditioner needs two lines in the training loop: ``kfac = convzoo.KFAC(model, damping=..., lr=...)`` once,
then ``kfac.step()`` between ``loss.backward()`` and ``optimizer.step()``; it replaces every conv's and linear
layer's gradient by ``(G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹`` (π-split Tikhonov damping, eigendecompositions every
``--inverse-every`` steps, kfac-pytorch's KL clipping). The data are scikit-learn's 8×8 handwritten digits, or,
without scikit-learn, seeded synthetic 8×8 digits (see ``dynamic_sparse_digits.py``). The table reports what
happens, whichever optimiser wins.
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

# the data, the network and the options every digits example ends with are the digits example's: one definition
_spec = importlib.util.spec_from_file_location("dynamic_sparse_digits", Path(__file__).with_name(
    "dynamic_sparse_digits.py"))
digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits)

METHODS = ("SGD", "Adam", "KFAC", "EKFAC")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="seeds the split, the initial weights, the batches")
    ap.add_argument("--lr", type=float, default=0.05, help="SGD's learning rate (plain and preconditioned)")
    ap.add_argument("--adam-lr", type=float, default=3e-3)
    ap.add_argument("--damping", type=float, default=0.01, help="K-FAC's damping λ (π-split)")
    ap.add_argument("--inverse-every", type=int, default=10, help="steps between eigendecompositions")
    ap.add_argument("--kl-clip", type=float, default=1e-3, help="K-FAC's KL clip (0: none)")
    args = digits.parse(ap, argv, METHODS)
    methods = args.methods
    t0 = time.perf_counter()
    x_train, y_train, x_test, y_test = digits.load(args)
    batch = 32

    torch.manual_seed(args.seed)
    base = digits.make_net(nn.Conv2d)
    nets, opts, kfacs = {}, {}, {}
    for method in methods:
        net = nets[method] = copy.deepcopy(base)  # the same initial weights for all
        if method == "Adam":
            opts[method] = torch.optim.Adam(net.parameters(), lr=args.adam_lr)
        else:
            opts[method] = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
        if method in ("KFAC", "EKFAC"):
            kfacs[method] = convzoo.KFAC(net, damping=args.damping, inverse_every=args.inverse_every,
                                         kl_clip=args.kl_clip or None, lr=args.lr, ekfac=method == "EKFAC")
    print(f"SGD momentum 0.9 lr {args.lr:g}; Adam lr {args.adam_lr:g}; K-FAC damping {args.damping:g} (π split), "
          f"eigendecompositions every {args.inverse_every} steps, KL clip {args.kl_clip:g}")
    print("epoch  " + "  ".join(f"{m + ' loss':>10}  {m + ' acc':>9}" for m in methods))
    result = {}
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        losses = dict.fromkeys(methods, 0.0)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            for method, net in nets.items():  # the same batch for all
                opts[method].zero_grad()
                loss = nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
                loss.backward()
                if method in kfacs:
                    kfacs[method].step()  # precondition the gradients in place
                opts[method].step()
                losses[method] += loss.item() * len(idx)
        accs = {m: digits.accuracy(net, x_test, y_test) for m, net in nets.items()}
        result = {m: {"loss": losses[m] / len(y_train), "accuracy": accs[m]} for m in methods}
        print(f"{epoch:>5}  " + "  ".join(f"{result[m]['loss']:>10.4f}  {result[m]['accuracy']:>9.3f}"
                                         for m in methods))
    print(f"done in {time.perf_counter() - t0:.1f} s ({len(nets)} networks)")
    return result


if __name__ == "__main__":
    main()
