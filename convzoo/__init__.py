"""convzoo: Triton kernels for the im2col family of convolutions, as torch.compile-friendly custom ops.

Public names only; nothing here touches a device at import.
"""

from convzoo import functional
from convzoo.layers import Fold, Unfold

__all__ = ["Fold", "Unfold", "functional"]
__version__ = "0.1.0"
