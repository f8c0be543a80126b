"""The matrix of a convolution (its doubly-block Toeplitz matrix), sparse or dense."""

from __future__ import annotations

import torch

from convzoo import _shapes, reference
from convzoo.functional._args import _check_same_unstrided, _geometry_args


def conv_matrix(weight: torch.Tensor, input_size, stride=1, padding=0, dilation=1, groups=1, *,
                padding_mode: str = "zeros", layout: str = "sparse_csr",
                max_dense_elements: int | None = None) -> torch.Tensor:
    """The matrix of a convolution: ``B`` with ``conv(x).flatten(1) == (B @ x.flatten(1).T).T``.

    ``conv`` is ``F.conv1d/2d/3d(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups)``
    on a batch ``x`` of shape ``[N, C_in, *input_size]`` (no bias: add it to the product). With a
    ``padding_mode`` other than ``'zeros'``, ``conv`` first pads ``x`` with ``F.pad(x, padding, mode)`` and
    then convolves without padding, as ``nn.Conv2d(padding_mode=...)`` does. The doubly-block Toeplitz
    matrix of the convolution, for 1, 2 or 3 spatial dims, built directly from index arithmetic
    (vectorised over channels, positions and taps; no convolution is run)::

        B[(o, l), (c, j)] = Σ_{k : tap k of output position l reads input pixel j} weight[o, c - g(o)·C_in/groups, k]

    for ``c`` in ``o``'s group ``g(o) = o // (C_out/groups)``, zero elsewhere. Rows are ``(o, l)`` and
    columns ``(c, j)`` in C order, matching ``flatten(1)``. With zero padding a tap reading the padding
    contributes nothing; with ``'reflect'``/``'replicate'``/``'circular'`` it reads the pixel the padding
    copies, and taps of one row that read the same pixel are summed (e.g. circular padding 1 of a 2-pixel
    input with a 3-tap kernel).

    Args:
        weight: ``[C_out, C_in/groups, *kernel]``, floating dtype, any strides, any device. The result
            has its dtype and device, and is differentiable w.r.t. it in every layout (the entries are
            a gather from ``weight``; duplicate taps are summed by ``coalesce``).
        input_size: the spatial size of the input, one int per kernel dim (an int is repeated).
        stride, dilation: int or one int per spatial dim; positive.
        padding: int, per-dim ints, per-dim ``(lo, hi)`` pairs, ``'valid'`` or ``'same'`` (stride 1 only,
            as torch; an odd total padding puts the extra element on the high side, as torch does).
        groups: as in ``F.conv2d``: ``C_in = groups·weight.shape[1]``; must divide ``C_out``.
        padding_mode: ``'zeros'``, ``'reflect'`` (padding < size), ``'replicate'`` or ``'circular'``
            (padding ≤ size).
        layout: ``'sparse_csr'`` (default), ``'sparse_coo'`` (coalesced) or ``'dense'``. Sparse indices
            are int64, so a matrix may have more than 2**31 rows, columns or entries.
        max_dense_elements: the most elements ``layout='dense'`` may allocate (default 2**28; never more
            than 2**31 whatever it says).

    Returns:
        ``B``, ``[C_out·∏out, C_in·∏input_size]`` with ``out`` the output size of the convolution, and
        about ``C_out·∏out·(C_in/groups)·∏kernel`` stored entries (fewer where taps read zero padding).

    Raises:
        TypeError: ``weight`` is not a floating tensor; ``input_size``, ``stride``, ``padding``,
            ``dilation``, ``groups`` or ``max_dense_elements`` is not an int (or a sequence of ints), or
            is a bool.
        ValueError: ``weight`` is not 3-5-d or has an empty kernel; ``input_size`` of the wrong length or
            not positive; non-positive stride/dilation/groups, negative padding, ``groups`` not dividing
            ``C_out``; ``padding='same'`` with a stride; an unknown padding, ``padding_mode`` or
            ``layout``; a kernel larger than the padded input; a padding too large for ``padding_mode``;
            ``layout='dense'`` beyond ``max_dense_elements`` or 2**31 elements.
    """
    nd = _shapes.conv_weight_ndim(weight)
    in_size = _shapes.as_tuple(input_size, nd, "input_size")
    if any(e <= 0 for e in in_size):
        raise ValueError(f"input_size must be positive, got {in_size}")
    _check_same_unstrided(padding, stride, nd)
    _, dil, pad, st, mode = _geometry_args(nd, tuple(weight.shape[2:]), dilation, padding, stride, in_size,
                                           padding_mode)
    return reference.conv_matrix(weight, list(in_size), list(dil), list(pad), list(st), groups, mode, layout,
                                 max_dense_elements)
