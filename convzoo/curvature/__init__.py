"""Curvature of a model's layers, in one place: the KFAC factors kept by hooks (:mod:`.factors`,
:class:`KFACFactors`) and the K-FAC / EKFAC preconditioner on them (:mod:`.kfac`, :class:`KFAC`). The patch
statistics they call are :func:`convzoo.functional.patch_covariance` and
:func:`convzoo.functional.ekfac_eigenvalues`.
"""

from __future__ import annotations

from convzoo.curvature.factors import (  # noqa: F401  (convzoo.curvature.X, as before the package)
    _CONVS,
    _SUPPORTED,
    _TRANSPOSED,
    SCALES,
    KFACFactors,
    _GradientHook,
    _Hook,
    _InertHook,
)
from convzoo.curvature.kfac import KFAC

__all__ = ["KFAC", "KFACFactors"]
