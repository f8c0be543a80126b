"""Named shape grids for the tuner: layers of real networks, each tuned for every kernel that serves it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from convzoo import _shapes


@dataclass(frozen=True)
class Layer:
    """One convolution-like layer: batch, channels in/out, spatial size and sliding-window geometry;
    ``kernels`` names the kernels to tune on it (None: every registered kernel)."""

    name: str
    n: int
    c: int
    size: tuple
    kernel: int = 3
    stride: int = 1
    padding: int = 0
    c_out: int | None = None
    kernels: tuple[str, ...] | None = None

    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def out_channels(self) -> int:
        return self.c_out or self.c

    def geometry(self) -> tuple[list, list, list, list, str]:
        """The ops' resolved arguments: kernel_size, dilation, flat padding, stride, padding_mode."""
        nd = self.ndim
        ks, st = _shapes.as_tuple(self.kernel, nd, "kernel"), _shapes.as_tuple(self.stride, nd, "stride")
        dil = (1,) * nd
        pad = _shapes.resolve_padding(self.padding, self.size, ks, dil, st)
        return list(ks), list(dil), pad, list(st), "zeros"

    def resolved(self) -> _shapes.Geometry:
        return _shapes.geometry(self.size, *self.geometry())

    @property
    def kernel_numel(self) -> int:
        return math.prod(_shapes.as_tuple(self.kernel, self.ndim, "kernel"))


GRIDS: dict[str, list[Layer]] = {
    # seconds even under the interpreter: the tuner's own tests and a smoke run on a new GPU
    "small": [
        Layer("2d_small", 2, 4, (8, 8), 3, 1, 1, 8),
        Layer("1d_small", 2, 4, (16,), 3, 2, 1, 4),
        Layer("3d_small", 1, 2, (4, 4, 4), 2, 1, 0, 4),
    ],
    # ResNet-50-ish at batch 32 (stem, the four stages, a strided 3×3)
    "resnet": [
        Layer("stem_7x7", 32, 3, (224, 224), 7, 2, 3, 64),
        Layer("conv2_x", 32, 64, (56, 56), 3, 1, 1, 64),
        Layer("conv3_x", 32, 128, (28, 28), 3, 1, 1, 128),
        Layer("conv4_x", 32, 256, (14, 14), 3, 1, 1, 256),
        Layer("conv5_x", 32, 512, (7, 7), 3, 1, 1, 512),
        Layer("down_s2", 32, 128, (56, 56), 3, 2, 1, 128),
    ],
    # KFAC on CIFAR-size nets: large batches, small images
    "kfac": [
        Layer("cifar_conv1", 128, 3, (32, 32), 3, 1, 1, 32),
        Layer("cifar_conv2", 128, 32, (32, 32), 3, 1, 1, 64),
        Layer("cifar_conv3", 128, 64, (16, 16), 3, 1, 1, 128),
        Layer("cifar_conv4", 128, 128, (8, 8), 3, 1, 1, 128),
    ],
    # locally connected layers: hypernetwork-sized maps, 1-d sequences, 3-d volumes
    "local": [
        Layer("local_2d", 32, 64, (32, 32), 3, 1, 1, 64),
        Layer("local_2d_b256", 256, 32, (16, 16), 3, 1, 1, 32),
        Layer("local_1d", 32, 64, (256,), 5, 1, 2, 64),
        Layer("local_3d", 8, 16, (8, 16, 16), 3, 1, 1, 16),
    ],
}
GRIDS["all"] = [layer for name in ("resnet", "kfac", "local") for layer in GRIDS[name]]
