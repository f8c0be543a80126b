"""Which implementation an op call runs."""

from __future__ import annotations

import importlib
import sys

import torch

from convzoo import _compat, reference
from convzoo.autotune import interpret_mode
from convzoo.ops import _native


def own(t: torch.Tensor) -> torch.Tensor:
    """``t``, or when it is a view of a temporary (a ``.view``/``.permute`` at the end of a path), the same
    memory as a tensor of its own. Autograd refuses in-place changes to a view that an ``autograd.Function``
    returns (``nn.ReLU(inplace=True)`` after a layer, ``y += x``), so an op's output must not be one, on any
    path: no copy, only the view relation is dropped."""
    if t._base is None:
        return t
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def run(on: torch.Tensor, kernels: str, name: str, args: tuple, native: bool = False):
    """An op's implementation, where it is one of the same-named functions of the three places: the Triton launcher
    ``convzoo.kernels.<kernels>.<name>(*args)`` where :func:`use_triton` holds for ``on`` (the tensor whose device
    decides), else :mod:`convzoo.ops._native`'s (with ``native``: torch's own CPU im2col/col2im, where it applies),
    else :mod:`convzoo.reference`'s. The result (each one, for a tuple) is a tensor of its own (:func:`own`)."""
    if use_triton(on):
        out = getattr(importlib.import_module(f"convzoo.kernels.{kernels}"), name)(*args)
    else:
        out = getattr(_native, name)(*args) if native else None
        if out is None:
            out = getattr(reference, name)(*args)
    return tuple(own(o) for o in out) if isinstance(out, tuple) else own(out)


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1``, go to the Triton launchers.

    Raises:
        RuntimeError: ``TRITON_INTERPRET`` changed after the kernels were decorated (Triton reads it
            once, when ``@triton.jit`` runs): such a call could only fail inside Triton, obscurely.
    """
    interpret = interpret_mode()
    if not (t.is_cuda or (interpret and t.device.type == "cpu")):
        return False
    for module, kernel in _KERNEL_MARKERS:  # the kernel modules imported so far: how were they decorated?
        loaded = sys.modules.get(module)
        if loaded is not None and _compat.interpreted(getattr(loaded, kernel)) != interpret:
            raise RuntimeError(
                f"TRITON_INTERPRET is {'set' if interpret else 'unset'} now but was "
                f"{'unset' if interpret else 'set'} when convzoo's Triton kernels were imported; Triton reads it "
                f"once, when the kernels are decorated. Set (or unset) TRITON_INTERPRET before the first convzoo "
                f"kernel call (or before importing convzoo.kernels), and leave it so.")
    return True


# one kernel of each kernel module, decorated as all of that module's kernels are
_KERNEL_MARKERS = (("convzoo.kernels.unfold", "unfold_kernel"), ("convzoo.kernels.local_conv", "local_conv_fwd_kernel"),
                   ("convzoo.kernels.unfold_transpose", "unfold_transpose_backward_kernel"),
                   ("convzoo.kernels.patch_covariance", "patch_covariance_kernel"),
                   ("convzoo.kernels.patches", "extract_patches_kernel"),
                   ("convzoo.kernels.masked_conv", "masked_conv_fwd_kernel"),
                   ("convzoo.kernels.coactivation", "coactivation_correlation_kernel"),
                   ("convzoo.kernels.ekfac", "ekfac_kernel"))
