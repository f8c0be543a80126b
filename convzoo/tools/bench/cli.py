"""``convzoo-bench``: convzoo against its peers on the best available device, as tables, CSV rows, markdown and plots.

GPU: ``triton.testing.do_bench`` samples; CPU: ``torch.utils.benchmark`` (the plain-torch paths,
labelled CPU). The providers of a row are timed in interleaved rounds, so their speedups come from the
same pass; noisy rows are marked. Results go to an untracked folder: the user cache
(``$CONVZOO_CACHE_DIR`` or ``~/.cache/convzoo``)``/bench`` or ``--out DIR``; rows are appended to
``<device>.csv``, ``<device>.md`` and ``<device>/<op>.png`` show the latest run. The reference results a
checkout's README cites (``bench/reference/``) change only with ``--update-reference``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from convzoo.autotune import interpret_mode, user_cache_dir
from convzoo.tools._cli import check_device, check_minutes, check_names, check_writable, checkout_root, user_path
from convzoo.tools.bench import harness, ops, timing

EPILOG = f"""\
sizes: --tiny (smoke test), --quick (a few layer shapes, fwd and fwd+bwd, plus the host-overhead rows; the
default), --full (real layer shapes, every mode, torch.compile peers, overhead rows), --overhead (only the
host-overhead rows: µs per eager call on tiny shapes, against F.unfold / F.fold / unfold+einsum /
unfold+matmul / F.conv2d(x, w*mask) / conv_weight(x>0, y>0)).

columns: p20/p50/p80 of the timer's samples; GB/s and % of the measured copy bandwidth for every op;
TFLOP/s and % of the measured matmul peak where the op does FLOPs (local_conv, patch_covariance, masked_conv,
coactivation; patch_covariance and coactivation timed in fwd only: statistics, not differentiable; masked_conv's
FLOPs are the dense convolution's at every mask density; on a CPU the convzoo rows of masked_conv and
coactivation are labelled "convzoo (CPU path)"; coactivation's seed peer is not run where it would hold over
2 GiB, and the run says so);
speedup = peer time / convzoo time, from the same interleaved pass (> 1: convzoo is faster).
A row is noisy when p80/p20 > {timing.SPREAD_BOUND} or other processes kept more than max(0.5, cores/10) CPUs
busy while it was timed.
"""


def reference_dir() -> Path | None:
    """``bench/reference`` of the checkout this package runs from, or None for an installed package."""
    root = checkout_root()
    folder = root / "bench" / "reference" if root is not None else None
    return folder if folder is not None and folder.is_dir() else None


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, validated before any timing: unknown or empty lists, a device that is not
    cpu or a CUDA GPU here, or an output folder that cannot be written (unless ``--no-save``) exit 2
    with a one-line message naming the argument."""
    ap = argparse.ArgumentParser(prog="convzoo-bench", description=__doc__.splitlines()[0], epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="size", const="quick",
                      help="a few layer shapes, fwd and fwd+bwd, and the overhead rows (the default)")
    size.add_argument("--full", action="store_const", dest="size", const="full",
                      help="real layer shapes, every mode, torch.compile peers too: minutes on a GPU")
    size.add_argument("--tiny", action="store_const", dest="size", const="tiny", help="tiny shapes (smoke test)")
    size.add_argument("--overhead", action="store_const", dest="size", const="overhead",
                      help="only the host overhead: µs per eager call on tiny shapes")
    ap.set_defaults(size="quick")
    ap.add_argument("--ops", default=",".join(ops.OPS), help=f"comma-separated subset of {','.join(ops.OPS)}")
    ap.add_argument("--modes", default=None, help="comma-separated subset of fwd,bwd,fwd+bwd "
                                                  "(default: fwd,fwd+bwd; --full: all three)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu (the plain-torch paths) or cuda / cuda:N (default: cuda when present)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--reps", type=int, default=3,
                    help="interleaved timing rounds per row; each round is one timer call per provider (default 3)")
    ap.add_argument("--min-time", type=float, default=0.2,
                    help="CPU: seconds each round times one provider for (default 0.2)")
    ap.add_argument("--threads", type=int, default=None,
                    help=f"CPU: torch threads while timing (default: torch's, {torch.get_num_threads()} here)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no new (shape, mode) after this many minutes")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--out", type=user_path, default=None,
                       help="results folder (default: the user cache, $CONVZOO_CACHE_DIR, else $XDG_CACHE_HOME/convzoo "
                            "or ~/.cache/convzoo, then /bench)")
    where.add_argument("--update-reference", action="store_true",
                       help="write to the checkout's bench/reference/ (the results the README cites); a whole "
                            "--quick or --full run only")
    ap.add_argument("--no-save", action="store_true", help="print only: no CSV, markdown or plots")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    args = ap.parse_args(argv)
    if args.reps < 2:
        ap.error("--reps must be at least 2 (interleaved rounds)")
    if not (args.min_time > 0 and args.min_time < 60):
        ap.error(f"--min-time must be in (0, 60) seconds, got {args.min_time}")
    cpus = os.cpu_count() or 1
    if args.threads is not None and not 1 <= args.threads <= cpus:
        ap.error(f"--threads must be between 1 and this machine's {cpus} CPUs, got {args.threads}")
    check_minutes(ap, args.max_minutes)
    args.ops = check_names(ap, "--ops", args.ops, ops.OPS, "op")
    if args.modes is not None and args.size == "overhead":
        ap.error("--modes: the --overhead rows have their own modes (call, call+grad)")
    args.modes = check_names(ap, "--modes", args.modes or ",".join(ops.default_modes(args.size)), harness.MODES, "mode")
    check_device(ap, args.device, ("cpu", "cuda"), "bench runs on cpu or cuda", require_cuda=True)
    if args.update_reference:
        partial = [flag for flag, given in (("--ops", args.ops != list(ops.OPS)), ("--max-minutes", args.max_minutes),
                                            ("--modes", args.modes != list(ops.default_modes(args.size))),
                                            ("--no-save", args.no_save)) if given]
        if args.size not in ("quick", "full") or partial:
            ap.error("--update-reference: the reference results are whole --quick or --full runs, not "
                     + (", ".join(partial) if partial else f"--{args.size}"))
        args.out = reference_dir()
        if args.out is None:
            ap.error("--update-reference: this convzoo is not a checkout (no bench/reference/ beside the package); "
                     "use --out DIR")
    args.out_is_default = args.out is None
    if args.out is None:
        args.out = user_cache_dir().parent / "bench"  # beside the tuned tables, under the convzoo cache
    if not args.no_save:
        try:
            check_writable(args.out)
        except (OSError, ValueError) as e:
            ap.error(f"--out: cannot write results to {args.out} ({type(e).__name__}: {e})")
    return args


def _progress():
    """One line per row on stdout; a tqdm bar on a terminal (tqdm installed) instead."""
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            return print, None
        bar = tqdm(unit="row", file=sys.stderr, dynamic_ncols=True)

        def step(line: str) -> None:
            if line.startswith("["):
                bar.update(1)
                bar.set_description(line.split("]", 1)[1].strip()[:60])
            else:
                bar.write(line)
        return step, bar
    return (lambda line: print(line, flush=True)), None


def main(argv=None, timer=None, load=None) -> int:
    """``timer`` / ``load`` replace the device's timer and the foreign-load meter (tests)."""
    args = parse_args(argv)
    if interpret_mode():
        print("TRITON_INTERPRET is set: timings would measure the interpreter; unset it.", file=sys.stderr)
        return 2
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env = harness.environment(device)
    slug = harness.device_slug(env["device"])
    if not args.no_save:
        try:
            harness.check_outputs(args.out, slug)
        except ValueError as e:
            print(f"convzoo-bench: error: --out: {e}", file=sys.stderr)
            return 2
    custom = timer is not None
    timer = timer or harness.default_timer(device, args.threads, args.min_time)
    # one thread: the host's cost of a call is single-threaded Python, and on a busy machine an OpenMP
    # team waiting for a descheduled thread turns a 10 µs call into a scheduler tick
    overhead_timer = timer if custom else timing.CpuTimer(1, args.min_time)
    print(f"# {env['device']}, {args.dtype}, torch {env['torch']}, triton {env['triton'] or '-'}, {args.size} run; "
          f"timer: {getattr(timer, 'name', 'custom')}")
    if args.no_save:
        print("# results: not saved (--no-save)")
    else:
        why = "the user cache; --out DIR to choose" if args.out_is_default else (
            "the checkout's reference results, --update-reference" if args.update_reference else "--out")
        print(f"# results: {args.out} ({why})")
    for line in ops.missing_peers():
        print(f"# {line}")
    problems = ops.for_size(args.size, args.ops)
    print("# measuring this device's copy bandwidth and matmul peak ...", flush=True)
    limits = harness.measure_limits(device, dtype, timer)
    print(f"# measured: copy {limits.copy_bytes_per_s / 1e9:.1f} GB/s, matmul "
          f"{limits.matmul_flops_per_s / 1e12:.2f} TFLOP/s ({limits.dtype})")
    step, bar = _progress()
    t0 = time.perf_counter()
    csv_path = args.out / f"{slug}.csv"
    moved = []

    def save(group):  # each (shape, mode) as soon as it is timed: a stopped run keeps what it timed
        if not args.no_save:
            moved.append(harness.append_csv(csv_path, group))
            if moved[-1]:
                step(f"# {csv_path} had other columns (an older convzoo, or not our CSV): moved to {moved[-1]}")

    try:
        rows = harness.run(problems, ops.providers(), args.modes, device, dtype, limits, full=args.size == "full",
                           rounds=args.reps, timer=timer, overhead_timer=overhead_timer, load=load,
                           memory=not args.no_memory, progress=step, env=env, max_minutes=args.max_minutes,
                           on_rows=save)
    finally:
        if bar is not None:
            bar.close()
    print()
    print(harness.format_table(rows, notes=ops.NOTES))
    noisy = sum(bool(r.noisy) for r in rows)
    print(f"\n# {len(rows)} rows in {time.perf_counter() - t0:.0f} s" + (f", {noisy} noisy" if noisy else ""))
    if not args.no_save and rows:
        harness.write_markdown(args.out / f"{slug}.md", rows, limits, args.size, notes=ops.NOTES)
        plots = harness.write_plots(args.out / slug, rows)
        print(f"# wrote {csv_path} (appended), {args.out / f'{slug}.md'}" +
              (f" and {len(plots)} plots in {args.out / slug}" if plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
