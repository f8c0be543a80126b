"""Argument checks shared by the command-line tools (``convzoo-autotune``, ``convzoo-bench``, ``convzoo-gpu-check``):
each refuses a bad argument with a one-line ``argparse`` error (exit 2) before any work."""

from __future__ import annotations

import argparse
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
