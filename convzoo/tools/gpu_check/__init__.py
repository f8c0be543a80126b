"""``convzoo-gpu-check`` (or ``python -m convzoo.tools.gpu_check``): one command for a new GPU, in one time budget.

``--minutes M`` (default 8) is the whole run. Its steps share it, in this order, each a subprocess with its own
deadline (where it stops starting work) and a hard timeout a little later (where it is interrupted, then ended):

  tests  pytest on CUDA (-n auto), the gpu-marked and kernel-vs-reference tests first, then the rest while time
         remains; the tests left at its deadline are reported as not run
  tune   convzoo-autotune --grid bench-quick --dtype float32: the shapes the bench times (stops mid-job at its budget)
  bench  convzoo-bench --quick, with the tables just tuned

The timeouts add up to M minutes less a few seconds kept for the summary; a step that ends early passes its time
on to the next. Everything comes back in one folder of at most 8 files (--out; no subfolders): summary.md,
run.json, tests-junit.xml, tables.json, bench.csv, bench.md, logs.tar.gz (the logs, the test progress, the bench
plots), and static.csv (kept for a static-analysis step). They are rewritten after each step, so a run that is
stopped still returns what it measured. ``--rehearse`` runs the same plan on a CPU (kernels under Triton's
interpreter, the bench's tiny shapes on the CPU paths), to the same deadlines and into the same files.
"""

# The command in five modules, each importing only those before it: plan (the steps, their budget and commands),
# summary (counts, the bench headline, summary.md), results (the results folder), steps (the environment, each
# step's subprocess, its status), cli (the arguments and the run). Every name the one-module gpu_check.py had is
# importable from here still; to patch one, patch it in the module that looks it up (``gpu_check.cli.run_command``).
from __future__ import annotations

from convzoo.autotune.lookup import device_slug
from convzoo.tools.gpu_check.cli import (  # noqa: F401
    _run,
    main,
    parse_args,
)
from convzoo.tools.gpu_check.plan import (
    BENCH_CSV,
    BENCH_MD,
    DEFAULT_MINUTES,
    ENV_FILE,
    GRACE,
    GUARD,
    JUNIT,
    LOGS,
    MAX_FILES,
    MIN_MINUTES,
    NAME_RE,
    OUTPUTS,
    PEERS,
    PROGRESS,
    REHEARSAL_TUNE,
    RESERVE_S,
    RUN_JSON,
    SHARES,
    STATIC_CSV,
    STEPS,
    STEPS_FILE,
    SUMMARY,
    TABLES_JSON,
    Step,
    bench_kernels,
    build_plan,
    default_folder,
    default_tests,
    describe_plan,
    grace_s,
    startup_s,
)
from convzoo.tools.gpu_check.results import (  # noqa: F401
    _logs_archive,
    _tables,
    _write_atomic,
    check_out_folder,
    publish,
    seed_tables,
)
from convzoo.tools.gpu_check.steps import (  # noqa: F401
    _capture,
    _signal_group,
    _stop_group,
    _versions,
    child_env,
    collect_env,
    rehearsal_timer,
    run_command,
    step_status,
    write_steps,
)
from convzoo.tools.gpu_check.summary import (  # noqa: F401
    _bench_file,
    _counts,
    _details,
    _duration,
    _float,
    _is_noisy,
    _log_tail,
    _read_json,
    _read_rows,
    _step_details,
    _succeeded,
    _test_file,
    _tests_details,
    bench_headline,
    build_summary,
    junit_counts,
    progress_counts,
    table_keys,
    test_counts,
)

__all__ = ["BENCH_CSV", "BENCH_MD", "DEFAULT_MINUTES", "ENV_FILE", "GRACE", "GUARD", "JUNIT", "LOGS", "MAX_FILES",
           "MIN_MINUTES", "NAME_RE", "OUTPUTS", "PEERS", "PROGRESS", "REHEARSAL_TUNE", "RESERVE_S", "RUN_JSON",
           "SHARES", "STATIC_CSV", "STEPS", "STEPS_FILE", "SUMMARY", "TABLES_JSON", "Step", "bench_headline",
           "bench_kernels", "build_plan", "build_summary", "check_out_folder", "child_env", "collect_env",
           "default_folder", "default_tests", "describe_plan", "device_slug", "grace_s", "junit_counts", "main",
           "parse_args", "progress_counts", "publish", "rehearsal_timer", "run_command", "seed_tables", "startup_s",
           "step_status", "table_keys", "test_counts", "write_steps"]
