"""``torch.nn.functional``-style entry points: normalise arguments, call the ops in :mod:`convzoo.ops`.

One submodule per family, re-exported here (``convzoo.functional.unfold`` etc. are the paths to use):
``_unfold`` (unfold, fold, unfold_transpose), ``_local_conv``, ``_conv_matrix``, ``_statistics`` (patch_covariance,
ekfac_eigenvalues, extract_patches, extract_averaged_patches), ``_sparse`` (masked_conv, coactivation), and
``_args``, the argument handling they share. The private helpers are re-exported too: the layers use some of
them through ``convzoo.functional``, and every name of the former single module keeps its path.
"""

from __future__ import annotations

from convzoo.functional._args import (  # noqa: F401
    _AUTOCAST_DEVICE_TYPES,
    _all_zero,
    _as_lists,
    _autocast,
    _batched_unfold_args,
    _cache_key,
    _cached_unfold_args,
    _check_choice,
    _check_same_unstrided,
    _geometry_args,
    _positive_tuples,
    _real,
    _resolved,
    _spatial_ndim,
    _threshold,
    _unfold_args,
)
from convzoo.functional._conv_matrix import conv_matrix
from convzoo.functional._local_conv import _check_not_unbatched, local_conv  # noqa: F401
from convzoo.functional._sparse import (  # noqa: F401
    _bool_mask,
    _cached_coactivation_args,
    _cached_masked_conv_args,
    _coactivation_args,
    _mask_is_differentiated,
    _masked_conv_args,
    coactivation,
    masked_conv,
)
from convzoo.functional._statistics import (  # noqa: F401
    _check_basis,
    _covariance_transposed_args,
    _ekfac_linear,
    _statistic_geometry,
    ekfac_eigenvalues,
    extract_averaged_patches,
    extract_patches,
    patch_covariance,
)
from convzoo.functional._unfold import _cached_fold_args, _fold_args, fold, unfold, unfold_transpose  # noqa: F401

__all__ = ["coactivation", "conv_matrix", "ekfac_eigenvalues", "extract_averaged_patches", "extract_patches", "fold",
           "local_conv", "masked_conv", "patch_covariance", "unfold", "unfold_transpose"]
