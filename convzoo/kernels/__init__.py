"""Triton kernels and their launchers (check → allocate → config lookup → launch).

Importing this package imports Triton; :mod:`convzoo.ops` does so lazily, on the first call that
needs a kernel, so that the CPU path works where Triton is absent.
"""

import importlib

# every kernel module; importing one decorates its kernels and registers their autotune specs
MODULES = ("coactivation", "ekfac", "local_conv", "masked_conv", "patch_covariance", "patches", "unfold",
           "unfold_transpose")


def load_all() -> None:
    """Import every kernel module (the tuner, the AOT compile and the static checks need them all registered)."""
    for name in MODULES:
        importlib.import_module(f"convzoo.kernels.{name}")
