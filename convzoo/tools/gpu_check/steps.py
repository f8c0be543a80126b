"""convzoo-gpu-check's steps: the environment a run records, each step's subprocess under its timeout
(interrupted, then ended, with its whole process group) and its status."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import convzoo
from convzoo.autotune.lookup import triton_version
from convzoo.tools._cli import git_sha
from convzoo.tools.gpu_check.plan import PEERS, STEPS_FILE, Step
from convzoo.tools.gpu_check.results import _write_atomic
from convzoo.tools.gpu_check.summary import test_counts


def _capture(command: list[str], cwd: Path | None = None) -> str:
    """A helper command's first output line, '' if it is absent or fails (nvidia-smi, git)."""
    if shutil.which(command[0]) is None:
        return ""
    try:
        out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.strip().splitlines()[0].strip() if out.strip() else ""


def _versions(names: Sequence[str]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def collect_env(cuda: bool = True) -> dict:
    """The machine and software a run is on, for ``run.json``; CUDA questions only when CUDA is there."""
    env = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
           "torch": torch.__version__, "cuda_runtime": torch.version.cuda or "", "triton": triton_version(),
           "python": platform.python_version(), "platform": platform.platform(),
           "convzoo": str(Path(convzoo.__file__).resolve().parent),
           "gpu": "", "capability": "", "memory_gib": "", "driver": "", "git_sha": "", "peers": _versions(PEERS)}
    if cuda and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=f"{props.total_memory / 2**30:.1f}")
        # torch does not report the driver; nvidia-smi does where it is installed
        env["driver"] = _capture(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"])
    env["git_sha"] = git_sha()
    return env


def rehearsal_timer(fn, config, stage) -> float:
    """The rehearsal's tuning timer: one launch under the interpreter, in ms (control flow, not a measurement)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


# ---------------------------------------------------------------------------------------------- running
def _signal_group(proc: subprocess.Popen, sig: int, wait_s: float) -> bool:
    """Send ``sig`` to the step's process group; True once the step has ended (within ``wait_s``)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=max(wait_s, 0.01))
        return True
    except subprocess.TimeoutExpired:
        return False


def _stop_group(proc: subprocess.Popen, stop_s: float) -> None:
    """End the step's whole process group (pytest workers, compile subprocesses) within ``stop_s``: an
    interrupt first (pytest then writes its junit report, the bench and the tuner keep what they wrote), a
    TERM a third of the way before the end, a KILL at it."""
    if not _signal_group(proc, signal.SIGINT, stop_s * 2 / 3) and not _signal_group(proc, signal.SIGTERM, stop_s / 3):
        _signal_group(proc, signal.SIGKILL, 10)


def _default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_command(command: list[str], log_path: Path, cwd: Path | None, timeout_s: float, env: dict,
                stop_s: float | None = None) -> tuple[int | None, bool]:
    """Run ``command`` with stdout and stderr into ``log_path``; ``(exit code, stopped)``. ``stop_s`` before
    ``timeout_s`` (default: a quarter of it, at most 15 s) its process group is interrupted, then ended, so
    nothing of it runs past ``timeout_s`` (the exit code then is the signal's, negative, or pytest's).

    Raises:
        OSError: it cannot be started (the message is also in the log).
    """
    stop_s = min(15.0, timeout_s / 4) if stop_s is None else min(stop_s, timeout_s)
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        try:
            # the child's SIGINT at its default, whatever this process's (an ignored SIGINT is inherited, and a
            # step interrupted at its deadline would then never write its results: seen under pytest-xdist)
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=cwd, env=env, start_new_session=True, preexec_fn=_default_sigint)
        except OSError as e:
            log.write(f"could not start: {e}\n")
            raise
        try:
            return proc.wait(timeout=timeout_s - stop_s), False
        except subprocess.TimeoutExpired:
            _stop_group(proc, stop_s)
            log.write(f"\n[convzoo-gpu-check: stopped at its {timeout_s:.1f} s timeout]\n")
            return proc.returncode, True
        except BaseException:  # Ctrl-C: leave nothing running
            _stop_group(proc, min(stop_s, 5.0))
            raise


def write_steps(work: Path, records: list[dict]) -> None:
    _write_atomic(work / STEPS_FILE, json.dumps(records, indent=1) + "\n")


def child_env(step: Step) -> dict:
    env = dict(os.environ)
    for k, v in step.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def step_status(step: Step, work: Path, rc: int | None, stopped: bool, timeout_s: float) -> str:
    """``ok``, ``ok, cut at its deadline`` (it stopped itself there: tests left not run, tuning or bench rows
    left), ``stopped at its timeout (N s)`` (``timeout_s``: the time it was given) or ``failed (exit N)``."""
    if stopped:
        return f"stopped at its timeout ({timeout_s:.0f} s)"
    if rc != 0:
        return f"failed (exit {rc})"
    try:
        log = (work / step.log).read_text(errors="replace")
    except OSError:
        log = ""
    if step.name == "tests":
        counts = test_counts(work)
        cut = counts is not None and counts["not_run"] > 0
    else:
        cut = "--max-minutes" in log and "reached" in log
    return "ok, cut at its deadline" if cut else "ok"


