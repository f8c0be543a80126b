"""``Unfold`` and ``Fold`` modules, like :class:`torch.nn.Unfold` / :class:`torch.nn.Fold`, for 1-3-d."""

from __future__ import annotations

from torch import Tensor, nn

from convzoo import _shapes
from convzoo import functional as F


class Unfold(nn.Module):
    """im2col as a module: ``[N, C, *spatial]`` → ``[N, C·∏kernel_size, L]``. See :func:`convzoo.functional.unfold`."""

    def __init__(self, kernel_size, dilation=1, padding=0, stride=1, padding_mode: str = "zeros"):
        super().__init__()
        self.kernel_size = _shapes.plain_ints(kernel_size)
        self.dilation = _shapes.plain_ints(dilation)
        self.padding = _shapes.plain_ints(padding)
        self.stride = _shapes.plain_ints(stride)
        self.padding_mode = padding_mode

    def forward(self, input: Tensor) -> Tensor:
        return F.unfold(input, self.kernel_size, self.dilation, self.padding, self.stride,
                        padding_mode=self.padding_mode)

    def extra_repr(self) -> str:
        s = (f"kernel_size={self.kernel_size}, dilation={self.dilation}, padding={self.padding!r}, "
             f"stride={self.stride}")
        return s if self.padding_mode == "zeros" else s + f", padding_mode={self.padding_mode!r}"


class Fold(nn.Module):
    """col2im as a module: ``[N, C·∏kernel_size, L]`` → ``[N, C, *output_size]``.

    See :func:`convzoo.functional.fold`."""

    def __init__(self, output_size, kernel_size, dilation=1, padding=0, stride=1, padding_mode: str = "zeros"):
        super().__init__()
        self.output_size = _shapes.plain_ints(output_size)
        self.kernel_size = _shapes.plain_ints(kernel_size)
        self.dilation = _shapes.plain_ints(dilation)
        self.padding = _shapes.plain_ints(padding)
        self.stride = _shapes.plain_ints(stride)
        self.padding_mode = padding_mode

    def forward(self, input: Tensor) -> Tensor:
        return F.fold(input, self.output_size, self.kernel_size, self.dilation, self.padding, self.stride,
                      padding_mode=self.padding_mode)

    def extra_repr(self) -> str:
        s = (f"output_size={self.output_size}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
             f"padding={self.padding!r}, stride={self.stride}")
        return s if self.padding_mode == "zeros" else s + f", padding_mode={self.padding_mode!r}"


class UnfoldTranspose(nn.Module):
    """The patches a transposed convolution sees, as a module (unfoldNd's ``UnfoldTransposeNd``):
    ``[N, C, *spatial]`` → ``[N, C·∏kernel_size, L]``. See :func:`convzoo.functional.unfold_transpose`.

    ``forward(input, output_size=None)`` takes ``output_size`` as ``nn.ConvTranspose2d.forward`` does: given,
    it replaces ``output_padding``.
    """

    def __init__(self, kernel_size, stride=1, padding=0, output_padding=0, dilation=1):
        super().__init__()
        self.kernel_size = _shapes.plain_ints(kernel_size)
        self.stride = _shapes.plain_ints(stride)
        self.padding = _shapes.plain_ints(padding)
        self.output_padding = _shapes.plain_ints(output_padding)
        self.dilation = _shapes.plain_ints(dilation)

    def forward(self, input: Tensor, output_size=None) -> Tensor:
        return F.unfold_transpose(input, self.kernel_size, self.stride, self.padding, self.output_padding,
                                  self.dilation, output_size=output_size)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"output_padding={self.output_padding}, dilation={self.dilation}")
