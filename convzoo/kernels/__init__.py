"""Triton kernels and their launchers (check → allocate → config lookup → launch).

Importing this package imports Triton; :mod:`convzoo.ops` does so lazily, on the first call that
needs a kernel, so that the CPU path works where Triton is absent.
"""
