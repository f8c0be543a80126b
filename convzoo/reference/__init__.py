"""Plain-torch implementations of every convzoo op: the CPU path and the test oracle.

They take the same resolved arguments as the custom ops (padding as the flat
``[lo_0, hi_0, ...]`` list, see :mod:`convzoo._shapes`) and run on any device and any floating
dtype, float64 included.

One submodule per family, every name re-exported here (``convzoo.reference.X`` is the path to use):
``_patches`` (padding, unfold / fold, unfold_transpose, extract_patches and the averaged patches), ``_conv``
(local_conv, conv_matrix, masked_conv) and ``_statistics`` (patch_covariance, coactivation, ekfac_eigenvalues).
"""

from __future__ import annotations

from convzoo.reference._conv import (  # noqa: F401
    _CONV,
    _CONV_INPUT,
    _CONV_WEIGHT,
    _grad_by_position,
    conv_matrix,
    local_conv,
    local_conv_grad_input,
    local_conv_grad_weight,
    masked_conv,
    masked_conv_grad_input,
    masked_conv_grad_weight,
    masked_weight,
)
from convzoo.reference._patches import (  # noqa: F401
    _acc,
    _clip_tap,
    _each_tap,
    _mean_patch,
    _pad,
    _patches_by_position,
    _transpose_tap_sums,
    _transpose_taps,
    _unpad_adjoint,
    _window_tap_sums,
    _windows,
    averaged_patches,
    averaged_transpose_patches,
    broadcast_groups,
    extract_patches,
    extract_patches_backward,
    fold,
    group_mean,
    source_index,
    unfold,
    unfold_transpose,
    unfold_transpose_backward,
)
from convzoo.reference._statistics import (  # noqa: F401
    _COUNT_MAX_GROUPS,
    _TRIANGLE_ROWS,
    _correlation,
    _count_int8,
    _covariance_geometry,
    _no_autocast,
    _normalized_over_batch,
    _patch_chunks,
    _position_blocks,
    _transpose_args,
    coactivation,
    ekfac_eigenvalues,
    gram_into,
    patch_covariance,
)

# chunk budgets of the statistics (bytes), read from here at each call by _statistics: one setting for every family
_CHUNK_BYTES = 32 << 20  # one chunk of the patch matrix: big enough for a fast matmul, small next to the whole
# the int8 count's patch matrix per batch chunk (bytes): bounds its extra memory
_COUNT_CHUNK_BYTES = 64 << 20

__all__ = ["averaged_patches", "averaged_transpose_patches", "broadcast_groups", "coactivation", "conv_matrix",
           "extract_patches", "extract_patches_backward", "fold", "group_mean", "local_conv", "local_conv_grad_input",
           "local_conv_grad_weight", "masked_conv", "masked_conv_grad_input", "masked_conv_grad_weight",
           "masked_weight", "patch_covariance", "source_index", "unfold", "unfold_transpose",
           "unfold_transpose_backward"]
