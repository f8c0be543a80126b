"""Which implementation an op call runs."""

from __future__ import annotations

import torch

from convzoo.autotune import interpret_mode


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1``, go to the Triton launchers."""
    return t.is_cuda or (t.device.type == "cpu" and interpret_mode())
