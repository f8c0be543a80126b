"""convzoo: Triton kernels for the im2col family of convolutions, as torch.compile-friendly custom ops.

Public names only; nothing here touches a device at import.
"""

from convzoo import functional, sparsity
from convzoo.curvature import KFACFactors
from convzoo.layers import (
    Fold,
    LocalConv1d,
    LocalConv2d,
    LocalConv3d,
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    Unfold,
    UnfoldTranspose,
)

__all__ = ["Fold", "KFACFactors", "LocalConv1d", "LocalConv2d", "LocalConv3d", "MaskedConv1d", "MaskedConv2d",
           "MaskedConv3d", "Unfold", "UnfoldTranspose", "functional", "sparsity"]
__version__ = "0.1.0"
