"""Triton kernels and their launchers (check → allocate → config lookup → launch).

Importing this package imports Triton; :mod:`convzoo.ops` does so lazily, on the first call that
needs a kernel, so that the CPU path works where Triton is absent.
"""

from convzoo.autotune import interpret_mode

#: whether the kernels below are decorated for Triton's interpreter (``TRITON_INTERPRET`` is read once,
#: when ``@triton.jit`` runs); :func:`convzoo.ops._dispatch.use_triton` refuses calls made after it changed
INTERPRETED = interpret_mode()
