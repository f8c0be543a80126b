"""The old path of :mod:`convzoo.curvature.kfac` (the K-FAC preconditioner): ``convzoo.kfac.KFAC`` keeps working."""

from convzoo.curvature.kfac import DAMPING_SPLITS, FISHERS, KFAC, LOSSES, _positive_real  # noqa: F401

__all__ = ["KFAC"]
