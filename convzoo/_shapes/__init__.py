"""Shape math and argument checks shared by fakes, launchers and references.

Everything about sliding-window geometry lives here, once: normalising ``int``/tuple arguments,
resolving ``'same'``/``'valid'`` padding, output sizes, and the checks that give a bad argument a
clear ``ValueError``/``TypeError`` naming it.

Internally padding is a flat list ``[lo_0, hi_0, lo_1, hi_1, ...]`` in spatial order (dim 0 is
the outermost spatial dim), so asymmetric padding (``'same'`` with an even kernel or a stride)
is one case, not a special one.

All functions here work on plain ``int`` and on ``torch.SymInt``: the fakes call them while
tracing with dynamic shapes.

One place, in submodules re-exported here (``convzoo._shapes.X`` is the path to use): ``_core`` (argument
normalisation, padding, ``Geometry``, unfold / fold, the shared tensor checks), ``_transpose`` (unfold_transpose),
``_conv`` (local_conv, conv_matrix), ``_statistics`` (patch_covariance, extract_patches, out buffers) and
``_sparse`` (masked_conv, coactivation).
"""

from __future__ import annotations

from convzoo._shapes._conv import (  # noqa: F401
    _DENSE_LIMIT,
    _INDEX_LIMIT,
    CONV_MATRIX_LAYOUTS,
    DEFAULT_MAX_DENSE_ELEMENTS,
    _check_grad_grid,
    conv_matrix_geometry,
    conv_matrix_shape,
    conv_weight_ndim,
    local_conv_geometry,
    local_conv_grad_input_geometry,
    local_conv_grad_weight_geometry,
    local_conv_grad_weight_shapes,
    local_conv_out_shape,
)
from convzoo._shapes._core import (  # noqa: F401
    _GEOMETRY_LIMIT,
    FLOAT_DTYPES,
    PADDING_MODE_CODES,
    PADDING_MODES,
    Geometry,
    _cached_geometry,
    _geometry,
    _Grid,
    _is_int,
    as_tuple,
    check,
    check_columns_divide,
    check_columns_input,
    check_float_tensor,
    check_spatial_input,
    columns_geometry,
    columns_out_shape,
    fold_geometry,
    fold_out_shape,
    geometry,
    patches_out_shape,
    plain_ints,
    resolve_padding,
    spatial_ndim_of,
    unfold_geometry,
    unfold_out_shape,
    unfold_transpose_backward_out_shape,
    unfold_transpose_out_shape,
)
from convzoo._shapes._sparse import (  # noqa: F401
    COACTIVATION_MODES,
    _check_masked_weight,
    check_coactivation_output_size,
    check_coactivation_shapes,
    check_masked_conv_channels,
    check_weight_shape,
    coactivation_dtype,
    coactivation_geometry,
    masked_conv_geometry,
    masked_conv_out_shape,
)
from convzoo._shapes._statistics import (  # noqa: F401
    COVARIANCE_MODES,
    GROUP_REDUCTIONS,
    _self_overlapping,
    _span,
    check_groups,
    check_out_buffer,
    check_out_memory,
    covariance_shape,
    extract_patches_backward_geometry,
    extract_patches_backward_out_shape,
    extract_patches_geometry,
    extract_patches_out_shape,
)
from convzoo._shapes._transpose import (  # noqa: F401
    TransposeGeometry,
    transpose_geometry,
    transpose_output_padding,
    unfold_transpose_backward_geometry,
    unfold_transpose_geometry,
)
