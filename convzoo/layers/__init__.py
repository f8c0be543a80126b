"""nn.Modules mirroring torch's constructors."""

from convzoo.layers.local_conv import LocalConv1d, LocalConv2d, LocalConv3d
from convzoo.layers.masked_conv import MaskedConv1d, MaskedConv2d, MaskedConv3d
from convzoo.layers.unfold import Fold, Unfold, UnfoldTranspose

__all__ = ["Fold", "LocalConv1d", "LocalConv2d", "LocalConv3d", "MaskedConv1d", "MaskedConv2d", "MaskedConv3d",
           "Unfold", "UnfoldTranspose"]
