"""torch.library custom ops ``convzoo::*``: schema, fake, autograd, and the dispatch between the
Triton launchers (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and plain torch (every
other case: the reference, or torch's own CPU im2col/col2im where they compute the same, see
:mod:`convzoo.ops._native`)."""

from convzoo.ops import coactivation as _coactivation  # noqa: F401  (registers convzoo::coactivation*)
from convzoo.ops import local_conv as _local_conv  # noqa: F401  (registers convzoo::local_conv*)
from convzoo.ops import masked_conv as _masked_conv  # noqa: F401  (registers convzoo::masked_conv*)
from convzoo.ops import patch_covariance as _patch_covariance  # noqa: F401  (registers convzoo::patch_covariance*)
from convzoo.ops import patches as _patches  # noqa: F401  (registers convzoo::extract_patches*)
from convzoo.ops import unfold as _unfold  # noqa: F401  (registers convzoo::unfold, convzoo::fold)
from convzoo.ops import unfold_transpose as _unfold_transpose  # noqa: F401  (registers convzoo::unfold_transpose*)
