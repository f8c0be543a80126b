"""``convzoo::masked_conv`` and its two backward ops, each differentiable in turn, in both modes.

``y = masked_conv(x, W, m, b) = conv(x, W⊙m) + b`` is linear in ``x`` and in ``(W, b)``; the mask ``m``
(bool, the weight's shape) is a constant. Its backward is two ops: ``masked_conv_grad_input(grad, W, m)``
(linear in both) and ``masked_conv_grad_weight(grad, x, m)`` (bilinear, exactly zero where ``m`` is). The
adjoints close the family, as for local_conv:

- ``grad_input``: d/d(grad) is ``masked_conv(·, W, m)``, d/dW is ``grad_weight(grad, ·, m)``;
- ``grad_weight``: d/d(grad) is ``masked_conv(x, ·, m)``, d/dx is ``grad_input(grad, ·, m)``;

and each forward-mode tangent is the op with one argument replaced by its tangent: the rules of
:class:`convzoo.ops._family.Bilinear`, the mask its one constant tensor (:class:`_MaskedConv`). Arguments are
resolved by :mod:`convzoo.functional` (per-dim lists, flat ``[lo_0, hi_0, ...]`` padding, a bool mask).

All three run the tile-skipping Triton kernels (:mod:`convzoo.kernels.masked_conv`) on CUDA and under the
interpreter, else the plain-torch path (:func:`convzoo.reference.masked_conv`: ``F.convNd`` on the masked weight,
``torch.nn.grad`` for the two adjoints).

The kernels iterate over the mask's tile lists (:func:`convzoo.sparsity.tile_lists`). Those are built on the
device from the mask and cached per mask tensor (:func:`_tile_lists`): rebuilt only when the mask changes, which
its version counter tells (every in-place torch op on it bumps the counter: ``copy_``, ``set_mask``,
``load_state_dict``, an optimizer's or a collective's in-place write, ``mask[...] = ...``) or when its storage
changes (``mask.data = ...``). Writes that bypass the version counter (an in-place op on ``mask.data``, a write
through the storage, a DLPack or ``numpy()`` view) leave the key as it was; each call therefore also checks, on
the device and without a host sync, that the mask keeps no entry the cached lists' mask dropped, and where it
does the kernels visit every tile (right, at dense speed) until the version changes or :func:`clear_tile_cache`
is called.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from convzoo import _shapes, reference, sparsity
from convzoo.ops import _autograd, _family
from convzoo.ops._dispatch import own, use_triton

__all__ = ["clear_tile_cache", "masked_conv", "masked_conv_dense_grad", "masked_conv_grad_input",
           "masked_conv_grad_weight"]


# ---------------------------------------------------------------------------------------------- tile lists
# mask tensor (weakly, by identity) -> (key, the mask's storage, TileLists, the complement of the mask they were
# built from). The entry holds the storage it was built from, so that storage cannot be freed and its address
# reused by another while the entry lives: a key with the same storage address and version is then the same
# memory at the same version (or a write torch did not version, which _unless_grown catches).
_LISTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def clear_tile_cache() -> None:
    """Forget every cached tile list. Never needed for a right result; after a write that bypassed the mask's
    version counter (``mask.data[...] = ...``, a ``numpy()`` view) it brings back the tile skipping that the
    ops' on-device staleness check turned off (see the module docstring)."""
    _LISTS.clear()
    _dense_lists.cache_clear()


def _block(weight_shape, groups: int, block=None) -> tuple[int, int]:
    """The kernels' tile ``(BO, BK)``: the default for the layer's size (``block=None``), else the mask's own
    block (the layer's ``block``, whose whole tiles its masks keep or drop) capped at the kernels' largest tile
    (128) and, for a small matrix, at the one power-of-two tile that covers it. Each side then divides the
    mask's block (all are powers of two), so a kept block is whole kernel tiles and a dropped one is skipped:
    the fraction of tiles visited is the fraction of blocks kept (exactly where the block's sides are ≤ 128)."""
    from convzoo.autotune import bucket
    from convzoo.kernels import masked_conv as kernels

    og, k = weight_shape[0] // groups, math.prod(weight_shape[1:])
    if block is None:
        return kernels.default_block(og, k)
    top = kernels.BLOCK_SIZES[-1]
    return tuple(min(int(b), top, max(kernels.BLOCK_SIZES[0], bucket(n))) for b, n in zip(block, (og, k)))


@functools.lru_cache(maxsize=64)
def _dense_lists(weight_shape: tuple, groups: int, block: tuple, device: torch.device) -> sparsity.TileLists:
    """The lists of an all-ones mask (a dense conv through the kernels), one per shape and device."""
    return sparsity.tile_lists(torch.ones(weight_shape, dtype=torch.bool, device=device), groups, block)


def _tile_lists(mask: Tensor | None, weight_shape, groups: int, device: torch.device,
                block=None) -> sparsity.TileLists:
    """``mask``'s tile lists for :func:`_block`'s tile (the mask's ``block``, or the default), cached per mask
    tensor and rebuilt when its version, storage, offset, shape or strides, ``groups`` or the block change (see
    the module docstring); for ``mask=None`` the dense lists of a weight of ``weight_shape`` on ``device``."""
    block = _block(weight_shape, groups, block)
    if mask is None:
        return _dense_lists(tuple(weight_shape), groups, block, device)
    try:
        version = mask._version
    except RuntimeError:  # an inference tensor has no version counter: nothing to key a cache on
        return sparsity.tile_lists(mask, groups, block)
    storage = mask.untyped_storage()
    key = (version, storage._cdata, mask.storage_offset(), tuple(mask.shape), mask.stride(), groups, block)
    hit = _LISTS.get(mask)
    if hit is not None and hit[0] == key:
        return _unless_grown(mask, hit[2], hit[3])
    lists = sparsity.tile_lists(mask, groups, block)
    _LISTS[mask] = (key, storage, lists, ~mask)
    return lists


def _unless_grown(mask: Tensor, lists: sparsity.TileLists, dropped: Tensor) -> sparsity.TileLists:
    """``lists`` (cached), or, where ``mask`` now keeps an entry that the mask they were built from dropped
    (``dropped``: its complement), the same lists with every row's count at its full length: the kernels then
    visit every tile (each index row is a permutation of all of them), which is right for any mask, only slower.
    A write that bypasses the version counter (``mask.data[...] = ...``, the storage, a DLPack or numpy view)
    leaves the key unchanged; this check, on the device and without a host sync, keeps it from dropping the
    newly kept tiles. A mask that only lost entries keeps its (still covering) lists."""
    grown = (mask & dropped).any()
    return dataclasses.replace(lists, count=lists.count.masked_fill(grown, lists.index.shape[-1]),
                               t_count=lists.t_count.masked_fill(grown, lists.t_index.shape[-1]))


def _masked_weight(weight: Tensor, mask: Tensor | None) -> Tensor:
    """The weight with its masked entries zeroed (inside a listed tile they are read), laid out tap-major
    (``[C_out, *kernel, C_in/G]`` in memory): the kernels' ``[C_out, K]`` matrix is then a view and the
    ``where`` the one copy."""
    if mask is None:
        return weight
    return reference.masked_weight(weight.movedim(1, -1), mask.movedim(1, -1)).movedim(-1, 1)


def _masked_conv_impl(x: Tensor, weight: Tensor, mask: Tensor | None, bias: Tensor | None, stride: list[int],
                      padding: list[int], dilation: list[int], groups: int, padding_mode: str,
                      block: list[int] | None = None) -> Tensor:
    if use_triton(x):
        return own(_kernel_forward(x, weight, mask, bias, stride, padding, dilation, groups, padding_mode, block))
    return own(reference.masked_conv(x, weight, mask, bias, stride, padding, dilation, groups, padding_mode))


def _kernel_forward(x, weight, mask, bias, stride, padding, dilation, groups, padding_mode, block=None) -> Tensor:
    """The tile-skipping kernel on the mask's (cached) tile lists and the masked weight."""
    from convzoo.kernels import masked_conv as kernels

    lists = _tile_lists(mask, weight.shape, groups, x.device, block)
    return kernels.masked_conv(x, _masked_weight(weight, mask), lists.count, lists.index, bias,
                               list(weight.shape[2:]), dilation, padding, stride, padding_mode, groups, lists.block)


_masked_conv = torch.library.custom_op("convzoo::masked_conv", mutates_args=())(_masked_conv_impl)


@_masked_conv.register_fake
def _(x, weight, mask, bias, stride, padding, dilation, groups, padding_mode, block=None):
    g = _shapes.masked_conv_geometry(x, weight, mask, bias, stride, padding, dilation, groups, padding_mode)
    return x.new_empty(_shapes.masked_conv_out_shape(x, weight, g))


def _same_device(grad: Tensor, **others) -> None:
    """A fake's device check: one meta operand among real ones sends a call to the fake, whose ``new_empty``
    would be an uninitialised real tensor (masked_conv's own fake checks in its geometry)."""
    for name, t in others.items():
        _shapes.check(t is None or t.device == grad.device,
                      lambda name=name, t=t: f"{name} is on {t.device} but grad is on {grad.device}")


def _grad_input_impl(grad: Tensor, weight: Tensor, mask: Tensor | None, input_size: list[int], stride: list[int],
                     padding: list[int], dilation: list[int], groups: int, padding_mode: str,
                     block: list[int] | None = None) -> Tensor:
    if use_triton(grad):
        from convzoo.kernels import masked_conv as kernels

        lists = _tile_lists(mask, weight.shape, groups, grad.device, block)
        return own(kernels.masked_conv_grad_input(grad, _masked_weight(weight, mask), lists.t_count, lists.t_index,
                                                  list(input_size), list(weight.shape[2:]), dilation, padding, stride,
                                                  padding_mode, groups, lists.block))
    return own(reference.masked_conv_grad_input(grad, weight, mask, input_size, stride, padding, dilation, groups,
                                                padding_mode))


_grad_input = torch.library.custom_op("convzoo::masked_conv_grad_input", mutates_args=())(_grad_input_impl)


@_grad_input.register_fake
def _(grad, weight, mask, input_size, stride, padding, dilation, groups, padding_mode, block=None):
    _same_device(grad, weight=weight, mask=mask)
    _shapes.geometry(tuple(input_size), tuple(weight.shape[2:]), dilation, padding, stride, padding_mode)
    return grad.new_empty((grad.shape[0], weight.shape[1] * groups, *input_size))


def _weight_gradient(grad, x, mask, run, weight_size, stride, padding, dilation, groups, padding_mode, block):
    """The weight gradient on ``mask``'s tile lists: masked (``run`` None: exactly zero where the mask is), or
    for the dense-gradient tap unmasked in every tile where the 0-d bool ``run`` is True, else in the mask's tiles
    (zeros elsewhere; entries the mask drops inside a listed tile are computed too: the caller selects). On the
    kernels the tap is the grad-weight kernel on the mask's cached tile lists with every row's count set to its
    full length where ``run`` (each index row is a permutation of all tiles), no tile list rebuilt per step; on the
    plain-torch path the dense weight gradient."""
    kept = mask if run is None else None  # the mask the result is zeroed by
    if use_triton(grad):
        from convzoo.kernels import masked_conv as kernels

        lists = _tile_lists(mask, weight_size, groups, grad.device, block)
        count = lists.count if run is None else lists.count.masked_fill(run, lists.index.shape[-1])
        return own(kernels.masked_conv_grad_weight(grad, x, kept, count, lists.index, list(weight_size),
                                                   list(weight_size[2:]), dilation, padding, stride, padding_mode,
                                                   groups, lists.block))
    return own(reference.masked_conv_grad_weight(grad, x, kept, weight_size, stride, padding, dilation, groups,
                                                 padding_mode))


def _weight_gradient_fake(grad, x, weight_size, stride, padding, dilation, padding_mode, **others):
    _same_device(grad, input=x, **others)
    _shapes.geometry(tuple(x.shape[2:]), tuple(weight_size[2:]), dilation, padding, stride, padding_mode)
    return x.new_empty(weight_size)


def _grad_weight_impl(grad: Tensor, x: Tensor, mask: Tensor | None, weight_size: list[int], stride: list[int],
                      padding: list[int], dilation: list[int], groups: int, padding_mode: str,
                      block: list[int] | None = None) -> Tensor:
    return _weight_gradient(grad, x, mask, None, weight_size, stride, padding, dilation, groups, padding_mode, block)


_grad_weight = torch.library.custom_op("convzoo::masked_conv_grad_weight", mutates_args=())(_grad_weight_impl)


@_grad_weight.register_fake
def _(grad, x, mask, weight_size, stride, padding, dilation, groups, padding_mode, block=None):
    return _weight_gradient_fake(grad, x, weight_size, stride, padding, dilation, padding_mode, mask=mask)


# ---------------------------------------------------------------------------------------------- the family
def _fused_backward(ctx, grad, x, weight, mask, want_b, grad_mask=None):
    """On the plain-torch path, a first-order eager backward that needs both gradients: one
    ``aten.convolution_backward`` call for dx, dW (then masked) and the bias (as autograd of ``F.convNd`` makes),
    not two ops; None where that does not apply (the kernels, a graph being recorded for double backward or by a
    tracer, a padding ``F.convNd`` cannot take)."""
    stride, padding, dilation, groups, padding_mode = ctx.geom[:5]
    lo, hi = padding[0::2], padding[1::2]
    if (torch.is_grad_enabled() or padding_mode != "zeros" or lo != hi or use_triton(grad)
            or 0 in (grad.numel(), x.numel(), weight.numel()) or not _autograd.plain_eager((grad, x, weight, mask))):
        return None
    dx, dw, db = torch.ops.aten.convolution_backward(
        grad, x, _masked_weight(weight, mask), [weight.shape[0]] if want_b else None, stride, lo, dilation, False,
        [0] * len(stride), groups, [True, True, want_b])
    return dx, reference.masked_weight(dw, mask if grad_mask is None else grad_mask), db


class _MaskedConv(_family.Bilinear):
    """masked_conv as a :class:`convzoo.ops._family.Bilinear` family: the mask its one constant tensor, a
    per-channel bias, one ``aten.convolution_backward`` for a first-order plain-torch backward. A vmapped input
    (``x``, ``grad``) joins the batch dim N (one call for the whole vmap); anything else runs once per entry."""

    consts = 1

    def conv(self, x, w, consts, bias, geom):
        return masked_conv(x, w, *consts, bias, *geom)

    def grad_input(self, grad, w, consts, input_size, geom):
        return masked_conv_grad_input(grad, w, *consts, input_size, *geom)

    def grad_weight(self, grad, x, consts, weight_size, geom):
        return masked_conv_grad_weight(grad, x, *consts, weight_size, *geom)

    def bias_as_output(self, bias, shape):
        return _autograd.broadcast(bias, (1, shape[1], *([1] * (len(shape) - 2))), shape)

    def bias_grad(self, grad, bias_dim, from_weight_grad):
        return grad.sum([0, *range(2, grad.dim())])

    def fused_backward(self, ctx, grad, x, w, consts, want_bias):
        return _fused_backward(ctx, grad, x, w, *consts, want_bias)


masked_conv, masked_conv_grad_input, masked_conv_grad_weight = _MaskedConv().build(
    (_masked_conv, _masked_conv_impl), (_grad_input, _grad_input_impl), (_grad_weight, _grad_weight_impl))
masked_conv.__doc__ = """``convzoo::masked_conv(x, weight, mask, bias, stride, padding, dilation, groups,
padding_mode)``, differentiable under every transform (resolved arguments)."""
masked_conv_grad_input.__doc__ = """``convzoo::masked_conv_grad_input(grad, weight, mask, input_size, ...)``,
differentiable under every transform."""
masked_conv_grad_weight.__doc__ = """``convzoo::masked_conv_grad_weight(grad, x, mask, weight_size, ...)``: the
weight gradient, exactly zero where the mask is; differentiable under every transform."""


# ---------------------------------------------------------------------------------------------- dense-gradient tap
def _grad_weight_tap_impl(grad: Tensor, x: Tensor, mask: Tensor, run: Tensor, weight_size: list[int],
                          stride: list[int], padding: list[int], dilation: list[int], groups: int, padding_mode: str,
                          block: list[int] | None = None) -> Tensor:
    """The unmasked weight gradient in every tile where the 0-d bool ``run`` is True, else in the mask's tiles
    (:func:`_weight_gradient`)."""
    return _weight_gradient(grad, x, mask, run, weight_size, stride, padding, dilation, groups, padding_mode, block)


_grad_weight_tap = torch.library.custom_op("convzoo::masked_conv_grad_weight_tap",
                                           mutates_args=())(_grad_weight_tap_impl)


@_grad_weight_tap.register_fake
def _(grad, x, mask, run, weight_size, stride, padding, dilation, groups, padding_mode, block=None):
    return _weight_gradient_fake(grad, x, weight_size, stride, padding, dilation, padding_mode, mask=mask, run=run)


class _DenseGradTap(torch.autograd.Function):
    """``masked_conv(x, weight, mask, bias)`` whose backward also hands the *dense* weight gradient at the masked
    entries to ``probe`` (RigL's regrowth score), on the steps where ``run`` (a 0-d bool tensor) is True: the
    backward's one weight gradient is taken under the mask ``mask | run`` (all entries on those steps: on the
    kernels, the grad-weight kernel on the full tile lists; on the plain-torch path the same
    ``aten.convolution_backward`` call, its dense result kept), then split: ``weight`` gets it where ``mask`` is
    (exactly the masked gradient), ``probe`` where it is not (exactly 0 on the other steps). ``probe``'s value is
    never read. On the kernels the first-order weight gradient is ``convzoo::masked_conv_grad_weight_tap``: the
    grad-weight kernel on the mask's cached lists, every tile listed where ``run``. Reverse mode (the layer takes
    this path only for a plain training step; a ``create_graph`` backward takes the differentiable ops)."""

    @staticmethod
    def forward(x, weight, probe, mask, run, bias, stride, padding, dilation, groups, padding_mode, block):
        return masked_conv(x, weight, mask, bias, stride, padding, dilation, groups, padding_mode, block)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, probe, mask, run, bias, *geom = inputs
        ctx.save_for_backward(x, weight, mask, run)
        ctx.has_bias = bias is not None
        ctx.probe_dtype = probe.dtype
        ctx.geom = geom

    @staticmethod
    def backward(ctx, grad):
        x, weight, mask, run = ctx.saved_tensors
        wide = mask | run  # every entry on a step that taps the dense gradient, else the mask
        want_x, want_w, want_p = ctx.needs_input_grad[:3]
        want_b = ctx.has_bias and ctx.needs_input_grad[5]
        dx = dwe = db = None
        fused = None
        if want_x and (want_w or want_p):
            fused = _fused_backward(ctx, grad, x, weight, mask, want_b=want_b, grad_mask=wide)
        if fused is not None:
            dx, dwe, db = fused
        else:
            if want_x:
                dx = masked_conv_grad_input(grad, weight, mask, list(x.shape[2:]), *ctx.geom)
            if (want_w or want_p) and torch.is_grad_enabled():  # create_graph: the differentiable op
                dwe = masked_conv_grad_weight(grad, x, wide, list(weight.shape), *ctx.geom)
            elif want_w or want_p:  # (entries off the mask inside listed tiles too: the wheres below select)
                dwe = _grad_weight_tap(grad, x, mask, run, list(weight.shape), *ctx.geom)
            if want_b:
                db = grad.sum([0, *range(2, grad.dim())])
        dw = dp = None
        if dwe is not None:
            zero = dwe.new_zeros(())
            dw = torch.where(mask, dwe, zero) if want_w else None
            dp = torch.where(run & ~mask, dwe, zero).to(ctx.probe_dtype) if want_p else None
        return dx, dw, dp, None, None, db, None, None, None, None, None, None


def masked_conv_dense_grad(x: Tensor, weight: Tensor, probe: Tensor, mask: Tensor, run: Tensor, bias: Tensor | None,
                           stride: list[int], padding: list[int], dilation: list[int], groups: int, padding_mode: str,
                           block: list[int] | None = None) -> Tensor:
    """``masked_conv(x, weight, mask, bias, ...)`` (resolved arguments, a bool ``mask``) whose backward also
    writes, where the 0-d bool tensor ``run`` is True, the dense weight gradient ``∂L/∂W`` at the entries the mask
    drops into ``probe``'s gradient (a weight-shaped tensor that requires grad; its value is not read), with no
    second backward (see :class:`_DenseGradTap`). ``weight`` gets exactly the masked gradient. On the kernels the
    weight gradient is the grad-weight kernel on the mask's cached tile lists, every tile listed where ``run``."""
    return _DenseGradTap.apply(x, weight, probe, mask, run, bias, stride, padding, dilation, groups, padding_mode,
                               block)
