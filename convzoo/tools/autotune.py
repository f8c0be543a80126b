"""``convzoo-autotune`` (or ``python -m convzoo.tools.autotune``): tune every registered kernel
on named shape grids and write the winners as tables that :func:`convzoo.autotune.lookup` reads.

Tables go to the user cache (``$CONVZOO_CACHE_DIR`` or ``~/.cache/convzoo``)``/autotune/<gpu>/``
and, with ``--out DIR``, also to ``DIR/<gpu>/`` (to ship: copy into ``convzoo/autotune/tables/``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from convzoo.autotune import interpret_mode, registered, user_cache_dir
from convzoo.autotune.grids import GRIDS, Layer
from convzoo.autotune.lookup import device_slug
from convzoo.autotune.tune import (
    BENCH_MS,
    COMPILE_S,
    FINALISTS,
    candidates,
    do_bench_timer,
    estimate_seconds,
    plan,
    read_entries,
    summary,
    tune,
)
from convzoo.tools._cli import check_device, check_minutes, check_names, check_writable, user_path

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _block_dims(k_side: str) -> dict[str, str]:
    """The two lookup dims of each masked-conv kernel that its tile lists' blocks set (``k_side``: which side of the
    kernel's matrix the block columns span)."""
    return {"BO": "the tile lists' block rows (C_out side), sets BLOCK_O",
            "BK": f"the tile lists' block columns ({k_side}), sets BLOCK_K"}


# what each lookup dim of a table key counts, per kernel, and the tiles a config sets; from the
# launchers' autotune.lookup(...) calls and the KernelSpecs in convzoo/kernels/*.py (a test checks
# that the names match the registered specs)
KEY_LEGEND = {
    "unfold": ({"L": "output positions (blocks) = prod(out spatial size)",
                "R": "rows of the [N*C*prod(K), L] column matrix = N*C*prod(K)"},
               "BLOCK_R x BLOCK_L output tile (contiguous along L)"),
    "fold": ({"P": "pixels of the folded output = prod(output_size)",
              "R": "(n, c) rows = N*C"},
             "BLOCK_R x BLOCK_P output tile (contiguous along P)"),
    "local_conv_fwd": ({"N": "batch", "O": "output channels C_out", "R": "reduction C_in*prod(K)"},
                       "BLOCK_N x BLOCK_O output tile per position, BLOCK_R reduction step"),
    "local_conv_grad_weight": ({"N": "batch (the reduction)", "O": "output channels C_out",
                                "R": "weight columns C_in*prod(K)"},
                               "BLOCK_O x BLOCK_R dW tile per position, BLOCK_N reduction step"),
    "local_conv_grad_input": ({"C": "input channels C_in", "N": "batch", "O": "output channels C_out (the reduction)"},
                              "BLOCK_N x BLOCK_C dX tile per pixel, BLOCK_O reduction step"),
    "unfold_transpose": ({"L": "output positions of the transposed convolution = prod(out spatial size)",
                          "R": "rows of the [N*C*prod(K), L] column matrix = N*C*prod(K)"},
                         "BLOCK_R x BLOCK_L output tile (contiguous along L)"),
    "unfold_transpose_backward": ({"P": "input pixels = prod(input spatial size)", "R": "(n, c) rows = N*C"},
                                  "BLOCK_R x BLOCK_P dX tile (contiguous along P)"),
    "patch_covariance": ({"D": "factor side C/groups*prod(K) (+1 with bias)", "G": "channel groups (factor blocks)",
                          "M": "reduction N*L (samples x positions)", "C": "channels per group C/groups",
                          "K": "kernel taps prod(K)", "L": "positions per sample prod(out)"},
                         "BLOCK_D x BLOCK_D factor tile, BLOCK_M reduction step, SPLIT programs per tile"),
    "ekfac": ({"O": "output channels per group C_out/groups", "D": "A side C_in/groups*prod(K) (+1 with bias)",
               "L": "output positions prod(out)", "N": "batch (the reduction of the squares)",
               "G": "channel groups (blocks)"},
              "BLOCK_J x BLOCK_O statistic tile, BLOCK_L position step, BLOCK_K patch-projection step, SPLIT "
              "shares of the samples"),
    "extract_patches": ({"D": "entries per patch = C/groups*prod(K)",
                         "R": "rows of the [N*L, D] patch matrix = N*L (L output positions)"},
                        "BLOCK_R x BLOCK_D output tile (contiguous along D)"),
    "masked_conv_fwd": ({"M": "output positions N*L (samples x positions)", "O": "output channels C_out",
                         "K": "reduction per group C_in/groups*prod(K)", **_block_dims("reduction side")},
                        "BLOCK_M positions x the block's BO output channels per program, over the listed "
                        "BK-wide reduction tiles"),
    "masked_conv_grad_weight": ({"M": "reduction: output positions N*L (samples x positions)",
                                 "O": "output channels C_out", "K": "weight columns per group C_in/groups*prod(K)",
                                 **_block_dims("K side")},
                                "the block's BO x BK dW tile per program (listed tiles only), BLOCK_M reduction "
                                "step, SPLIT programs per tile"),
    "coactivation_correlation": ({"N": "batch (the correlations' reduction)", "L": "output positions prod(out)",
                                  "O": "output channels per group C_out/groups",
                                  "K": "weight columns per group C_in/groups*prod(K)"},
                                 "BLOCK_O x BLOCK_K score tile per program, BLOCK_N batch step, SPLIT shares of "
                                 "the positions"),
    "masked_conv_grad_input": ({"M": "input positions N*prod(input size) (samples x positions)",
                                "C": "input channels C_in", "K": "reduction per group C_out/groups*prod(K)",
                                **_block_dims("C_in side")},
                               "BLOCK_M positions x the block's BK input channels per program, over the listed "
                               "(tap, BO-wide output-channel tile) blocks"),
}


BENCH_GRIDS = ("bench-tiny", "bench-quick", "bench-full")  # the shapes a convzoo-bench size times


def grid_layers(name: str) -> list[Layer]:
    """The layers of ``--grid name``: a named grid of :data:`convzoo.autotune.grids.GRIDS`, or ``bench-<size>``,
    the shapes ``convzoo-bench --<size>`` times, each with the kernels its ops launch."""
    if name in BENCH_GRIDS:
        from convzoo.tools.bench import ops

        return ops.tune_layers(name.removeprefix("bench-"))
    return GRIDS[name]


def _import_kernels() -> None:
    from convzoo import kernels

    kernels.load_all()


def _epilog() -> str:
    lines = [
        "Table keys: 'dtype|DIM=bucket|...', the lookup dims in name order, each rounded up to a power of two",
        "(e.g. 'float16|L=1024|R=4096'); one entry per key holds the tiles, num_warps and num_stages.",
        "",
    ]
    for kernel, (dims, tiles) in KEY_LEGEND.items():
        lines.append(f"  {kernel}: " + "; ".join(f"{d} = {what}" for d, what in sorted(dims.items())))
        lines.append(f"  {' ' * len(kernel)}  tiles: {tiles}")
    lines += [
        "",
        "Forcing a config by hand (no table needed; checked against the kernel's config space, refused",
        "with an error if outside it): CONVZOO_CONFIG='unfold:BLOCK_R=8,BLOCK_L=128,num_warps=4;fold:...'",
        "or, in Python, `with convzoo.autotune.force_config(\"unfold\", BLOCK_R=8, BLOCK_L=128): ...`.",
        "",
        f"--dry-run's estimate per job: candidates x ({COMPILE_S:g} s compile guess + first pass "
        f"{sum(BENCH_MS['first'])} ms) + min(candidates, {FINALISTS + 1}) x final pass {sum(BENCH_MS['final'])} ms.",
    ]
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, validated before any work: unknown or empty lists, a bad ``--max-minutes``, a
    device that is not a CUDA GPU here, or a table folder that cannot be written (unless ``--dry-run``)
    exit 2 with a one-line message naming the argument."""
    _import_kernels()
    names = sorted(registered())
    ap = argparse.ArgumentParser(prog="convzoo-autotune", description=__doc__.split("\n\n")[0],
                                 epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=",".join(names), help=f"comma-separated subset of {','.join(names)}")
    ap.add_argument("--grid", default="all", choices=[*sorted(GRIDS), *BENCH_GRIDS],
                    help="named shape grid (default: all); bench-SIZE: the shapes convzoo-bench --SIZE times")
    ap.add_argument("--dtype", default="float16,bfloat16,float32",
                    help="comma-separated dtypes to tune (default: float16,bfloat16,float32)")
    ap.add_argument("--out", type=user_path, default=None, help="also write the tables to OUT/<gpu>/ (to ship them)")
    ap.add_argument("--force", action="store_true", help="re-tune keys the user cache already has")
    ap.add_argument("--max-minutes", type=float, default=None, help="start no new job after this many minutes")
    ap.add_argument("--dry-run", action="store_true", help="list what would be tuned; no GPU needed")
    ap.add_argument("--device", default="cuda", help="the CUDA device to tune on (default: cuda)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    args.kernels = check_names(ap, "--kernels", args.kernels, names, "kernel")
    args.dtypes = [DTYPES[d] for d in check_names(ap, "--dtype", args.dtype, list(DTYPES), "dtype")]
    check_minutes(ap, args.max_minutes)
    check_device(ap, args.device, ("cuda",), "tuning times the kernels on a CUDA GPU", require_cuda=False)
    if not args.dry_run:  # a dry run writes nothing
        for folder, what in [(args.out, "--out"), (user_cache_dir(), "the user cache (set CONVZOO_CACHE_DIR)")]:
            if folder is None:
                continue
            try:
                check_writable(folder)
            except (OSError, ValueError) as e:
                ap.error(f"{what}: cannot write tables to {folder} ({type(e).__name__}: {e})")
    return args


def main(argv=None, timer=None) -> int:
    """``timer`` replaces ``triton.testing.do_bench`` (tests: a fake timer under the interpreter)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(device)
        slug = device_slug(device_name)
    elif interpret_mode() and timer is not None:  # the tests' control-flow run
        device, device_name, slug = torch.device("cpu"), "Triton interpreter", "triton-interpreter"
    elif args.dry_run:
        device_name, slug = "(no GPU)", "<gpu>"
    else:
        print("convzoo-autotune: no CUDA GPU here, and tuning times kernels on one. Run it on the GPU whose "
              "tables you want, or pass --dry-run to list what would be tuned.", file=sys.stderr)
        return 1
    specs = [registered()[k] for k in args.kernels]
    layers = grid_layers(args.grid)
    jobs = plan(specs, layers, args.dtypes, device)
    tables = [user_cache_dir() / slug] + ([args.out / slug] if args.out else [])
    if args.dry_run:
        rows, total, todo = [], 0.0, 0
        for job in jobs:
            have = job.key in read_entries(tables[0] / f"{job.spec.name}.json", job.spec)
            if have and not args.force:
                state = "tuned already (--force re-tunes)"
            else:
                n = len(candidates(job))
                est = estimate_seconds(n)
                total, todo = total + est, todo + 1
                state = f"{n} configs, ~{_minutes(est)}"
            rows.append(f"{job.spec.name:<24} {job.layer.name:<14} {job.key:<40} {state}")
        print(f"# device: {device_name}\n# grid: {args.grid} ({len(layers)} layers)\n"
              f"# dtypes: {','.join(str(d).removeprefix('torch.') for d in args.dtypes)}\n"
              f"# kernels: {','.join(args.kernels)}\n# tables: " + ", ".join(map(str, tables)))
        budget = f"; --max-minutes {args.max_minutes:g} stops starting jobs after that" if args.max_minutes else ""
        print(f"# would tune {len(jobs)} (kernel, dtype, shape bucket) jobs, {todo} to time "
              f"({len(jobs) - todo} in the table), estimated {_minutes(total)}{budget}")
        print(f"# estimate per job: configs x ({COMPILE_S:g} s compile guess + {sum(BENCH_MS['first'])} ms first pass)"
              f" + min(configs, {FINALISTS + 1}) x {sum(BENCH_MS['final'])} ms final pass; see --help")
        print("\n".join(rows))
        return 0
    print(f"# tuning {len(jobs)} jobs on {device_name}; tables: " + ", ".join(map(str, tables)))
    results = tune(jobs, device, tables, device_name, timer=timer or do_bench_timer, force=args.force,
                   max_minutes=args.max_minutes, progress=not args.quiet)
    left = [j for j in jobs if j.key not in read_entries(tables[0] / f"{j.spec.name}.json", j.spec)]
    if results:
        print(summary(results))
    elif not left:
        print("# nothing to tune (every key is in the table; --force re-tunes)")
    if left:
        print(f"# {len(left)} of {len(jobs)} jobs not tuned yet (--max-minutes {args.max_minutes:g} reached): run "
              "again to go on; tuned keys are skipped")
    bad = [r for r in results if not r.checked]
    if bad:
        print(f"# {len(bad)} entries failed the correctness check even with the default config", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
