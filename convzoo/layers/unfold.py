"""``Unfold`` and ``Fold`` modules, like :class:`torch.nn.Unfold` / :class:`torch.nn.Fold`, for 1-3-d."""

from __future__ import annotations

from torch import Tensor, nn

from convzoo import _shapes
from convzoo import functional as F


class _PatchModule(nn.Module):
    """What the three patch modules share: their geometry arguments kept as given (numpy ints made plain) in
    constructor order, and shown in that order by ``extra_repr`` (``padding_mode`` only when not ``'zeros'``)."""

    _GEOMETRY: tuple[str, ...] = ()  # the geometry arguments' names, in constructor order
    _AS_REPR = frozenset({"padding"})  # shown with repr(): a string padding ('same') keeps its quotes

    def __init__(self, *geometry):
        super().__init__()
        for name, value in zip(self._GEOMETRY, geometry, strict=True):
            setattr(self, name, _shapes.plain_ints(value))

    def extra_repr(self) -> str:
        s = ", ".join(f"{name}={getattr(self, name)!r}" if name in self._AS_REPR else f"{name}={getattr(self, name)}"
                      for name in self._GEOMETRY)
        mode = getattr(self, "padding_mode", "zeros")
        return s if mode == "zeros" else s + f", padding_mode={mode!r}"


class Unfold(_PatchModule):
    """im2col as a module: ``[N, C, *spatial]`` → ``[N, C·∏kernel_size, L]``. See :func:`convzoo.functional.unfold`."""

    _GEOMETRY = ("kernel_size", "dilation", "padding", "stride")

    def __init__(self, kernel_size, dilation=1, padding=0, stride=1, padding_mode: str = "zeros"):
        super().__init__(kernel_size, dilation, padding, stride)
        self.padding_mode = padding_mode

    def forward(self, input: Tensor) -> Tensor:
        return F.unfold(input, self.kernel_size, self.dilation, self.padding, self.stride,
                        padding_mode=self.padding_mode)


class Fold(_PatchModule):
    """col2im as a module: ``[N, C·∏kernel_size, L]`` → ``[N, C, *output_size]``.

    See :func:`convzoo.functional.fold`."""

    _GEOMETRY = ("output_size", "kernel_size", "dilation", "padding", "stride")

    def __init__(self, output_size, kernel_size, dilation=1, padding=0, stride=1, padding_mode: str = "zeros"):
        super().__init__(output_size, kernel_size, dilation, padding, stride)
        self.padding_mode = padding_mode

    def forward(self, input: Tensor) -> Tensor:
        return F.fold(input, self.output_size, self.kernel_size, self.dilation, self.padding, self.stride,
                      padding_mode=self.padding_mode)


class UnfoldTranspose(_PatchModule):
    """The patches a transposed convolution sees, as a module (unfoldNd's ``UnfoldTransposeNd``):
    ``[N, C, *spatial]`` → ``[N, C·∏kernel_size, L]``. See :func:`convzoo.functional.unfold_transpose`.

    ``forward(input, output_size=None)`` takes ``output_size`` as ``nn.ConvTranspose2d.forward`` does: given,
    it replaces ``output_padding``.
    """

    _GEOMETRY = ("kernel_size", "stride", "padding", "output_padding", "dilation")
    _AS_REPR = frozenset()  # ints only (nn.ConvTranspose's padding)

    def __init__(self, kernel_size, stride=1, padding=0, output_padding=0, dilation=1):
        super().__init__(kernel_size, stride, padding, output_padding, dilation)

    def forward(self, input: Tensor, output_size=None) -> Tensor:
        return F.unfold_transpose(input, self.kernel_size, self.stride, self.padding, self.output_padding,
                                  self.dilation, output_size=output_size)
