"""Masked sparse convolution: the tile-skipping implicit-GEMM Triton kernels and their launchers, the forward
(:mod:`.fwd`: the tile lists, the tap tile, the shared checks), the grad-weight (:mod:`.grad_weight`) and the
grad-input (:mod:`.grad_input`). Every name the one-module ``convzoo.kernels.masked_conv`` had is importable
from here; importing it registers the three KernelSpecs (``masked_conv_fwd``, ``masked_conv_grad_weight``,
``masked_conv_grad_input``)."""

from convzoo import _shapes  # noqa: F401  (the one-module kernels.masked_conv's name, tests reach it here)
from convzoo.kernels._common import _SMS, _fit  # noqa: F401  (likewise)
from convzoo.kernels.masked_conv.fwd import (  # noqa: F401
    BLOCK_SIZES,
    FWD_SPEC,
    _check_block,
    _check_list,
    _tap_tile,
    default_block,
    dense_tile_lists,
    masked_conv,
    masked_conv_fwd_kernel,
)
from convzoo.kernels.masked_conv.grad_input import (  # noqa: F401
    GRAD_INPUT_SPEC,
    _narrow,
    dense_grad_input_lists,
    masked_conv_grad_input,
    masked_conv_grad_input_kernel,
)
from convzoo.kernels.masked_conv.grad_weight import (  # noqa: F401
    GRAD_WEIGHT_SPEC,
    _gw_off32,
    masked_conv_grad_weight,
    masked_conv_grad_weight_kernel,
)

__all__ = ["BLOCK_SIZES", "masked_conv", "masked_conv_grad_input", "masked_conv_grad_weight"]
