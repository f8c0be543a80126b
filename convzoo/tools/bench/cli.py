"""convzoo vs its peers on the best available device: a table, CSV rows, a markdown table and plots.

GPU: ``triton.testing.do_bench`` quantiles. CPU: wall-clock quantiles of the CPU paths (labelled
CPU). Every row carries GB/s, TFLOP/s, % of this device's measured copy-bandwidth / matmul
roofline, and peak memory. Rows are appended to ``<out>/<device>.csv``; ``<out>/<device>.md`` and
``<out>/<device>/<op>.png`` show the latest run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from convzoo.tools._cli import check_device, check_writable
from convzoo.tools.bench import harness, ops

DEFAULT_OUT = Path(__file__).parent / "results"






def parse_args(argv=None) -> argparse.Namespace:
    """The command line, validated before any timing: unknown or empty lists, a device that is not
    cpu or a CUDA GPU here, or an ``--out`` that cannot be written (unless ``--no-save``) exit 2 with a
    one-line message naming the argument."""
    ap = argparse.ArgumentParser(prog="convzoo-bench", description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="size", const="quick",
                      help="a few layer shapes, fwd and fwd+bwd: about a minute on a laptop CPU (the default)")
    size.add_argument("--full", action="store_const", dest="size", const="full",
                      help="real layer shapes, every mode, torch.compile peers too: minutes on a GPU")
    size.add_argument("--tiny", action="store_const", dest="size", const="tiny", help="tiny shapes (smoke test)")
    ap.set_defaults(size="quick")
    ap.add_argument("--ops", default=",".join(ops.OPS), help=f"comma-separated subset of {','.join(ops.OPS)}")
    ap.add_argument("--modes", default=None, help="comma-separated subset of fwd,bwd,fwd+bwd "
                                                  "(default: fwd,fwd+bwd; --full: all three)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--reps", type=int, default=7, help="CPU timing samples per row")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: bench/results)")
    ap.add_argument("--no-save", action="store_true", help="print only: no CSV, markdown or plots")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    args = ap.parse_args(argv)
    if args.reps < 2:
        ap.error("--reps must be at least 2 (quantiles need two samples)")
    raw, args.ops = args.ops, [o for o in args.ops.split(",") if o]
    if not args.ops:
        ap.error(f"--ops: no op named in {raw!r}; choose from {','.join(ops.OPS)}")
    for o in args.ops:
        if o not in ops.OPS:
            ap.error(f"--ops: unknown op {o!r}; choose from {','.join(ops.OPS)}")
    modes = args.modes or ("fwd,bwd,fwd+bwd" if args.size == "full" else "fwd,fwd+bwd")
    args.modes = [m for m in modes.split(",") if m]
    if not args.modes:
        ap.error(f"--modes: no mode named in {modes!r}; choose from {','.join(harness.MODES)}")
    for m in args.modes:
        if m not in harness.MODES:
            ap.error(f"--modes: unknown mode {m!r}; choose from {','.join(harness.MODES)}")
    check_device(ap, args.device, ("cpu", "cuda"), "bench runs on cpu or cuda", require_cuda=True)
    if not args.no_save:
        try:
            check_writable(args.out)
        except (OSError, ValueError) as e:
            ap.error(f"--out: cannot write results to {args.out} ({type(e).__name__}: {e})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: timings would measure the interpreter; unset it.", file=sys.stderr)
        return 2
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env = harness.environment(device)
    print(f"# {env['device']}, {args.dtype}, torch {env['torch']}, triton {env['triton'] or '-'}, "
          f"{args.size} run")
    limits = harness.measure_limits(device, dtype)
    print(f"# measured: copy {limits.copy_bytes_per_s / 1e9:.1f} GB/s, matmul "
          f"{limits.matmul_flops_per_s / 1e12:.2f} TFLOP/s ({limits.dtype})")
    rows = harness.run(ops.problems(args.size, args.ops), ops.providers(), args.modes, device, dtype, limits,
                       full=args.size == "full", reps=args.reps, memory=not args.no_memory, log=None,
                       env=env)
    print(harness.format_table(rows))
    if not args.no_save and rows:
        slug = harness.device_slug(env["device"])
        csv_path = args.out / f"{slug}.csv"
        harness.append_csv(csv_path, rows)
        harness.write_markdown(args.out / f"{slug}.md", rows, limits, args.size)
        plots = harness.write_plots(args.out / slug, rows)
        print(f"# wrote {csv_path}, {args.out / f'{slug}.md'}" + (f" and {len(plots)} plots" if plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
