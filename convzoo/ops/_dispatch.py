"""Which implementation an op call runs."""

from __future__ import annotations

import sys

import torch

from convzoo.autotune import interpret_mode


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1``, go to the Triton launchers.

    Raises:
        RuntimeError: ``TRITON_INTERPRET`` changed after the kernels were decorated (Triton reads it
            once, when ``@triton.jit`` runs): such a call could only fail inside Triton, obscurely.
    """
    interpret = interpret_mode()
    if not (t.is_cuda or (interpret and t.device.type == "cpu")):
        return False
    kernels = sys.modules.get("convzoo.kernels")
    if kernels is not None and interpret != kernels.INTERPRETED:
        raise RuntimeError(
            f"TRITON_INTERPRET is {'set' if interpret else 'unset'} now but was "
            f"{'set' if kernels.INTERPRETED else 'unset'} when convzoo's Triton kernels were imported; Triton "
            f"reads it once, when the kernels are decorated. Set (or unset) TRITON_INTERPRET before the first "
            f"convzoo kernel call (or before importing convzoo.kernels), and leave it so.")
    return True
