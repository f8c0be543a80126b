"""nn.Modules mirroring torch's constructors."""

from convzoo.layers.convert import desparsify, sparsify
from convzoo.layers.dynamic_sparse import (
    DynamicSparseConv1d,
    DynamicSparseConv2d,
    DynamicSparseConv3d,
    PruneRegrowSchedule,
)
from convzoo.layers.local_conv import LocalConv1d, LocalConv2d, LocalConv3d
from convzoo.layers.masked_conv import MaskedConv1d, MaskedConv2d, MaskedConv3d
from convzoo.layers.masked_linear import DynamicSparseLinear, MaskedLinear
from convzoo.layers.unfold import Fold, Unfold, UnfoldTranspose

__all__ = [
    "DynamicSparseConv1d", "DynamicSparseConv2d", "DynamicSparseConv3d", "DynamicSparseLinear", "Fold",
    "LocalConv1d", "LocalConv2d", "LocalConv3d", "MaskedConv1d", "MaskedConv2d", "MaskedConv3d", "MaskedLinear",
    "PruneRegrowSchedule", "Unfold", "UnfoldTranspose", "desparsify", "sparsify"
]
