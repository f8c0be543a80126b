"""nn.Modules mirroring torch's constructors."""

from convzoo.layers.local_conv import LocalConv1d, LocalConv2d, LocalConv3d
from convzoo.layers.unfold import Fold, Unfold, UnfoldTranspose

__all__ = ["Fold", "LocalConv1d", "LocalConv2d", "LocalConv3d", "Unfold", "UnfoldTranspose"]
