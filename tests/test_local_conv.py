"""Locally connected convolution: numerics (fwd + bwd) against hypnettorch's formula in float64, weight
layouts, tiles, the modules, and memory. Ops-level checks (opcheck, compile, gradcheck, bad input)
are in test_local_conv_ops.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from problems import TOL, Case, flat_padding, oracle_unfold

import convzoo
import convzoo.functional as cf
import convzoo.kernels.local_conv as kernels  # decorate the kernels while TRITON_INTERPRET is set
from convzoo.autotune import Config
from convzoo.tools.bench.memory import peak_bytes

C_OUT = 3
CASES = [
    Case(2, 3, (5, 6), (3, 3), None, 1),
    Case(2, 2, (7, 6), (3, 2), (2, 2), 1, (2, 1)),  # stride + dilation
    Case(1, 1, (4, 5), (1, 1)),  # 1x1
    Case(2, 2, (7, 8), (2, 2), (3, 4)),  # stride > kernel
    Case(2, 2, (5, 7), (2, 3), (2, 2), "same"),  # strided 'same', even kernel
    Case(2, 2, (5, 6), (3, 2), None, ((1, 0), (2, 1))),  # asymmetric padding pairs
    Case(2, 2, (5, 5), (3, 3), None, (2, 1), None, "reflect"),
    Case(2, 3, (11,), (3,)),  # 1-d
    Case(2, 2, (9,), (2,), (1,), "same", (3,), "circular"),
    Case(2, 2, (3, 4, 4), (2, 2, 2), (1, 2, 1), 1),  # 3-d
    Case(1, 2, (2, 3, 4), (2, 1, 2), None, 1, None, "replicate"),
]
IDS = [c.id for c in CASES]
HALF_CASES = [CASES[0], CASES[1], CASES[7], CASES[9]]  # 2-d, strided + dilated, 1-d, 3-d


def out_dims(case: Case) -> tuple:
    """The output grid, restated independently of convzoo._shapes."""
    flat = flat_padding(case)
    dil, st = case.dilation or (1,) * case.ndim, case.stride or (1,) * case.ndim
    return tuple((n + flat[2 * i] + flat[2 * i + 1] - d * (k - 1) - 1) // s + 1
                 for i, (n, k, d, s) in enumerate(zip(case.size, case.kernel, dil, st)))


def make_params(case: Case, dtype, device, bias="pixel", layout="module", c_out=C_OUT):
    """Weight ``[C_out, C·∏K, L]`` in the given physical layout (same values for every layout) and bias."""
    R, L = case.c * math.prod(case.kernel), math.prod(out_dims(case))
    w = torch.randn(c_out, R, L, dtype=dtype) / math.sqrt(R)
    if layout == "module":  # physically [L, C_out, R]
        w = w.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    elif layout == "strided":  # every other position of a twice-as-long buffer: not dense
        wide = torch.zeros(c_out, R, 2 * L, dtype=dtype)
        wide[..., ::2] = w
        w = wide[..., ::2]
    elif layout != "hypnettorch":  # contiguous [C_out, R, L]
        raise ValueError(layout)
    b = {"pixel": torch.randn(c_out, L, dtype=dtype), "channel": torch.randn(c_out, dtype=dtype), None: None}[bias]
    return w.to(device), (None if b is None else b.to(device))


def oracle(x, w, b, case: Case):
    """hypnettorch's formula in float64: einsum('nkl,okl->nol', unfold(x), W) + bias (F.pad + F.unfold/unfoldNd)."""
    cols = oracle_unfold(x.double(), case)
    y = torch.einsum("nkl,okl->nol", cols, w.double())
    if b is not None:
        y = y + (b.double() if b.dim() == 2 else b.double()[:, None])
    return y.reshape(x.shape[0], w.shape[0], *out_dims(case))


def fwd_bwd(fn, x, w, b, gy=None):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    inputs = [x, w] + ([] if b is None else [b.detach().requires_grad_()])
    y = fn(*inputs) if b is not None else fn(x, w, None)
    if gy is None:
        gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, gy)
    return y, grads, gy


def check_against_oracle(case, x, w, b, dtype, **tol):
    atol, rtol = tol.get("tol", TOL[dtype])
    y, grads, gy = fwd_bwd(lambda x, w, b: cf.local_conv(x, w, b, **case.kwargs()), x, w, b)
    y_ref, grads_ref, _ = fwd_bwd(lambda x, w, b: oracle(x, w, b, case), x.cpu().double(), w.cpu().double(),
                                  None if b is None else b.cpu().double(), gy.cpu().double())
    assert y.shape == y_ref.shape and y.dtype == dtype and y.is_contiguous()
    torch.testing.assert_close(y.cpu().double(), y_ref, atol=atol, rtol=rtol)
    for name, g, g_ref in zip(("input", "weight", "bias"), grads, grads_ref):
        assert g.shape == g_ref.shape, name
        torch.testing.assert_close(g.cpu().double(), g_ref, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_hypnettorch_formula_fp32(case, path):
    x = torch.randn(case.n, case.c, *case.size, device=path)
    w, b = make_params(case, torch.float32, path)
    check_against_oracle(case, x, w, b, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)],
                         ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", HALF_CASES, ids=[c.id for c in HALF_CASES])
def test_matches_hypnettorch_formula_half(case, dtype, path):
    if dtype == torch.bfloat16 and path == "cpu":
        pytest.skip("bf16 tl.dot runs on a GPU only; the CPU torch path is covered by float16")
    x = torch.randn(case.n, case.c, *case.size, device=path).to(dtype)
    w, b = make_params(case, dtype, path)
    check_against_oracle(case, x, w, b, dtype)


@pytest.mark.parametrize("layout", ["module", "hypnettorch", "strided"])
@pytest.mark.parametrize("bias", ["pixel", "channel", None], ids=["bias_pixel", "bias_channel", "no_bias"])
def test_bias_kinds_and_weight_layouts(bias, layout, path):
    case = CASES[1]
    x = torch.randn(case.n, case.c, *case.size, device=path)
    w, b = make_params(case, torch.float32, path, bias=bias, layout=layout)
    check_against_oracle(case, x, w, b, torch.float32)


@pytest.mark.parametrize("bias", ["pixel", "channel"], ids=["bias_pixel", "bias_channel"])
def test_frozen_weight_bias_gradient(bias, path):
    """Only the bias trains: its gradient is the batch (and, per channel, position) sum of dY."""
    case = CASES[1]
    x = torch.randn(case.n, case.c, *case.size, device=path)
    w, b = make_params(case, torch.float32, path, bias=bias)
    b.requires_grad_()
    y = cf.local_conv(x, w, b, **case.kwargs())
    gy = torch.randn_like(y)
    (db,) = torch.autograd.grad(y, b, gy)
    ref = gy.double().flatten(2).sum(0)
    torch.testing.assert_close(db.double(), ref if b.dim() == 2 else ref.sum(1), atol=1e-5, rtol=1e-6)


def test_channels_last_input(path):
    case = CASES[0]
    x = torch.randn(case.n, case.c, *case.size, device=path).to(memory_format=torch.channels_last)
    w, b = make_params(case, torch.float32, path)
    check_against_oracle(case, x, w, b, torch.float32)


def test_many_partial_tiles(kernel_device):
    """Small forced tiles: several programs along every dim, and partial tiles at every edge."""
    case = Case(17, 17, (3, 4), (2, 2))  # R = 68: five R tiles of 16; N, C, C_out: two tiles each
    x = torch.randn(case.n, case.c, *case.size, device=kernel_device)
    w, b = make_params(case, torch.float32, kernel_device, c_out=17)
    geom = (list(case.kernel), [1, 1], [0, 0, 0, 0], [1, 1], "zeros")
    y = kernels.local_conv(x, w, b, *geom, config=Config({"BLOCK_N": 16, "BLOCK_O": 16, "BLOCK_R": 16}, 4, 1))
    torch.testing.assert_close(y.cpu().double(), oracle(x.cpu(), w.cpu(), b.cpu(), case), atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(y)
    dx = kernels.local_conv_grad_input(gy, w, list(case.size), *geom,
                                       config=Config({"BLOCK_N": 16, "BLOCK_C": 16, "BLOCK_O": 16}, 4, 1))
    dw, db = kernels.local_conv_grad_weight(gy, x, *geom,
                                            config=Config({"BLOCK_O": 16, "BLOCK_R": 16, "BLOCK_N": 16}, 4, 1))
    _, (dx_ref, dw_ref, db_ref), _ = fwd_bwd(lambda x, w, b: oracle(x, w, b, case), x.cpu().double(),
                                             w.cpu().double(), b.cpu().double(), gy.cpu().double())
    for got, ref in ((dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        torch.testing.assert_close(got.cpu().double(), ref, atol=1e-5, rtol=1e-5)


FWD_PATHS = [  # the forward's loop paths (the kernel docstring's hot loop), with batches the launcher copies batch-last
    (Case(17, 3, (5, 6), (3, 3), None, 1), True),  # an odd batch (no alignment), R = 27: a partial last R block
    (Case(32, 2, (6, 5), (3, 2), (2, 1), 1, (1, 2)), True),  # stride + dilation, 16-byte rows
    (Case(8, 2, (3, 4, 4), (2, 2, 2), (1, 2, 1), 1), True),  # 3-d
    (Case(8, 2, (5, 5), (3, 3), None, (2, 1), None, "reflect"), False),  # rows computed in the kernel
    (Case(8, 2, (9,), (2,), (1,), "same", (3,), "circular"), False),
    (Case(8, 1, (4, 11), (3, 11), None, 1), False),  # 33 taps: past the validity bits, bounds per row
]


@pytest.mark.parametrize("tiles", [(16, 16, 16), (32, 16, 16), (16, 32, 32)], ids=["c_out_major", "batch_major",
                                                                                  "wide_r"])
@pytest.mark.parametrize("case, table", FWD_PATHS, ids=[c.id for c, _ in FWD_PATHS])
def test_forward_loop_paths(case, table, tiles, kernel_device):
    """The forward's paths: x copied batch-last (batches of ≥ 16 bytes), the row table ('zeros', ≤ 31 taps) or the
    rows computed in the kernel, the batch or the C_out tile as the MMA's M (``_n_major``), full and partial R
    blocks, clamped C_out rows (17 channels in tiles of 16 or 32)."""
    bn, bo, br = tiles
    x = torch.randn(case.n, case.c, *case.size, device=kernel_device)
    w, b = make_params(case, torch.float32, kernel_device, c_out=17)
    geom = (list(case.kernel), list(case.dilation or (1,) * case.ndim), flat_padding(case),
            list(case.stride or (1,) * case.ndim), case.mode)
    before = kernels._cached_row_table.cache_info()
    y = kernels.local_conv(x, w, b, *geom, config=Config({"BLOCK_N": bn, "BLOCK_O": bo, "BLOCK_R": br}, 4, 1))
    after = kernels._cached_row_table.cache_info()
    assert (after.hits + after.misses > before.hits + before.misses) == table
    torch.testing.assert_close(y.cpu().double(), oracle(x.cpu(), w.cpu(), b.cpu(), case), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tiles", [(16, 16, 16), (16, 32, 16), (32, 64, 32)], ids=["c_out_major", "r_major",
                                                                                  "r_major_wide"])
def test_grad_weight_orientations(tiles, kernel_device):
    """grad-weight with x copied batch-last (17 samples: a partial batch block): the C_out tile or (a C_out tile
    below 64 rows and a larger R tile, ``_r_major``) the R tile as the MMA's M, partial tiles on every dim."""
    bo, br, bn = tiles
    case = Case(17, 3, (5, 6), (3, 3), None, 1)
    x = torch.randn(case.n, case.c, *case.size, device=kernel_device)
    w, b = make_params(case, torch.float32, kernel_device, c_out=17)
    gy = torch.randn(case.n, 17, *out_dims(case), device=kernel_device)
    geom = (list(case.kernel), [1, 1], flat_padding(case), [1, 1], "zeros")
    assert kernels._r_major({"BLOCK_O": bo, "BLOCK_R": br}) == (br > bo)
    dw, db = kernels.local_conv_grad_weight(gy, x, *geom, config=Config({"BLOCK_O": bo, "BLOCK_R": br,
                                                                         "BLOCK_N": bn}, 4, 1))
    _, (_, dw_ref, db_ref), _ = fwd_bwd(lambda x, w, b: oracle(x, w, b, case), x.cpu().double(), w.cpu().double(),
                                        b.cpu().double(), gy.cpu().double())
    torch.testing.assert_close(dw.cpu().double(), dw_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db.cpu().double(), db_ref, atol=1e-5, rtol=1e-5)


def test_row_table():
    """The row table against its definition: row r = (c, kh, kw) holds tap kh·KW + kw and the offset of its input
    element from the window corner; rows past R (to a multiple of 128) hold tap 31 and offset 0."""
    strides = (1000, 0, 37, 5)  # channel, depth (a unit dim), height, width
    t = kernels._build_row_table(2 * 3 * 2, (1, 3, 2), (1, 2, 3), strides, torch.device("cpu"))
    assert t.shape == (128,) and t.dtype == torch.int64
    for r in range(12):
        c, k = divmod(r, 6)
        kh, kw = divmod(k, 2)
        assert int(t[r]) >> 32 == k and int(t[r]) & 0xFFFFFFFF == c * 1000 + kh * 2 * 37 + kw * 3 * 5, r
    assert (t[12:] >> 32 == 31).all() and (t[12:] & 0xFFFFFFFF == 0).all()


def test_grad_weight_layout_is_position_major(path):
    """dW comes back as the [C_out, R, L] view of a contiguous [L, C_out, R] tensor, the layout of the
    module's parameter ``weight_by_position``, which receives it contiguous."""
    case = CASES[0]
    x = torch.randn(case.n, case.c, *case.size, device=path)
    w, b = make_params(case, torch.float32, path)
    w.requires_grad_()
    (dw,) = torch.autograd.grad(cf.local_conv(x, w, b, **case.kwargs()).sum(), w)
    assert dw.shape == w.shape and dw.permute(2, 0, 1).is_contiguous()
    m = convzoo.LocalConv2d(case.c, C_OUT, case.size, case.kernel, padding=1).to(path)
    m(x).sum().backward()
    assert m.weight_by_position.grad.shape == m.weight_by_position.shape
    assert m.weight_by_position.grad.is_contiguous()


# ---------------------------------------------------------------------------------------------- modules
@pytest.mark.parametrize("cls, size, kwargs", [
    (convzoo.LocalConv1d, (10,), dict(kernel_size=3, stride=2, padding=1)),
    (convzoo.LocalConv2d, (6, 7), dict(kernel_size=(3, 2), padding="same", dilation=(1, 2))),
    (convzoo.LocalConv3d, (3, 4, 4), dict(kernel_size=2, padding=((1, 0), (0, 1), (1, 1)), padding_mode="replicate")),
], ids=["1d", "2d", "3d"])
def test_module_matches_functional_and_shapes(cls, size, kwargs, path):
    m = cls(3, 5, size, **kwargs).to(path)
    x = torch.randn(2, 3, *size, device=path)
    y = m(x)
    assert y.shape == (2, 5, *m.out_size)
    assert m.weight.shape == (5, 3 * math.prod(m.kernel_size), m.num_positions) == tuple(m.param_shapes[0])
    assert m.bias.shape == (5, m.num_positions) == tuple(m.param_shapes[1])
    ref = cf.local_conv(x, m.weight, m.bias, kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                        dilation=m.dilation, padding_mode=m.padding_mode)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    # nn.Conv2d's initialisation bound, 1/sqrt(fan_in), for weight and bias
    bound = 1 / math.sqrt(m.weight.shape[1])
    for p in (m.weight, m.bias):
        assert p.abs().max() <= bound and p.abs().max() > bound / 2 and p.std() > bound / 4


def test_module_equals_hypnettorch_style_layer():
    """The peer's own forward (F.unfold, broadcast multiply, sum over dim 2), with our parameters."""
    m = convzoo.LocalConv2d(3, 4, (7, 6), 3, stride=2, padding=1)
    x = torch.randn(5, 3, 7, 6)
    f_hat = F.unfold(x, 3, padding=1, stride=2).view(-1, 1, 27, m.num_positions)
    ref = ((f_hat * m.weight).sum(dim=2) + m.bias).view(-1, 4, *m.out_size)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


def test_external_weights_and_no_weights_layer(path):
    m = convzoo.LocalConv2d(2, 3, (5, 5), 3, no_weights=True).to(path)
    assert list(m.parameters()) == [] and m.weight is None and "no_weights=True" in repr(m)
    x = torch.randn(2, 2, 5, 5, device=path)
    w, b = make_params(Case(2, 2, (5, 5), (3, 3)), torch.float32, path, layout="hypnettorch")
    torch.testing.assert_close(m(x, w, b), cf.local_conv(x, w, b, kernel_size=3), atol=0, rtol=0)
    with pytest.raises(ValueError, match="no_weights"):
        m(x)
    with pytest.raises(ValueError, match="bias"):
        m(x, w)
    # a layer with its own parameters also takes external ones, e.g. from a hypernetwork
    m2 = convzoo.LocalConv2d(2, 3, (5, 5), 3, bias=False).to(path)
    torch.testing.assert_close(m2(x, w), cf.local_conv(x, w, None, kernel_size=3), atol=0, rtol=0)
    with pytest.raises(ValueError, match="bias=False"):
        m2(x, w, b)


def test_autocast_computes_in_the_autocast_dtype():
    """CPU autocast (bf16): parameters and input are cast as for nn.Conv2d; gradients reach fp32 params."""
    m = convzoo.LocalConv2d(3, 4, (6, 5), 3, padding=1)
    x = torch.randn(2, 3, 6, 5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and m.weight_by_position.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), m(x).detach(), atol=5e-2, rtol=2e-2)  # bf16 rounding of the inputs


@pytest.mark.gpu
def test_autocast_cuda_float16():
    m = convzoo.LocalConv2d(3, 4, (6, 5), 3, padding=1).cuda()
    x = torch.randn(2, 3, 6, 5, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        y = m(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), m(x).detach(), atol=1e-2, rtol=1e-2)


def test_state_dict_round_trip_keeps_values_and_layout():
    m = convzoo.LocalConv2d(2, 3, (5, 6), 3, padding=1)
    m2 = convzoo.LocalConv2d(2, 3, (5, 6), 3, padding=1)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(2, 2, 5, 6)
    torch.testing.assert_close(m2(x), m(x), atol=0, rtol=0)
    assert m2.weight.stride() == m.weight.stride() and m2.weight.permute(2, 0, 1).is_contiguous()
    assert "2, 3, in_size=(5, 6), kernel_size=(3, 3)" in repr(m2) and "out_size=(5, 6)" in repr(m2)


@pytest.mark.parametrize("call, exc, match", [
    (lambda m: m(torch.randn(2, 4, 5, 6)), ValueError, "in_channels"),
    (lambda m: m(torch.randn(2, 2, 5, 7)), ValueError, "in_size"),
    (lambda m: m(torch.randn(2, 30)), ValueError, "spatial dims"),  # [C, H, W] would be an unbatched call
    (lambda m: m(torch.randn(4, 5, 6)), ValueError, "in_channels"),  # unbatched, wrong channels
    (lambda m: convzoo.LocalConv2d(2, 3, (5, 6), 7), ValueError, "kernel_size"),
    (lambda m: convzoo.LocalConv2d(0, 3, (5, 6), 3), ValueError, "in_channels"),
    (lambda m: convzoo.LocalConv2d(2, 3.0, (5, 6), 3), TypeError, "out_channels"),
    (lambda m: convzoo.LocalConv2d(2, 3, (5, 6, 7), 3), ValueError, "in_size"),
    (lambda m: convzoo.LocalConv1d(2, 3, 8, 3, padding=9, padding_mode="reflect"), ValueError, "reflect"),
], ids=lambda v: None)
def test_module_bad_input(call, exc, match):
    m = convzoo.LocalConv2d(2, 3, (5, 6), 3)
    with pytest.raises(exc, match=match):
        call(m)


# ---------------------------------------------------------------------------------------------- memory
def test_memory_is_linear_in_weight_input_output(path):
    """Forward + backward allocate O(W + x + y) on the kernels, O(W + x + y + unfold) on the torch
    path — never the [N, C_out, C_in·∏K, L] broadcast of hypnettorch. The shape makes the patch
    matrix 16× the weight, so a materialised patch matrix or broadcast would show."""
    n, c, o, size, k = 64, 4, 4, (12, 12), 5  # x well below the patch matrix: the kernels copy x batch-last
    x = torch.randn(n, c, *size, device=path)
    w = torch.randn(o, c * k * k, 64, device=path, requires_grad=True)
    e = x.element_size()
    cols_bytes = n * c * k * k * 64 * e
    broadcast_bytes = o * cols_bytes
    linear_bytes = (w.numel() + x.numel() + n * o * 64) * e

    def ours():
        y = cf.local_conv(x, w, None, kernel_size=k)
        torch.autograd.grad(y, w, torch.ones_like(y))

    def peer():  # hypnettorch LocalConv2dLayer.forward
        f_hat = F.unfold(x, k).view(n, 1, c * k * k, 64)
        y = (f_hat * w).sum(dim=2)
        torch.autograd.grad(y, w, torch.ones_like(y))

    assert peak_bytes(peer, path) >= broadcast_bytes  # the meter sees temporaries
    peak = peak_bytes(ours, path)
    if path == "cpu" and not kernels.autotune.interpret_mode():  # plain-torch path: one unfold allowed
        assert peak <= linear_bytes + 1.5 * cols_bytes and peak < broadcast_bytes / 2
    else:  # the batch-last copies of x, and under the interpreter its host copy of each launch's tensors
        assert peak <= 2.5 * linear_bytes and peak < cols_bytes / 2
