"""What the command-line tools (``convzoo-autotune``, ``convzoo-bench``, ``convzoo-gpu-check``) share: argument
checks, each refusing a bad argument with a one-line ``argparse`` error (exit 2) before any work, and where
this convzoo comes from (a checkout, its git sha)."""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and a file in it, so a run cannot fail at its first write, after minutes.

    Raises:
        OSError, ValueError: it cannot be created or written (a file on the way, no permission, a NUL).
    """
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".convzoo-write-probe-"):
        pass


def check_device(ap: argparse.ArgumentParser, text: str, types: tuple[str, ...], purpose: str,
                 require_cuda: bool) -> None:
    """``--device text`` must name a device of one of ``types`` (``purpose`` says why, in the error);
    a CUDA index must exist, and with ``require_cuda`` CUDA must be there at all."""
    hint = ", ".join(types) + " or cuda:N" if "cpu" in types else "cuda or cuda:N"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        ap.error(f"--device: {text!r} is not a device (try {hint})")
    if device.type not in types:
        ap.error(f"--device: {purpose}, not on {text!r} (try {hint})")
    if device.type == "cuda" and require_cuda and not torch.cuda.is_available():
        ap.error(f"--device: {text!r}, but there is no CUDA device here")
    if device.type == "cuda" and device.index is not None and torch.cuda.is_available() \
            and device.index >= torch.cuda.device_count():
        ap.error(f"--device: no CUDA device {device.index}; this machine has {torch.cuda.device_count()}")


def check_names(ap: argparse.ArgumentParser, flag: str, text: str, known, what: str) -> list[str]:
    """``flag text``: a comma-separated list of ``known`` names, each once (spaces around them ignored)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        ap.error(f"{flag}: no {what} named in {text!r}; choose from {','.join(known)}")
    for n in names:
        if n not in known:
            ap.error(f"{flag}: unknown {what} {n!r}; choose from {','.join(known)}")
        if names.count(n) > 1:
            ap.error(f"{flag}: {n!r} is named twice")
    return names


def user_path(text: str) -> Path:
    """A folder argument as the user meant it: ``~`` is the home folder even where no shell expanded it
    (``--out=~/x``)."""
    return Path(text).expanduser()


def check_minutes(ap: argparse.ArgumentParser, minutes: float | None, flag: str = "--max-minutes") -> None:
    """``flag`` (``--max-minutes``): None (no budget) or positive and finite."""
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        ap.error(f"{flag} must be positive and finite, got {minutes}")


def checkout_root() -> Path | None:
    """The checkout this convzoo is imported from (the folder with its ``pyproject.toml``), None for an
    installed package."""
    import convzoo

    root = Path(convzoo.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "convzoo" / "tools").is_dir() else None


def git_sha() -> str:
    """The short sha of the checkout convzoo runs from (``+dirty`` with uncommitted changes to tracked files);
    '' for an installed package or without git. Never the sha of a project that merely holds the install."""
    root = checkout_root()
    if root is None or shutil.which("git") is None:
        return ""

    def git(*args) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    if Path(git("rev-parse", "--show-toplevel") or "/nonexistent").resolve() != root:
        return ""  # a copy of the sources inside somebody else's repository
    sha = git("rev-parse", "--short", "HEAD")
    return sha + "+dirty" if sha and git("status", "--porcelain", "--untracked-files=no") else sha
