"""``torch.nn.functional``-style entry points: normalise arguments, call the ops in :mod:`convzoo.ops`.

One submodule per family, re-exported here (``convzoo.functional.unfold`` etc. are the public paths):
``_unfold`` (unfold, fold, unfold_transpose), ``_local_conv``, ``_conv_matrix``, ``_statistics`` (patch_covariance,
ekfac_eigenvalues, extract_patches, extract_averaged_patches), ``_sparse`` (masked_conv, coactivation), and
``_args``, the argument handling they share (also used by the layers).
"""

from __future__ import annotations

# private helpers the layers (and tests) reach through convzoo.functional
from convzoo.functional._args import _as_lists, _autocast, _geometry_args, _real, _resolved, _threshold  # noqa: F401
from convzoo.functional._conv_matrix import conv_matrix
from convzoo.functional._local_conv import local_conv
from convzoo.functional._sparse import (  # noqa: F401
    _bool_mask,
    _cached_masked_conv_args,
    _masked_conv_args,
    coactivation,
    masked_conv,
)
from convzoo.functional._statistics import (
    ekfac_eigenvalues,
    extract_averaged_patches,
    extract_patches,
    patch_covariance,
)
from convzoo.functional._unfold import fold, unfold, unfold_transpose

__all__ = ["coactivation", "conv_matrix", "ekfac_eigenvalues", "extract_averaged_patches", "extract_patches", "fold",
           "local_conv", "masked_conv", "patch_covariance", "unfold", "unfold_transpose"]
