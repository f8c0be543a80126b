"""convzoo-gpu-check's command line: the arguments, then the plan run step by step into the results folder
(the command is documented in :mod:`convzoo.tools.gpu_check`)."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from convzoo.autotune.lookup import device_slug
from convzoo.tools._cli import check_minutes, check_names, check_writable
from convzoo.tools.gpu_check.plan import (
    DEFAULT_MINUTES,
    ENV_FILE,
    MIN_MINUTES,
    OUTPUTS,
    STEPS,
    SUMMARY,
    build_plan,
    default_folder,
    default_tests,
    describe_plan,
)
from convzoo.tools.gpu_check.results import _write_atomic, check_out_folder, publish, seed_tables
from convzoo.tools.gpu_check.steps import child_env, collect_env, run_command, step_status, write_steps
from convzoo.tools.gpu_check.summary import _succeeded


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, validated before any work: unknown or empty ``--steps``, a bad ``--minutes``, a
    ``--tests`` that is not a folder or a ``--grid`` not known to the tuner exit 2 with a one-line message."""
    from convzoo.tools import gpu_check
    from convzoo.tools.autotune import BENCH_GRIDS, GRIDS

    doc = gpu_check.__doc__  # the command's documentation is its package's
    ap = argparse.ArgumentParser(prog="convzoo-gpu-check", description=doc.split("\n\n")[0],
                                 epilog="\n\n".join(doc.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder, empty or an earlier run's (default: a new one under "
                         "~/.cache/convzoo/gpu-check/, printed)")
    ap.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                    help=f"the whole run's budget in minutes (default {DEFAULT_MINUTES:g}, at least {MIN_MINUTES:g}); "
                         "the steps' hard timeouts add up to it, less a few seconds for the summary")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}; "
                    "they run in that order and share the budget")
    ap.add_argument("--grid", default=None, choices=[*sorted(GRIDS), *BENCH_GRIDS],
                    help="the tuning grid (default: bench-quick, the shapes the bench times; rehearsal: bench-tiny)")
    ap.add_argument("--tests", type=Path, default=None,
                    help="the tests folder (default: the checkout's tests/, beside the convzoo package)")
    ap.add_argument("--rehearse", action="store_true",
                    help="the same plan on this machine's CPU: kernels under Triton's interpreter, the bench's tiny "
                         "shapes on the CPU paths, the same deadlines and files (no GPU needed)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan: steps, timeouts, commands; run nothing")
    ap.add_argument("--static", action="store_true",
                    help="instead of the run: the static sm_90 report of every kernel (static.csv, static.md in "
                         "--out), compiled and read on this machine, no GPU needed (convzoo.tools.static_report)")
    ap.add_argument("--quick", action="store_true", help="with --static: fp16 and fp32 on one problem per kernel")
    args = ap.parse_args(argv)
    if args.quick and not args.static:
        ap.error("--quick goes with --static")
    args.steps = check_names(ap, "--steps", args.steps, STEPS, "step")
    check_minutes(ap, args.minutes, "--minutes")
    if args.minutes < MIN_MINUTES:
        ap.error(f"--minutes must be at least {MIN_MINUTES:g} (the steps' shares would be shorter than their "
                 f"graces), got {args.minutes:g}")
    if args.tests is not None and not args.tests.is_dir():
        ap.error(f"--tests: {args.tests} is not a folder")
    return ap, args


def main(argv=None) -> int:
    t0, t0_epoch = time.monotonic(), time.time()
    ap, args = parse_args(argv)
    if args.static:
        from convzoo.tools import static_report

        folder = (args.out or default_folder("static-sm90", datetime.datetime.now(datetime.UTC))).expanduser()
        print(f"# static report -> {folder}")
        return static_report.main(["--out", str(folder), *(["--quick"] if args.quick else [])])
    cuda = torch.cuda.is_available() and not args.rehearse
    if not cuda and not (args.dry_run or args.rehearse):
        print("convzoo-gpu-check: no CUDA GPU here, and it checks one. Run it on the GPU machine, pass --rehearse "
              "to rehearse the plan on this CPU, or --dry-run to see what it would run.", file=sys.stderr)
        return 1
    env = collect_env(cuda)
    env.update(command=shlex.join(["convzoo-gpu-check", *(sys.argv[1:] if argv is None else argv)]),
               rehearse=args.rehearse, budget=f"{args.minutes:g} min")
    now = datetime.datetime.now(datetime.UTC)
    slug = device_slug(env["gpu"]) if env["gpu"] else ("cpu-rehearsal" if args.rehearse else "no-gpu")
    folder = (args.out or default_folder(slug, now)).expanduser().resolve()
    tests = args.tests or default_tests()
    tests = tests.expanduser().resolve() if tests is not None else None
    if args.dry_run:
        plan = build_plan(args.steps, Path(tempfile.gettempdir()) / "convzoo-gpu-check-XXXX", args.minutes, tests,
                          args.rehearse, args.grid)
        print("# convzoo-gpu-check --dry-run: nothing is run or written")
        print(describe_plan(plan, folder, env, args.minutes, args.rehearse, t0_epoch))
        return 0
    try:
        check_out_folder(folder)
        check_writable(folder)
    except (OSError, ValueError) as e:
        ap.error(f"--out: cannot write results to {folder} ({type(e).__name__}: {e})")
    work = Path(tempfile.mkdtemp(prefix="convzoo-gpu-check-"))
    try:
        return _run(args, env, folder, work, tests, t0, t0_epoch)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, env: dict, folder: Path, work: Path, tests: Path | None, t0: float, t0_epoch: float) -> int:
    plan = build_plan(args.steps, work, args.minutes, tests, args.rehearse, args.grid)
    print(f"convzoo-gpu-check: results in {folder}" + (" (rehearsal on the CPU)" if args.rehearse else ""),
          flush=True)
    seeded = seed_tables(folder, work)
    for name in OUTPUTS:  # an earlier run's results must not stand for this one's
        (folder / name).unlink(missing_ok=True)
        (folder / f".{name}.tmp").unlink(missing_ok=True)
    _write_atomic(work / ENV_FILE, json.dumps(env, indent=1) + "\n")
    # timeout_s: the planned one until the step starts, then the time it is given (more when the steps before
    # it ended early)
    records = [{"name": s.name, "status": "pending", "log": s.log, "timeout_s": round(s.timeout_s)} for s in plan]
    if seeded:
        records[0]["note"] = f"{seeded} tables of the earlier run in this folder seeded the tuning."
    write_steps(work, records)
    publish(work, folder)
    for i, (step, rec) in enumerate(zip(plan, records), 1):
        start = time.monotonic() - t0
        left = step.end_s - start
        if step.skip or left < 2:
            rec.update(status="skipped", note=f"Skipped: {step.skip or 'no time left in the budget'}.")
        else:
            command = step.command(start, t0_epoch)
            rec.update(status="running", command=command, timeout_s=round(left))
            print(f"[{i}/{len(plan)}] {step.name} ({left:.0f} s at most): {shlex.join(command)}", flush=True)
            write_steps(work, records)
            publish(work, folder)
            try:
                rc, stopped = run_command(command, work / step.log, step.cwd, left, child_env(step),
                                          stop_s=step.grace_s / 2)
            except OSError as e:
                rec.update(status="failed (could not start)", note=f"Could not start: {e}.")
            except KeyboardInterrupt:
                rec.update(status="interrupted", seconds=time.monotonic() - t0 - start)
                write_steps(work, records)
                publish(work, folder)
                print(f"interrupted; summary: {folder / SUMMARY}", file=sys.stderr)
                return 130
            else:
                rec.update(exit_code=rc, status=step_status(step, work, rc, stopped, left))
            rec["seconds"] = time.monotonic() - t0 - start
        print(f"[{i}/{len(plan)}] {step.name}: {rec['status']}", flush=True)
        write_steps(work, records)
        publish(work, folder)
    print(f"convzoo-gpu-check: summary in {folder / SUMMARY} ({time.monotonic() - t0:.0f} s)")
    return 0 if all(_succeeded(r["status"]) for r in records) else 1
