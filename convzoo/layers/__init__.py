"""nn.Modules mirroring torch's constructors."""

from convzoo.layers.unfold import Fold, Unfold

__all__ = ["Fold", "Unfold"]
