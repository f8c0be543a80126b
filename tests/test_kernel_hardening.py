"""Attack tests on the kernel launchers: element offsets past 2^31, bf16 under the interpreter, and
empty dims. Each compares against an independent computation on the few elements involved.

Offsets past 2^31 come from views with huge strides whose storage is a sparse file (CPU): the OS maps
it lazily, so gigabytes of address space cost the few pages written. The views sit 2^32 elements
into their storage, so an offset that wrapped around int32 (by at most 2^32) would still read inside
it: a regression shows as a wrong value, not as a crash.
"""

import math

import pytest
import torch
from problems import TOL, Case, flat_padding, oracle_fold, oracle_unfold

import convzoo.functional as cf
from convzoo import _shapes, reference
from convzoo.kernels import _common as cm
from convzoo.kernels import local_conv as lc_kernels  # decorate the kernels while TRITON_INTERPRET is set
from convzoo.kernels import unfold as unfold_kernels

WRAP = 2**32  # storage offset of every huge view: an int32-wrapped offset lands inside the storage
HUGE = 2**30 + 2**20  # a stride that is int32 itself, but index 2 · HUGE is past 2^31 (and below 2^32)


def huge_view(values: torch.Tensor, strides: tuple, tmp_path, name: str) -> torch.Tensor:
    """``values`` copied into a view with the given element strides, ``WRAP`` elements into its storage.

    CPU: the storage maps a sparse file. CUDA: a real allocation, skipped when it does not fit.
    """
    numel = WRAP + sum((s - 1) * st for s, st in zip(values.shape, strides)) + 1
    if values.device.type == "cpu":
        path = tmp_path / f"{name}.bin"
        with open(path, "wb") as f:
            f.truncate(numel * values.element_size())
        storage = torch.from_file(str(path), shared=True, size=numel, dtype=values.dtype)
        path.unlink()  # the mapping keeps the pages; no file of 10+ GB apparent size stays behind
    else:
        try:
            storage = torch.empty(numel, dtype=values.dtype, device=values.device)
        except torch.OutOfMemoryError:
            pytest.skip(f"{numel * values.element_size() / 2**30:.0f} GiB do not fit on this GPU")
    view = storage.as_strided(values.shape, strides, WRAP)
    view.copy_(values)
    return view


def _geom(k, pad=0, mode="zeros"):
    """1-d kernel arguments as the launchers take them: kernel, dilation, flat padding, stride, mode."""
    return [k], [1], [pad, pad], [1], mode


# ---------------------------------------------------------------------------------------------- 2^31
def test_fold_tap_offset_past_int32(tmp_path, kernel_device):
    """fold reads tap k of a column at k · stride_ck: with the stride int32 and k ≥ 2, past 2^31
    (what any contiguous cols with (K-1)·L ≥ 2^31 does on a GPU)."""
    k, size = 3, 6
    dense = torch.randint(-8, 9, (2, k, size - k + 1)).float().to(kernel_device)  # N = 2, C = 1, L = 4
    cols = huge_view(dense, (4, HUGE, 1), tmp_path, "cols")
    out = unfold_kernels.fold(cols, [size], *_geom(k))
    torch.testing.assert_close(out, reference.fold(dense, [size], *_geom(k)), atol=0, rtol=0)


def test_unfold_backward_offset_past_int32(tmp_path, kernel_device):
    """unfold's backward is fold of the incoming gradient, with whatever strides it has."""
    x = torch.randn(1, 1, 6, device=kernel_device, requires_grad=True)
    y = cf.unfold(x, 3)
    dense = torch.randint(-8, 9, y.shape).float().to(kernel_device)
    (gx,) = torch.autograd.grad(y, x, huge_view(dense, (0, HUGE, 1), tmp_path, "grad"))
    torch.testing.assert_close(gx, reference.fold(dense, [6], *_geom(3)), atol=0, rtol=0)


def test_unfold_channel_offset_past_int32(tmp_path, kernel_device):
    dense = torch.randn(2, 3, 5, device=kernel_device)
    x = huge_view(dense, (1, HUGE, 3), tmp_path, "x")  # channel c at c · HUGE
    out = unfold_kernels.unfold(x, *_geom(3, 1, "reflect"))
    torch.testing.assert_close(out, reference.unfold(dense, *_geom(3, 1, "reflect")), atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("shape, strides", [((1, 1, 5), (1, 1, HUGE)), ((1, 1, 3, 4), (1, 1, HUGE, 1)),
                                            ((1, 1, 3, 4), (1, 1, 1, HUGE))], ids=["W", "H_of_2d", "W_of_2d"])
def test_unfold_offset_within_a_plane_past_int32(shape, strides, mode, tmp_path, kernel_device):
    """Within one (sample, channel) plane the gather reads past 2^31 (index 2 or 4 of a dim of int32 stride HUGE):
    the launcher keeps the kernel's in-plane index math int64 (``_narrow``), for unfold and unfold_transpose alike
    (the int32 math reads 2^32 elements off, which the storage holds)."""
    from convzoo.kernels import unfold_transpose as transpose_kernels

    dense = torch.randint(-8, 9, shape).float().to(kernel_device)
    x = huge_view(dense, strides, tmp_path, "x")
    k = [3] * (dense.dim() - 2)
    ones = [1] * len(k)
    assert not _narrow(x, k, [1, 1] * len(k), ones, mode)
    geom = k, ones, [1, 1] * len(k), ones, mode
    torch.testing.assert_close(unfold_kernels.unfold(x, *geom), reference.unfold(dense, *geom), atol=0, rtol=0)
    geom = k, ones, ones, [0] * len(k), ones
    torch.testing.assert_close(transpose_kernels.unfold_transpose(x, *geom), reference.unfold_transpose(dense, *geom),
                               atol=0, rtol=0)


def _narrow(x, kernel, padding, stride, mode, rows=1):
    """unfold's launcher's int32 test for ``x`` and a geometry (flat padding), rows = ``rows``."""
    g = _shapes.unfold_geometry(x, kernel, [1] * len(kernel), padding, stride, mode)
    return unfold_kernels._narrow(cm._as_5d(x, g.ndim), rows, math.prod(g.out_size), cm._as_3d(g))


def test_unfold_takes_int32_index_math_below_2_31():
    """The int32 test: rows, positions, the farthest element of a plane, and every index value the kernel forms
    (a wrapped index on a lane that reads is a wrong number: replicate clamps it to the wrong edge, circular's
    shift by n leaves it negative, a stride-0 dim of 2^31 elements loses its positions past 2^31)."""
    x = torch.empty(2, 3, 6, 7, device="meta")
    assert _narrow(x, [3, 3], [1, 1, 1, 1], [1, 1], "zeros", rows=2 * 3 * 9)
    assert not _narrow(x, [3, 3], [1, 1, 1, 1], [1, 1], "zeros", rows=2**31)
    huge = torch.empty_strided(x.shape, (0, 0, 2**30, 1), device="meta")  # 5 · 2^30 + 6 in one plane
    assert not _narrow(huge, [1, 1], [0, 0, 0, 0], [1, 1], "zeros") and _narrow(huge[:, :, :1], [1, 1], [0] * 4, [1, 1],
                                                                              "zeros")
    pair = torch.empty(1, 1, 2, device="meta")  # replicate padding of 2^31 at the end, stride 2: L = 2^30 + 1
    assert _narrow(pair, [1], [0, 4], [2], "replicate") and not _narrow(pair, [1], [0, 2**31], [2], "replicate")
    n = 3 * 2**29 + 1  # a plane below 2^31 whose circular shift p + n passes it
    assert not _narrow(torch.empty(1, 1, n, device="meta"), [3], [1, 1], [1], "circular")
    assert not _narrow(torch.empty_strided((1, 1, 2**31 + 2), (0, 0, 0), device="meta"), [1], [0, 0], [2], "zeros")


def _local_conv_dense(device):
    """x [2, 3, 5], weight [3, 9, 3] (k = 3, L = 3), grad [2, 3, 3]: fp32. Three of C_in, C_out and L,
    so that index 2 of each meets a huge stride."""
    x = torch.randn(2, 3, 5, device=device)
    w = torch.randn(3, 9, 3, device=device)
    gy = torch.randn(2, 3, 3, device=device)
    return x, w, gy


def test_local_conv_forward_offsets_past_int32(tmp_path, kernel_device):
    """x's channel c at c · HUGE, and position l's filter at l · HUGE."""
    x, w, _ = _local_conv_dense(kernel_device)
    b = torch.randn(3, 3, device=kernel_device)
    xh = huge_view(x, (1, HUGE, 3), tmp_path, "x")
    wh = huge_view(w, (9, 1, HUGE), tmp_path, "w")
    y = lc_kernels.local_conv(xh, wh, b, *_geom(3))
    ref = reference.local_conv(x.double(), w.double(), b.double(), *_geom(3))
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_local_conv_forward_batch_last_offsets_past_int32(mode, tmp_path, kernel_device):
    """x already batch-last (read in place, no copy: a patch row is 8 contiguous samples) with channel c at c · HUGE:
    the launcher keeps the position, row and in-sample math int64 (no int32 test passes, so no row table either)."""
    x = torch.randn(8, 3, 5, device=kernel_device)
    xh = huge_view(x, (1, HUGE, 8), tmp_path, "x")
    geom = [3], [1], [1, 1] if mode == "reflect" else [0, 0], [1], mode
    w = torch.randn(3, 9, 5 if mode == "reflect" else 3, device=kernel_device)
    assert not cm._index_fits(cm._as_5d(xh, 1), cm._as_3d(_shapes.local_conv_geometry(xh, w, None, *geom)), 1)
    y = lc_kernels.local_conv(xh, w, None, *geom)
    torch.testing.assert_close(y.double(), reference.local_conv(x.double(), w.double(), None, *geom), atol=1e-5,
                               rtol=1e-5)


def test_local_conv_forward_weight_row_offsets_past_int32(tmp_path, kernel_device):
    """The weight's patch row r at r · HUGE (C_out and positions small): past 2^31 from row 2 on, so the forward keeps
    its row math int64 although x's index math alone would pass the int32 test (a batch of 8: x copied batch-last)."""
    x = torch.randn(8, 3, 5, device=kernel_device)
    w = torch.randn(3, 9, 3, device=kernel_device)
    wh = huge_view(w, (1, HUGE, 3), tmp_path, "w")
    y = lc_kernels.local_conv(x, wh, None, *_geom(3))
    torch.testing.assert_close(y.double(), reference.local_conv(x.double(), w.double(), None, *_geom(3)), atol=1e-5,
                               rtol=1e-5)


def test_local_conv_forward_tap_offsets_past_2_32(kernel_device):
    """Dilation 2^27 and padding 2^27 on a 3-wide x: tap 1 of every position reads x in range, tap 0 padding, but tap
    1's offset from the window corner is 2^27 · (a batch-last stride of 64) = 2^33. The row table cannot hold it (its
    low word would spill into the tap's, masking a tap that reads): the launcher computes the rows instead."""
    x = torch.randn(64, 1, 3, device=kernel_device)
    w = torch.randn(1, 2, 3, device=kernel_device)
    geom = [2], [2**27], [2**27, 0], [1], "zeros"
    y = lc_kernels.local_conv(x, w, None, *geom)
    torch.testing.assert_close(y, (x[:, 0, :] * w[0, 1, :])[:, None, :], atol=1e-6, rtol=1e-6)


def test_local_conv_grad_weight_offsets_past_int32(tmp_path, kernel_device):
    """x's channel c at c · HUGE, and dY of position l at l · HUGE (the launcher copies such a dY
    batch-contiguous: the copy must read it right)."""
    x, _, gy = _local_conv_dense(kernel_device)
    xh = huge_view(x, (1, HUGE, 3), tmp_path, "x")
    gh = huge_view(gy, (9, 3, HUGE), tmp_path, "gy")
    dw, db = lc_kernels.local_conv_grad_weight(gh, xh, *_geom(3))
    dw_ref, db_ref = reference.local_conv_grad_weight(gy.double(), x.double(), *_geom(3))
    torch.testing.assert_close(dw.double(), dw_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db.double(), db_ref, atol=1e-5, rtol=1e-5)


def test_local_conv_grad_weight_dy_position_offsets_past_int32(tmp_path, kernel_device):
    """dY already batch-contiguous (read in place, no copy) with position l at l · HUGE: the kernel's int64
    per-position base, int32 in-tile deltas."""
    x, _, gy = _local_conv_dense(kernel_device)
    gh = huge_view(gy, (1, 2, HUGE), tmp_path, "gy")
    assert gh.stride(0) == 1 and gh.stride(2) * 2 >= 2**31
    dw, db = lc_kernels.local_conv_grad_weight(gh, x, *_geom(3))
    dw_ref, db_ref = reference.local_conv_grad_weight(gy.double(), x.double(), *_geom(3))
    torch.testing.assert_close(dw.double(), dw_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db.double(), db_ref, atol=1e-5, rtol=1e-5)


def test_local_conv_grad_input_offsets_past_int32(tmp_path, kernel_device):
    """Patch row r of the weight at r · 2^28+ (row 8 past 2^31), and dY channel o at o · HUGE (the launcher
    copies such a dY C_out-contiguous: the copy must read it right)."""
    _, w, gy = _local_conv_dense(kernel_device)
    wh = huge_view(w, (3, 2**28 + 2**20, 1), tmp_path, "w")
    gh = huge_view(gy, (3, HUGE, 1), tmp_path, "gy")
    dx = lc_kernels.local_conv_grad_input(gh, wh, [5], *_geom(3))
    ref = reference.local_conv_grad_input(gy.double(), w.double(), [5], *_geom(3))
    torch.testing.assert_close(dx.double(), ref, atol=1e-5, rtol=1e-5)


def test_local_conv_grad_input_dy_position_offsets_past_int32(tmp_path, kernel_device):
    """dY already C_out-contiguous (read in place, no copy) with position l at l · HUGE: the kernel's int64
    per-(position, tap) base, int32 in-tile deltas."""
    _, w, gy = _local_conv_dense(kernel_device)
    gh = huge_view(gy, (3, 1, HUGE), tmp_path, "gy")
    assert gh.stride(1) == 1 and gh.stride(2) * 2 >= 2**31
    dx = lc_kernels.local_conv_grad_input(gh, w, [5], *_geom(3))
    ref = reference.local_conv_grad_input(gy.double(), w.double(), [5], *_geom(3))
    torch.testing.assert_close(dx.double(), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- bf16
BF16_CASES = [
    Case(2, 3, (5, 6), (3, 3), None, 1),
    Case(2, 2, (7, 6), (3, 2), (2, 2), 1, (2, 1)),
    Case(2, 3, (11,), (3,), None, 2, None, "reflect"),
    Case(2, 2, (3, 4, 4), (2, 2, 2), (1, 2, 1), 1),
]
BF16_IDS = [c.id for c in BF16_CASES]


def _args(case: Case) -> tuple:
    kw = case.kwargs()
    return list(case.kernel), list(kw["dilation"]), flat_padding(case), list(kw["stride"]), case.mode


def _bf16_problem(case: Case, device, c_out=3):
    """bf16 x, weight (module layout), per-pixel bias and dY, and the fp64 copies of the same values."""
    L = oracle_unfold(torch.zeros(1, 1, *case.size), case).shape[-1]
    R = case.c * math.prod(case.kernel)
    x = torch.randn(case.n, case.c, *case.size).bfloat16()
    w = (torch.randn(L, c_out, R) / math.sqrt(R)).bfloat16().permute(1, 2, 0)
    b = torch.randn(c_out, L).bfloat16()
    gy = torch.randn(case.n, c_out, L).bfloat16()
    bf16 = [t.to(device) for t in (x, w, b, gy)]
    return bf16, [t.double() for t in (x, w, b, gy)]


@pytest.mark.parametrize("case", BF16_CASES, ids=BF16_IDS)
def test_local_conv_bf16_launchers(case, kernel_device):
    """The three kernels in bf16 against fp64 on the same values. Under the interpreter bf16 must
    not reach tl.dot (it multiplies bit patterns: errors of ~1e10)."""
    (x, w, b, gy), (xd, wd, bd, gyd) = _bf16_problem(case, kernel_device)
    args = _args(case)
    y_ref = reference.local_conv(xd, wd, bd, *args)
    gy, gyd = gy.reshape(y_ref.shape), gyd.reshape(y_ref.shape)
    atol, rtol = TOL[torch.bfloat16]

    y = lc_kernels.local_conv(x, w, b, *args)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double().cpu(), y_ref, atol=atol, rtol=rtol)
    dx = lc_kernels.local_conv_grad_input(gy, w, list(case.size), *args)
    torch.testing.assert_close(dx.double().cpu(), reference.local_conv_grad_input(gyd, wd, list(case.size), *args),
                               atol=atol, rtol=rtol)
    dw, db = lc_kernels.local_conv_grad_weight(gy, x, *args)
    dw_ref, db_ref = reference.local_conv_grad_weight(gyd, xd, *args)
    torch.testing.assert_close(dw.double().cpu(), dw_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(db.double().cpu(), db_ref, atol=atol, rtol=rtol)
    assert dw.permute(2, 0, 1).is_contiguous()  # the fast layout, also through the interpreter's fp32 buffer


def test_local_conv_bf16_op_forward_backward(kernel_device):
    """Through torch.ops.convzoo.local_conv and autograd (both backward ops), bf16 on the kernel path."""
    case = BF16_CASES[1]
    (x, w, b, _), (xd, wd, bd, _) = _bf16_problem(case, kernel_device)
    kw = case.kwargs()
    inputs = [t.requires_grad_() for t in (x, w, b)]
    y = cf.local_conv(*inputs, **kw)
    gy = torch.randn(y.shape).bfloat16().to(kernel_device)
    grads = torch.autograd.grad(y, inputs, gy)
    ref_inputs = [t.requires_grad_() for t in (xd, wd, bd)]
    y_ref = reference.local_conv(*ref_inputs, *_args(case))
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, gy.double().cpu())
    atol, rtol = TOL[torch.bfloat16]
    torch.testing.assert_close(y.double().cpu(), y_ref.detach(), atol=atol, rtol=rtol)
    for name, g, g_ref in zip(("input", "weight", "bias"), grads, grads_ref):
        assert g.dtype == torch.bfloat16, name
        torch.testing.assert_close(g.double().cpu(), g_ref, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", BF16_CASES, ids=BF16_IDS)
def test_unfold_fold_bf16_exact(case, kernel_device):
    """unfold moves bf16 bits exactly; fold sums in fp32 and rounds once to nearest even. Entries are
    multiples of 1/64 below 4: sums are exact in fp32 but need more bits than bf16 has, so the result
    depends on the rounding (the interpreter's own fp32 → bf16 cast truncates)."""
    x = torch.randn(case.n, case.c, *case.size).bfloat16().to(kernel_device)
    cols = oracle_unfold(x.cpu(), case)
    torch.testing.assert_close(unfold_kernels.unfold(x, *_args(case)).cpu(), cols, atol=0, rtol=0)
    cols = (torch.randint(-255, 256, cols.shape) / 64).bfloat16()
    exact = reference.fold(cols.double(), list(case.size), *_args(case)).float()  # fp64 sums, exact in fp32
    expect = exact.bfloat16()  # rounded once, to nearest even
    truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).bfloat16()
    assert not torch.equal(expect, truncated), "no sum needs rounding: the test could not tell"
    out = unfold_kernels.fold(cols.to(kernel_device), list(case.size), *_args(case))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.cpu(), expect, atol=0, rtol=0)


def test_bf16_subnormals(kernel_device):
    """bf16 below 2^-126 (subnormal): the interpreter's own bf16 → fp32 cast gets them wrong, so the
    kernels widen bf16 by its bits there. fold sums k · 2^-133 exactly; local_conv multiplies
    subnormal inputs by weights near 2^120 into products of order 2^-7."""
    case = BF16_CASES[0]
    args = _args(case)
    cols = oracle_unfold(torch.zeros(case.n, case.c, *case.size), case)
    cols = (torch.randint(-127, 128, cols.shape) * 2.0**-133).bfloat16()
    assert cols.abs().max() < 2**-126 and cols.abs().max() > 0
    expect = reference.fold(cols.double(), list(case.size), *args).bfloat16()  # exact sums, rounded once
    out = unfold_kernels.fold(cols.to(kernel_device), list(case.size), *args)
    torch.testing.assert_close(out.cpu(), expect, atol=0, rtol=0)

    (x, w, b, _), _ = _bf16_problem(case, "cpu")
    x, w, b = (x.float() * 2.0**-127).bfloat16(), (w.float() * 2.0**120).bfloat16(), b * 2.0**-7
    assert (x.abs() < 2**-126).float().mean() > 0.5  # most entries subnormal
    y = lc_kernels.local_conv(x.to(kernel_device), w.to(kernel_device), b.to(kernel_device), *args)
    ref = reference.local_conv(x.double(), w.double(), b.double(), *args)
    atol, rtol = TOL[torch.bfloat16]
    torch.testing.assert_close(y.double().cpu(), ref, atol=atol * 2.0**-7, rtol=rtol)


# ---------------------------------------------------------------------------------------------- empty dims
# (id, N, C_in, C_out, spatial size, kernel, padding): L >= 1 always; an empty input dim needs padding
EMPTY = [
    ("N0", 0, 2, 3, (4, 5), (3, 3), 1),
    ("Cin0", 2, 0, 3, (4, 5), (3, 3), 1),
    ("Cout0", 2, 2, 0, (4, 5), (3, 3), 1),
    ("H0_padded", 2, 2, 3, (0, 5), (1, 3), 1),  # every patch entry is zero padding
]


def _empty_problem(spec, device):
    _, n, c, o, size, k, p = spec
    args = (list(k), [1, 1], [p] * 4, [1, 1], "zeros")
    out_size = [s + 2 * p - kk + 1 for s, kk in zip(size, k)]
    L, R = math.prod(out_size), c * math.prod(k)
    x = torch.randn(n, c, *size, dtype=torch.float64)
    w = torch.randn(o, R, L, dtype=torch.float64)
    b = torch.randn(o, L, dtype=torch.float64)
    gy = torch.randn(n, o, *out_size, dtype=torch.float64)
    cols = torch.randn(n, R, L, dtype=torch.float64)
    return [t.to(device) for t in (x, w, b, gy, cols)], args, out_size


def _patches(spec, x, out_size) -> torch.Tensor:
    """unfold(x) in fp64 from its definition: all zero padding, except for the C_out = 0 case."""
    _, n, c, _, size, k, _ = spec
    if spec[0] == "Cout0":  # the only case with entries that are not padding
        return oracle_unfold(x.cpu(), Case(n, c, size, k, None, 1))
    return torch.zeros(n, c * math.prod(k), math.prod(out_size), dtype=torch.float64)


@pytest.mark.parametrize("impl", ["kernels", "reference"])
@pytest.mark.parametrize("spec", EMPTY, ids=[e[0] for e in EMPTY])
def test_empty_dims(spec, impl, kernel_device):
    """Every launcher (and the plain-torch reference) on an empty dim: the right shape and the values
    of the definition (fp64 einsum over the patches; a sum over an empty dim is 0) — an empty batch
    gives dW = db = 0, C_in = 0 gives y = bias and db = Σ_n dY, C_out = 0 gives dx = 0 — never
    uninitialised memory."""
    device = kernel_device if impl == "kernels" else "cpu"
    (x, w, b, gy, cols), args, out_size = _empty_problem(spec, device)
    mod_unfold = unfold_kernels if impl == "kernels" else reference
    mod = lc_kernels if impl == "kernels" else reference
    n, o, size = x.shape[0], w.shape[0], list(x.shape[2:])
    patches = _patches(spec, x, out_size)
    gy3 = gy.cpu().reshape(n, o, math.prod(out_size))

    def same(got, want, what):
        assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        torch.testing.assert_close(got.cpu(), want, atol=1e-12, rtol=1e-12, msg=lambda m: f"{what}: {m}")

    same(mod_unfold.unfold(x, *args), patches, "unfold")
    folded = mod_unfold.fold(cols, size, *args)
    assert tuple(folded.shape) == tuple(x.shape), "fold"
    if folded.numel():  # only Cout0, where fold is a plain problem
        same(folded, oracle_fold(cols.cpu(), Case(n, x.shape[1], tuple(size), spec[5], None, 1)), "fold")
    xw = torch.einsum("nrl,orl->nol", patches, w.cpu())
    for bias, add in ((b, b.cpu()), (b[:, 0], b.cpu()[:, :1]), (None, 0)):
        same(mod.local_conv(x, w, bias, *args), (xw + add).reshape(n, o, *out_size),
             f"local_conv, bias {None if bias is None else tuple(bias.shape)}")
    dw, db = mod.local_conv_grad_weight(gy, x, *args)
    same(dw, torch.einsum("nol,nrl->orl", gy3, patches), "grad_weight")
    same(db, gy3.sum(0), "grad_bias")
    dx = mod.local_conv_grad_input(gy, w, size, *args)
    dcols = torch.einsum("nol,orl->nrl", gy3, w.cpu())
    assert tuple(dx.shape) == tuple(x.shape), "grad_input"
    if dx.numel():  # Cout0: dcols is all zeros, so is dx
        assert not dcols.any()
        same(dx, torch.zeros_like(x.cpu()), "grad_input")


@pytest.mark.parametrize("call", ["unfold", "local_conv", "local_conv_grad_weight"])
def test_replicate_padding_of_an_empty_dim_is_refused(call, kernel_device):
    """'replicate' of an empty dim has nothing to replicate; the kernels would read index -1."""
    x = torch.randn(2, 2, 0, device=kernel_device)
    args = _geom(1, 1, "replicate")  # L = 2 from padding alone
    fn = {"unfold": lambda: unfold_kernels.unfold(x, *args),
          "local_conv": lambda: lc_kernels.local_conv(x, torch.randn(3, 2, 2, device=kernel_device), None, *args),
          "local_conv_grad_weight": lambda: lc_kernels.local_conv_grad_weight(
              torch.randn(2, 3, 2, device=kernel_device), x, *args)}[call]
    with pytest.raises(ValueError, match="replicate"):
        fn()


# ---------------------------------------------------------------------------------------------- device
@pytest.mark.gpu
def test_launches_on_the_inputs_device():
    """Triton launches on the current CUDA device; the launchers make it the input's."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    x = torch.randn(2, 3, 5, 6, device="cuda:1")
    w = torch.randn(4, 27, 12, device="cuda:1")
    args = ([3, 3], [1, 1], [0, 0, 0, 0], [1, 1], "zeros")
    with torch.cuda.device(0):
        cols = unfold_kernels.unfold(x, *args)
        y = lc_kernels.local_conv(x, w, None, *args)
    torch.testing.assert_close(cols.cpu(), reference.unfold(x.cpu(), *args), atol=0, rtol=0)
    torch.testing.assert_close(y.cpu(), reference.local_conv(x.cpu(), w.cpu(), None, *args), atol=1e-4, rtol=1e-4)


def test_unfold_transpose_channel_offset_past_int32(tmp_path, kernel_device):
    """unfold_transpose reads channel c of x at c · stride_xc: past 2^31 from c = 1 on."""
    from convzoo.kernels import unfold_transpose as ut_kernels

    dense = torch.randn(2, 3, 5, device=kernel_device)
    x = huge_view(dense, (1, HUGE, 3), tmp_path, "x")  # channel c at c · HUGE
    geom = ([3], [2], [1], [1], [1])  # kernel, stride, padding, output_padding, dilation
    out = ut_kernels.unfold_transpose(x, *geom)
    torch.testing.assert_close(out, reference.unfold_transpose(dense.cpu(), *geom).to(out.device), atol=0, rtol=0)


def test_unfold_transpose_backward_tap_offset_past_int32(tmp_path, kernel_device):
    """The adjoint reads tap t of a column at t · stride_ck: past 2^31 from t = 1 on."""
    from convzoo.kernels import unfold_transpose as ut_kernels

    geom = ([3], [2], [1], [1], [1])
    out_size = 10  # (5 - 1)·2 - 2·1 + (3 - 1) + 1 + 1
    dense = torch.randint(-8, 9, (2, 3, out_size)).float().to(kernel_device)  # N = 2, C = 1, K = 3
    cols = huge_view(dense, (out_size, HUGE, 1), tmp_path, "cols")  # tap t at t · HUGE
    out = ut_kernels.unfold_transpose_backward(cols, [5], *geom)
    want = reference.unfold_transpose_backward(dense.cpu(), [5], *geom).to(out.device)
    torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_patch_covariance_channel_offset_past_int32(tmp_path, kernel_device):
    """patch_covariance gathers channel c of group g at (g·C/G + c) · stride_xc: past 2^31 from the second
    channel on, in both operand tiles of the symmetric product."""
    from convzoo.kernels import patch_covariance as pc_kernels

    dense = torch.randint(-4, 5, (2, 4, 5)).float().to(kernel_device)  # integers: exact sums in fp32
    x = huge_view(dense, (1, HUGE, 4), tmp_path, "x")  # channel c at c · HUGE
    geom = ([3], [2], [1, 1], [0], [1], "zeros")  # kernel, stride, padding, output_padding, dilation, mode
    out = pc_kernels.patch_covariance(x, *geom, 2, False, True)
    want = reference.patch_covariance(dense.cpu(), *geom, 2, False, True).to(out.device)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
def test_patch_covariance_position_and_sample_offsets_past_int32(tmp_path, kernel_device):
    """Channels-last input (channel stride 1: the kernel reads it in place, no copy): position l at l · HUGE and
    sample n at n · HUGE · 8, past 2^31 in the per-tap offsets and in the hot loop's sample increments."""
    from convzoo.kernels import patch_covariance as pc_kernels

    dense = torch.randint(-4, 5, (2, 4, 5)).float().to(kernel_device)  # integers: exact sums in fp32
    x = huge_view(dense, (8 * HUGE, 1, HUGE), tmp_path, "x")
    geom = ([3], [1], [1, 1], [0], [1], "reflect")  # kernel, stride, padding, output_padding, dilation, mode
    for groups in (1, 2):
        out = pc_kernels.patch_covariance(x, *geom, groups, False, True)
        want = reference.patch_covariance(dense.cpu(), *geom, groups, False, True).to(out.device)
        torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_extract_patches_group_offset_past_int32(tmp_path, kernel_device):
    """extract_patches reads group g's channel c of x at (g·C/groups + c) · stride_xc: past 2^31 from the
    second channel on, through the in-kernel group loop (g · C/groups · stride_xc) and the channel offset."""
    from convzoo.kernels import patches as patches_kernels

    dense = torch.randint(-8, 9, (2, 4, 5)).float().to(kernel_device)  # N = 2, C = 4, L = 5
    x = huge_view(dense, (1, HUGE, 2), tmp_path, "x")  # channel c at c · HUGE
    for groups in (1, 2):
        args = (*_geom(3, 1, "circular"), groups)
        out = patches_kernels.extract_patches(x, *args)
        # integer values: the group sum and its halving are exact, so the comparison is too
        want = reference.extract_patches(dense.cpu(), *args).to(out.device)
        torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_masked_conv_offsets_past_int32(tmp_path, kernel_device):
    """masked_conv gathers channel c of group g at (g·C/G + c) · stride_xc and reads output channel o's weight
    row at o · stride_wo: both past 2^31 from the second on (x's channel stride and the weight's C_out stride
    huge; the weight's [C_out, K] view keeps its stride, no copy)."""
    from convzoo.kernels import masked_conv as mc_kernels

    x = torch.randint(-4, 5, (2, 4, 5)).float().to(kernel_device)  # integers: exact sums in fp32
    w = torch.randint(-4, 5, (4, 2, 3)).float().to(kernel_device)  # groups 2: C_in/G = 2, K = 6
    b = torch.randn(4, device=kernel_device)
    xh = huge_view(x, (1, HUGE, 4), tmp_path, "x")  # channel c at c · HUGE
    wh = huge_view(w, (HUGE, 3, 1), tmp_path, "w")  # output channel o at o · HUGE
    count = torch.ones(2, 1, dtype=torch.int32, device=kernel_device)  # every group: its one k-tile
    index = torch.zeros(2, 1, 1, dtype=torch.int32, device=kernel_device)
    y = mc_kernels.masked_conv(xh, wh, count, index, b, [3], [1], [1, 1], [1], "zeros", 2, (16, 16))
    want = torch.nn.functional.conv1d(x.double(), w.double(), b.double(), 1, 1, 1, 2)
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)


def test_masked_conv_tap_walk_offsets_past_int32(tmp_path, kernel_device):
    """The tap walk (C_in/G = 16): channels-last x whose position l sits at l · HUGE (its int64 position base),
    and a 1 × 1 weight whose input channel c sits at c · HUGE, so the weight's in-loop delta (SUB - 1) · stride
    is past 2^31 (the kernel's int64 deltas, not NARROW's int32 ones)."""
    from convzoo.kernels import masked_conv as mc_kernels

    x = torch.randint(-4, 5, (1, 16, 5)).float().to(kernel_device)  # integers: exact sums in fp32
    xh = huge_view(x, (16, 1, HUGE), tmp_path, "x")  # channels-last: read in place, not copied
    count = torch.ones(1, 1, dtype=torch.int32, device=kernel_device)
    index = torch.zeros(1, 1, 1, dtype=torch.int32, device=kernel_device)
    w = torch.randint(-4, 5, (4, 16, 1)).float().to(kernel_device)
    wh = huge_view(w, (1, HUGE, 1), tmp_path, "w")
    assert not mc_kernels._tap_tile(16, 16, 1, HUGE)["NARROW"]
    y = mc_kernels.masked_conv(xh, wh, count, index, None, [1], [1], [0, 0], [1], "zeros", 1, (16, 16))
    want = torch.nn.functional.conv1d(x.double(), w.double())
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    w3 = torch.randint(-4, 5, (4, 16, 3)).float().to(kernel_device)
    count, index = mc_kernels.dense_tile_lists(w3, 1, (16, 16))
    y = mc_kernels.masked_conv(xh, huge_view(w3, (HUGE, 1, 16), tmp_path, "w3"), count, index, None, [3], [1],
                               [1, 1], [1], "zeros", 1, (16, 16))
    want = torch.nn.functional.conv1d(x.double(), w3.double(), None, 1, 1)
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)


def test_masked_conv_grad_input_offsets_past_int32(tmp_path, kernel_device):
    """masked_conv's input gradient: channels-last dY whose output position l sits at l · HUGE (read in place:
    the int64 position base), and a channels-last weight whose output channel o sits at o · HUGE (its [C_out, K]
    view keeps the stride, so the in-loop weight offsets are int64, not NARROW's int32)."""
    from convzoo.kernels import masked_conv as mc_kernels

    gy = torch.randint(-4, 5, (1, 16, 5)).float().to(kernel_device)  # integers: exact sums in fp32
    w = torch.randint(-4, 5, (16, 4, 3)).float().to(kernel_device)
    gh = huge_view(gy, (16, 1, HUGE), tmp_path, "gy")
    wh = huge_view(w, (HUGE, 1, 4), tmp_path, "w")
    assert wh.movedim(1, -1).reshape(16, 12).stride() == (HUGE, 1)
    count, index = mc_kernels.dense_grad_input_lists(w, 1, (16, 16))
    dx = mc_kernels.masked_conv_grad_input(gh, wh, count, index, [5], [3], [1], [1, 1], [1], "zeros", 1, (16, 16))
    want = torch.nn.grad.conv1d_input([1, 4, 5], w.double(), gy.double(), 1, 1)
    torch.testing.assert_close(dx.double(), want, atol=1e-5, rtol=1e-5)


def test_masked_conv_grad_weight_tap_walk_offsets_past_int32(tmp_path, kernel_device):
    """masked_conv's weight gradient through the tap walk (C_in/G = 16): channels-last x and dY whose output
    position l sits at l · HUGE (read in place: no OFF32, the int64 position offsets), 3 taps with padding, one
    share and two."""
    from convzoo.autotune import Config
    from convzoo.kernels import masked_conv as mc_kernels

    x = torch.randint(-4, 5, (1, 16, 5)).float().to(kernel_device)  # integers: exact sums in fp32
    dy = torch.randint(-4, 5, (1, 8, 5)).float().to(kernel_device)
    xh = huge_view(x, (16, 1, HUGE), tmp_path, "x")  # channels-last: read in place, not copied
    dyh = huge_view(dy, (8, 1, HUGE), tmp_path, "dy")
    g = mc_kernels._shapes.unfold_geometry(xh, [3], [1], [1, 1], [1], "zeros")
    assert mc_kernels._tap_tile(16, 16)["SUB"] == 16 and not mc_kernels._gw_off32(xh, dyh, g, 8, 16)
    mask = torch.ones(8, 16, 3, dtype=torch.bool, device=kernel_device)
    count, index = mc_kernels.dense_tile_lists(mask, 1, (16, 16))
    want = torch.nn.grad.conv1d_weight(x.double(), [8, 16, 3], dy.double(), 1, 1)
    for split in (1, 2):
        cfg = Config({"BLOCK_M": 16, "SPLIT": split}, num_warps=4, num_stages=1)
        dw = mc_kernels.masked_conv_grad_weight(dyh, xh, mask, count, index, [8, 16, 3], [3], [1], [1, 1], [1],
                                                "zeros", 1, (16, 16), config=cfg)
        torch.testing.assert_close(dw.double(), want, atol=0, rtol=0)
