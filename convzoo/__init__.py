"""convzoo: Triton kernels for the im2col family of convolutions, as torch.compile-friendly custom ops.

Public names only; nothing here touches a device at import.
"""

import importlib

from convzoo import functional, sparsity
from convzoo._compat import debug_info
from convzoo.autotune import config as _autotune_config
from convzoo.curvature import KFAC, KFACFactors
from convzoo.layers import (
    DynamicSparseConv1d,
    DynamicSparseConv2d,
    DynamicSparseConv3d,
    DynamicSparseLinear,
    Fold,
    LocalConv1d,
    LocalConv2d,
    LocalConv3d,
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    MaskedLinear,
    PruneRegrowSchedule,
    Unfold,
    UnfoldTranspose,
    desparsify,
    sparsify,
)

__all__ = [
    "KFAC", "DynamicSparseConv1d", "DynamicSparseConv2d", "DynamicSparseConv3d", "DynamicSparseLinear", "Fold",
    "KFACFactors", "LocalConv1d", "LocalConv2d", "LocalConv3d", "MaskedConv1d", "MaskedConv2d", "MaskedConv3d",
    "MaskedLinear", "PruneRegrowSchedule", "Unfold", "UnfoldTranspose", "debug_info", "desparsify", "functional",
    "sparsify", "sparsity"
]
__version__ = "0.1.0"

# the top of the house fills the autotune registry from below: a config looked up by a kernel name whose module is
# not imported yet (``CONVZOO_CONFIG``, ``force_config``, the tools) imports every kernel module first
_autotune_config.add_loader(lambda: importlib.import_module("convzoo.kernels").load_all())
