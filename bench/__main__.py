"""Unfold / fold: convzoo vs the peers on the best available device, printed as a table.

GPU: ``triton.testing.do_bench`` medians. CPU: wall-clock medians of the CPU paths (labelled CPU).
GB/s counts the bytes the op must move: the columns written (read, for fold) plus the input read
(written, for fold). The autotune CLI and the full bench harness (plots, CSV rows, % of measured
peak) are separate work; this is the README's quick main job.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import convzoo.functional as cf

try:
    import unfoldNd
except ImportError:  # a bench-only dependency
    unfoldNd = None

QUICK = [  # (name, N, C, spatial, kernel, stride, padding)
    ("2d_resnet", 8, 64, (32, 32), 3, 1, 1),
    ("2d_strided", 8, 32, (56, 56), 3, 2, 1),
    ("1d", 16, 64, (1024,), 5, 1, 2),
    ("3d", 2, 16, (16, 16, 16), 3, 1, 1),
]
TINY = [("2d_tiny", 2, 3, (8, 8), 3, 1, 1), ("3d_tiny", 1, 2, (4, 4, 4), 2, 1, 0)]


def _time(fn, device, reps):
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, quantiles=[0.5])
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def providers(ndim, op):
    p = {}
    if op == "unfold":
        p["convzoo"] = lambda x, a: cf.unfold(x, **a)
        if ndim == 2:
            p["F.unfold"] = lambda x, a: F.unfold(x, **a)
        if unfoldNd is not None:
            p["unfoldNd"] = lambda x, a: unfoldNd.unfoldNd(x, **a)
    else:
        p["convzoo"] = lambda c, a: cf.fold(c, **a)
        if ndim == 2:
            p["F.fold"] = lambda c, a: F.fold(c, **a)
        if unfoldNd is not None:
            p["unfoldNd"] = lambda c, a: unfoldNd.foldNd(c, **a)
    return p


def run(shapes, device, dtype, reps=5):
    rows = []
    for name, n, c, size, k, s, p in shapes:
        x = torch.randn(n, c, *size, device=device, dtype=dtype)
        args = dict(kernel_size=k, stride=s, padding=p)
        cols = cf.unfold(x, **args)
        moved = (cols.numel() + x.numel()) * x.element_size()
        for op, inp, a in (("unfold", x, args), ("fold", cols, dict(args, output_size=tuple(size)))):
            for prov, fn in providers(len(size), op).items():
                ms = _time(lambda fn=fn, inp=inp, a=a: fn(inp, a), device, reps)
                rows.append((op, name, prov, ms, moved / ms / 1e6))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few layer shapes, about a minute on a laptop CPU")
    mode.add_argument("--tiny", action="store_true", help="tiny shapes, seconds (smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: timings would measure the interpreter; unset it.", file=sys.stderr)
        return 2
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (plain-torch paths)"
    print(f"# {label}, {dtype}, torch {torch.__version__}")
    rows = run(TINY if args.tiny else QUICK, device, dtype)
    print(f"{'op':<7} {'shape':<11} {'provider':<9} {'median ms':>10} {'GB/s':>8} {'vs convzoo':>10}")
    base = {(op, name): ms for op, name, prov, ms, _ in rows if prov == "convzoo"}
    for op, name, prov, ms, gbs in rows:
        print(f"{op:<7} {name:<11} {prov:<9} {ms:>10.3f} {gbs:>8.2f} {ms / base[op, name]:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
