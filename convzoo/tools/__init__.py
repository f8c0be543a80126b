"""The command-line tools, the top of the house: they import kernels, layers and peers, nothing imports them.

- ``convzoo-bench`` (:mod:`convzoo.tools.bench`): convzoo against its peers, timed, with rooflines;
- ``convzoo-autotune`` (:mod:`convzoo.tools.autotune`): tune the kernels' launch configs on this GPU;
- ``convzoo-gpu-check`` (:mod:`convzoo.tools.gpu_check`): tests, tuning and bench on a new GPU, one folder.
"""
