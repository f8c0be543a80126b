"""The benched ops: their shapes (tiny / quick / full / overhead), rooflines and providers (convzoo and peers).

Peers are optional: a missing one drops its column, and :func:`missing_peers` says how to install it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import convzoo.functional as cf
from convzoo.autotune.grids import Layer
from convzoo.tools.bench.harness import Problem, Provider

try:
    import unfoldNd
except ImportError:  # a bench-only dependency
    unfoldNd = None
try:  # the KFAC peers, bench-only too
    from einconv.expressions import convNd_kfac_reduce, convNd_kfc
except ImportError:
    convNd_kfc = convNd_kfac_reduce = None
try:
    from curvlinops import KFACLinearOperator
    from curvlinops.kfac_utils import extract_averaged_patches, extract_patches
except ImportError:
    extract_patches = extract_averaged_patches = KFACLinearOperator = None


def _out(size, k, s, p):
    return tuple((n + 2 * p - k) // s + 1 for n in size)


def _label(n, c, size, k, s, p, c_out=None) -> str:
    """The shape as a reader wants it: ``N8 C64 32×32 k3 p1 s1`` (``C16→32`` when channels change)."""
    chans = f"C{c}" if c_out is None else f"C{c}→{c_out}"
    return f"N{n} {chans} {'×'.join(map(str, size))} k{k} p{p} s{s}"


def missing_peers() -> list[str]:
    """One line per peer that is not installed, saying what is dropped and how to install it."""
    out = []
    if unfoldNd is None:
        out.append("unfoldNd is not installed: its unfold/fold columns and the 1-d/3-d local-conv and "
                   "patch_covariance peers are dropped (pip install unfoldNd, or pip install 'convzoo[bench]')")
    if convNd_kfc is None:
        out.append("einconv is not installed: its patch_covariance column is dropped (pip install einconv)")
    if extract_patches is None:
        out.append("curvlinops is not installed: its patch_covariance and kfac columns are dropped "
                   "(pip install curvlinops-for-pytorch)")
    return out


# ---------------------------------------------------------------------------------------------- unfold / fold
def _unfold_problem(op, name, n, c, size, k, s, p, overhead=False) -> Problem:
    L = math.prod(_out(size, k, s, p))
    cols, x = n * c * k ** len(size) * L, n * c * math.prod(size)
    geom = dict(kernel_size=k, stride=s, padding=p)

    def make(device, dtype, requires_grad):
        x = torch.randn(n, c, *size, device=device, dtype=dtype)
        if op == "unfold":
            return (x.requires_grad_(requires_grad), geom)
        return (cf.unfold(x, **geom).requires_grad_(requires_grad), dict(geom, output_size=tuple(size)))

    # data movement: the columns written (read, for fold) plus the input read (written); bwd is the adjoint
    return Problem(op, name, len(size), make, lambda mode, e: (cols + x) * e * (2 if mode == "fwd+bwd" else 1),
                   label=_label(n, c, size, k, s, p), overhead=overhead)


def _unfold_providers(op: str) -> list[Provider]:
    """convzoo, torch's ``F.<op>`` (2-d; compiled too under ``--full``) and unfoldNd's ``<op>Nd``."""
    ours, torch_fn = getattr(cf, op), getattr(F, op)
    compiled = torch.compile(torch_fn, dynamic=False)
    provs = [Provider("convzoo", lambda t, a: ours(t, **a), overhead=True),
             Provider(f"F.{op}", lambda t, a: torch_fn(t, **a), ndims=(2,), overhead=True),
             Provider(f"compile(F.{op})", lambda t, a: compiled(t, **a), ndims=(2,), full_only=True)]
    if unfoldNd is not None:
        peer = getattr(unfoldNd, f"{op}Nd")
        provs.append(Provider("unfoldNd", lambda t, a: peer(t, **a)))
    return provs


# ---------------------------------------------------------------------------------------------- local conv
def _local_conv_problem(name, n, c, o, size, k, s, p, layout="module", overhead=False) -> Problem:
    """Inputs: x, the weight ``[C_out, R, L]``, a per-pixel bias, geometry. The weight is the user's
    tensor, in ``layout``: ``"module"``, physically ``[L, C_out, R]`` (what :class:`convzoo.LocalConv2d`
    holds), or ``"hypnettorch"``, contiguous ``[C_out, R, L]`` (what hypnettorch's ``LocalConv2dLayer``
    holds and a hypernetwork emits); convzoo and the functional peers take it as it is. The geometry
    also carries ``hypnettorch_weight``, the same values in hypnettorch's layout, for its provider."""
    if layout not in ("module", "hypnettorch"):
        raise ValueError(f"layout must be 'module' or 'hypnettorch', got {layout!r}")
    out = _out(size, k, s, p)
    L, R = math.prod(out), c * k ** len(size)
    W, X, Y = o * R * L, n * c * math.prod(size), n * o * L
    geom = dict(kernel_size=k, stride=s, padding=p, out=out)

    def make(device, dtype, requires_grad):
        x = torch.randn(n, c, *size, device=device, dtype=dtype)
        if layout == "module":
            w = (torch.randn(L, o, R, device=device, dtype=dtype) / math.sqrt(R)).permute(1, 2, 0)
        else:
            w = torch.randn(o, R, L, device=device, dtype=dtype) / math.sqrt(R)
        b = torch.randn(o, L, device=device, dtype=dtype)
        x, w, b = (t.requires_grad_(requires_grad) for t in (x, w, b))
        # hypnettorch's layer only ever holds its own layout, on which its broadcast runs ~2x faster
        # (CPU) than on the module's: copy to it here, outside the timed call. The copy's backward
        # hands the gradient to w unchanged, so fwd+bwd still differentiates w, at no extra cost.
        return x, w, b, dict(geom, hypnettorch_weight=w.contiguous())

    def nbytes(mode, e):  # fwd: read W, x, write y; bwd: read W, dy (twice), x, write dx, dW
        return e * {"fwd": W + X + Y, "bwd": 2 * (W + X + Y), "fwd+bwd": 3 * (W + X + Y)}[mode]

    def flops(mode):
        return 2 * n * o * R * L * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]

    label = _label(n, c, size, k, s, p, c_out=o) + (" hypnettorch-W" if layout == "hypnettorch" else "")
    return Problem("local_conv", name, len(size), make, nbytes, flops, label=label, overhead=overhead)


def _patches(x, a):
    """The peers' im2col: F.unfold for 2-d, unfoldNd otherwise."""
    kw = dict(kernel_size=a["kernel_size"], stride=a["stride"], padding=a["padding"])
    if x.dim() == 4:
        return F.unfold(x, **kw)
    return unfoldNd.unfoldNd(x, **kw)


def _hypnettorch(x, w, b, a):
    """hypnettorch LocalConv2dLayer.forward: unfold, broadcast multiply to [N, C_out, R, L], sum over R,
    on its own weight layout, contiguous ``[C_out, R, L]``: ``a["hypnettorch_weight"]`` (``w`` itself
    on the ``*_whypnet`` problems, a copy of it made with the inputs on the others)."""
    w = a["hypnettorch_weight"]
    cols = _patches(x, a)
    n, r, L = cols.shape
    y = (cols.view(n, 1, r, L) * w).sum(dim=2) + b
    return y.view(n, w.shape[0], *a["out"])


def _unfold_bmm(x, w, b, a):
    cols = _patches(x, a)
    y = torch.bmm(cols.permute(2, 0, 1), w.permute(2, 1, 0)).permute(1, 2, 0) + b
    return y.reshape(x.shape[0], w.shape[0], *a["out"])


def _unfold_einsum(x, w, b, a):
    y = torch.einsum("nkl,okl->nol", _patches(x, a), w) + b
    return y.reshape(x.shape[0], w.shape[0], *a["out"])


def _local_conv_providers() -> list[Provider]:
    nd = (1, 2, 3) if unfoldNd is not None else (2,)
    return [
        Provider("convzoo", lambda x, w, b, a: cf.local_conv(x, w, b, kernel_size=a["kernel_size"],
                                                             stride=a["stride"], padding=a["padding"]),
                 overhead=True),
        Provider("hypnettorch", _hypnettorch, ndims=nd),
        Provider("unfold+bmm", _unfold_bmm, ndims=nd),
        Provider("unfold+einsum", _unfold_einsum, ndims=nd, overhead=True),
    ]


# ---------------------------------------------------------------------------------------------- patch covariance
def _kfac_problem(name, n, c, size, k, s, p, mode, overhead=False) -> Problem:
    """The KFAC input factor of a conv layer (groups 1): ``[1, D, D]``, ``D = C·k^d``, scaled by 1/N.
    Inputs: x and the geometry (with ``mode``). Not differentiable: timed in fwd only."""
    L, D, X = math.prod(_out(size, k, s, p)), c * k ** len(size), n * c * math.prod(size)
    geom = dict(kernel_size=k, stride=s, padding=p, mode=mode)

    def make(device, dtype, requires_grad):
        return (torch.randn(n, c, *size, device=device, dtype=dtype), geom)

    def flops(mode_):
        # SYRK's count (BLAS convention): the upper triangle of Σ p pᵀ, N·L·D(D+1) multiply-adds' halves;
        # reduce: the position sums of the patches, then the SYRK of N averaged patches
        return n * L * D * (D + 1) if mode == "expand" else n * L * D + n * D * (D + 1)

    # the least data movement: read x once, write the factor
    return Problem("patch_covariance", name, len(size), make, lambda mode_, e: (X + D * D) * e, flops,
                   label=f"{_label(n, c, size, k, s, p)} {mode}", overhead=overhead, differentiable=False)


def _kfac_unfold_matmul(x, a):
    """The standard implementation: the whole patch matrix (F.unfold / unfoldNd), then one einsum."""
    n = x.shape[0]
    p = _patches(x, a)
    p = p.view(n, 1, *p.shape[1:])  # [N, G = 1, D, L]
    if a["mode"] == "reduce":
        p = p.mean(3)
        return torch.einsum("ngi,ngj->gij", p, p) / n
    return torch.einsum("ngil,ngjl->gij", p, p) / n


def _kfac_einconv(x, a):
    """einconv's KFC / KFAC-reduce as its own tests and docs evaluate it: the (simplified) expression and its
    index patterns built per call, contracted by torch.einsum (opt_einsum's path when installed, torch's
    default)."""
    expr = convNd_kfc if a["mode"] == "expand" else convNd_kfac_reduce
    eq, operands, shape = expr.einsum_expression(x, a["kernel_size"], stride=a["stride"], padding=a["padding"])
    return torch.einsum(eq, *operands).reshape(shape)


def _kfac_curvlinops(x, a):
    """curvlinops' patch extraction (2-d) and the matmul its KFAC does on it, normalised as einconv's."""
    args = (x, a["kernel_size"], a["stride"], a["padding"], 1, 1)
    if a["mode"] == "expand":
        p = extract_patches(*args).flatten(0, 1)  # [N·L, D]
    else:
        p = extract_averaged_patches(*args)  # [N, D]
    return (p.T @ p).div_(x.shape[0])[None]


def _kfac_providers() -> list[Provider]:
    provs = [Provider("convzoo", lambda x, a: cf.patch_covariance(x, a["kernel_size"], a["stride"], a["padding"],
                                                                  mode=a["mode"]), overhead=True),
             Provider("unfold+matmul", _kfac_unfold_matmul, ndims=(1, 2, 3) if unfoldNd is not None else (2,),
                      overhead=True)]
    if convNd_kfc is not None:
        provs.append(Provider("einconv", _kfac_einconv))
    if extract_patches is not None:
        provs.append(Provider("curvlinops", _kfac_curvlinops, ndims=(2,)))
    return provs


# ---------------------------------------------------------------------------------------------- kfac
# (name, N, [(C_in, C_out, stride), ...] of the 3×3 convs (each + BatchNorm + ReLU), spatial) of the K-FAC
# factor-update problems; a global average pool and a Linear to 10 classes close each model
_KFAC_MODELS = {
    "tiny": [("cnn_tiny", 2, [(3, 4, 1), (4, 8, 2)], (8, 8))],
    # the CIFAR-like CNN of issue 25: 7 convs 32→128 with BatchNorm, batch 32 at 32×32
    "quick": [("cifar_cnn", 32, [(3, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1),
                                 (128, 128, 1)], (32, 32))],
    # ResNet-18's conv widths and strides (the stem and the 16 3×3 convs of its 4 stages; no shortcuts)
    "full": [("resnet18_convs", 32, [(3, 64, 1)] + [(64, 64, 1)] * 4 + [(64, 128, 2)] + [(128, 128, 1)] * 3 +
              [(128, 256, 2)] + [(256, 256, 1)] * 3 + [(256, 512, 2)] + [(512, 512, 1)] * 3, (32, 32))],
}


def _kfac_model(convs, device, dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = []
    for c_in, c_out, stride in convs:
        layers += [torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), torch.nn.BatchNorm2d(c_out),
                   torch.nn.ReLU()]
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(convs[-1][1], 10)]
    return torch.nn.Sequential(*layers).to(device, dtype)


def _kfac_update_problem(name, n, convs, size, overhead=False) -> Problem:
    """One K-FAC factor update of a whole CNN: inputs ``(model, x, y)``, a model of its own per provider.
    Not differentiable (each provider runs its own forward and backward): timed in fwd only."""
    L = 0
    hw = size
    flops = 0
    for c_in, c_out, stride in convs:
        hw = tuple((d + 2 - 3) // stride + 1 for d in hw)
        L = math.prod(hw)
        flops += 3 * 2 * n * L * c_out * c_in * 9  # the training step's forward and its two backward GEMMs

    def make(device, dtype, requires_grad):
        x = torch.randn(n, convs[0][0], *size, device=device, dtype=dtype)
        return (_kfac_model(convs, device, dtype), x, torch.randint(0, 10, (n,), device=device))

    label = f"N{n} C{convs[0][0]}→{convs[-1][1]} {'×'.join(map(str, size))} {len(convs)} convs ({name})"
    return Problem("kfac", name, 2, make, lambda mode_, e: n * convs[0][0] * math.prod(size) * e,
                   lambda mode_: flops, label=label, overhead=overhead, differentiable=False)


def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def _kfac_update_hooked(gradients: bool):
    """A training step (forward, cross entropy, backward) with KFACFactors on the model (A, or A and G)."""
    def fn(model, x, y):
        if not hasattr(model, "_bench_kfac"):  # hooked once per model (each provider gets its own)
            from convzoo.curvature import KFACFactors

            model._bench_kfac = KFACFactors(model, gradients=gradients, scale="curvlinops")
        _step(model, x, y)
    return fn


def _kfac_update_curvlinops(model, x, y):
    """curvlinops' ``KFACLinearOperator.compute_kronecker_factors()`` (A and G, its own forward and backward;
    empirical Fisher, expand, ``separate_weight_and_bias=False``): the operator built once per model."""
    if not hasattr(model, "_bench_curvlinops"):  # its layers' parameters (it refuses BatchNorm's)
        params = [p for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                  for p in m.parameters()]
        model._bench_curvlinops = KFACLinearOperator(model, torch.nn.CrossEntropyLoss(), params,
                                                     [(x, y)], fisher_type="empirical", kfac_approx="expand",
                                                     separate_weight_and_bias=False, check_deterministic=False)
    model._bench_curvlinops.compute_kronecker_factors()


def _kfac_update_providers() -> list[Provider]:
    provs = [Provider("convzoo", _kfac_update_hooked(True), overhead=True),
             Provider("convzoo A only", _kfac_update_hooked(False)),
             Provider("plain step", _step, overhead=True)]
    if extract_patches is not None:  # curvlinops is installed (KFACLinearOperator comes from the same import)
        provs.append(Provider("curvlinops", _kfac_update_curvlinops))
    return provs


# ---------------------------------------------------------------------------------------------- masked conv
MASK_TILE = 32  # the block masks keep whole tiles of this side (the tile the issue-12 kernel skips)
# (density, structure) of each masked_conv problem; 1.0 is the all-ones mask, through the same op
MASK_DENSITIES = ((1.0, "dense"), (0.5, "block"), (0.25, "block"), (0.1, "block"), (0.1, "unstructured"))


def _block_mask(weight_shape, groups: int, density: float, seed: int = 0) -> torch.Tensor:
    """A bool mask of ``weight_shape`` keeping whole ``MASK_TILE``-square tiles of each group's
    ``[C_out/G, C_in/G·∏K]`` weight matrix: ``round(density·tiles)`` tiles per group (at least one), chosen
    by a seeded permutation, so every run benches the same mask. Tiles at the matrix's edges are partial,
    hence the kept fraction can differ from ``density`` (the label says so)."""
    c_out, r = weight_shape[0] // groups, math.prod(weight_shape[1:])
    rows, cols = -(-c_out // MASK_TILE), -(-r // MASK_TILE)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(groups, rows * cols, dtype=torch.bool)
    k = max(1, round(density * rows * cols))
    for g in range(groups):
        keep[g, torch.randperm(rows * cols, generator=gen)[:k]] = True
    tiles = keep.view(groups, rows, cols).repeat_interleave(MASK_TILE, 1).repeat_interleave(MASK_TILE, 2)
    return tiles[:, :c_out, :r].reshape(weight_shape).contiguous()


def _mask(weight_shape, groups: int, density: float, structure: str, seed: int = 0) -> torch.Tensor:
    """The bench's deterministic masks: all ones (``dense``), whole tiles (``block``), or each weight kept
    with probability ``density`` (``unstructured``, a seeded ``torch.rand < density``)."""
    if structure == "dense":
        return torch.ones(weight_shape, dtype=torch.bool)
    if structure == "block":
        return _block_mask(weight_shape, groups, density, seed)
    if structure == "unstructured":
        return torch.rand(weight_shape, generator=torch.Generator().manual_seed(seed)) < density
    raise ValueError(f"structure must be 'dense', 'block' or 'unstructured', got {structure!r}")


def _density_label(density: float, structure: str, kept: float) -> str:
    """``d0.1 block``; the kept fraction too where it differs from the asked density (partial edge tiles,
    a rounded tile count, a small unstructured mask)."""
    text = f"d{density:g} {structure}"
    return text if abs(kept - density) < 0.005 else f"{text} ({kept:.3f} kept)"


def _masked_conv_problem(name, n, c, o, size, k, s, p, density=1.0, structure="dense", groups=1,
                         overhead=False) -> Problem:
    """Inputs: x, the weight ``[C_out, C_in/G, k, ...]``, the bool mask (built here, on the CPU, from a fixed
    seed), a bias, the geometry. Only x and the weight require grad in the backward modes."""
    nd = len(size)
    L, R = math.prod(_out(size, k, s, p)), c // groups * k ** nd
    wshape = (o, c // groups, *(k,) * nd)
    mask = _mask(wshape, groups, density, structure)
    kept = mask.float().mean().item()
    W, X, Y = o * R, n * c * math.prod(size), n * o * L
    geom = dict(stride=s, padding=p, groups=groups)

    def make(device, dtype, requires_grad):
        x = torch.randn(n, c, *size, device=device, dtype=dtype).requires_grad_(requires_grad)
        w = (torch.randn(wshape, device=device, dtype=dtype) / math.sqrt(R)).requires_grad_(requires_grad)
        b = torch.randn(o, device=device, dtype=dtype)
        return x, w, mask.to(device), b, geom

    def nbytes(mode, e):
        # the least a kernel must move: fwd reads x and the kept weights, writes y; bwd reads dy twice (for dx
        # and dW), x and the kept weights, writes dx and the whole dW (zeros where masked). The bool mask (or
        # a kernel's tile list) is W bytes at most, left out as the weight's share of it.
        fwd, bwd = X + kept * W + Y, 2 * Y + X + kept * W + X + W
        return e * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    def flops(mode):
        # the dense-equivalent work at every density, so TFLOP/s and % of the matmul peak compare across them
        return 2 * n * L * o * R * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]

    label = f"{_label(n, c, size, k, s, p, c_out=o)} {_density_label(density, structure, kept)}"
    return Problem("masked_conv", name, nd, make, nbytes, flops, label=label, overhead=overhead)


def _masked_conv_convzoo(x, w, m, b, a):
    return cf.masked_conv(x, w, m, b, a["stride"], a["padding"], groups=a["groups"])


def _dense_peer(conv):
    """``F.convNd(x, w * mask, b, ...)``: what a user writes without a masked convolution."""
    def peer(x, w, m, b, a):
        return conv(x, w * m, b, a["stride"], a["padding"], groups=a["groups"])

    return peer


def _masked_conv_providers() -> list[Provider]:
    """convzoo (labelled ``convzoo (CPU path)`` on CPU rows: there it is ``F.convNd`` of the masked weight, the
    peer's own work, with no tile skipped), the dense peer ``F.conv2d`` / ``F.conv3d`` of ``w * mask`` and,
    under ``--full``, ``torch.compile`` of it (the mask product fused)."""
    provs = [Provider("convzoo", _masked_conv_convzoo, overhead=True, cpu_name="convzoo (CPU path)")]
    for nd, conv in ((2, F.conv2d), (3, F.conv3d)):
        peer = _dense_peer(conv)
        provs.append(Provider(f"F.conv{nd}d(x, w*mask)", peer, ndims=(nd,), overhead=True))
        provs.append(Provider(f"compile(F.conv{nd}d(x, w*mask))", torch.compile(peer, dynamic=False), ndims=(nd,),
                              full_only=True))
    return provs


# ---------------------------------------------------------------------------------------------- coactivation
SEED_F2 = "seed f2 (stacked grouped conv)"
SEED_F2_LIMIT = 2 << 30  # bytes: the seed's method is not run on a shape where it would hold more


def _seed_f2_bytes(n, c, o, size, k, s, p, e=4) -> int:
    """What the seed's ``f2`` holds at its peak, in bytes: the repeated input, the stacked output, its sigmoid,
    the repeated output sigmoid and their product, ``(X + 4·Y)·R`` elements (``R = C_in·∏k`` copies; measured
    equal on CPU by the profiler)."""
    r = c * k ** len(size)
    return (n * c * math.prod(size) + 4 * n * o * math.prod(_out(size, k, s, p))) * r * e


def _coactivation_problem(name, n, c, o, size, k, s, p, overhead=False) -> Problem:
    """``mode='count'`` statistics of a conv's input x and output y (both randn: about half of each active).
    Inputs: x, y, the geometry (with the seed's one-hot stacked weight where the seed's method runs). Not
    differentiable: timed in fwd only. The seed's method is skipped where it would hold over ``SEED_F2_LIMIT``."""
    nd = len(size)
    out = _out(size, k, s, p)
    wshape = (o, c, *(k,) * nd)
    L, R = math.prod(out), c * k ** nd
    W, X, Y = o * R, n * c * math.prod(size), n * o * L
    seed_bytes = _seed_f2_bytes(n, c, o, size, k, s, p)
    skip = {} if seed_bytes <= SEED_F2_LIMIT else {
        SEED_F2: f"its stacked tensors would take {seed_bytes / 2**30:.1f} GiB (fp32) > {SEED_F2_LIMIT >> 30} GiB"}
    geom = dict(weight_shape=wshape, stride=s, padding=p)

    def make(device, dtype, requires_grad):
        x = torch.randn(n, c, *size, device=device, dtype=dtype)
        y = torch.randn(n, o, *out, device=device, dtype=dtype)
        # the notebook builds its one-hot weight once, at layer init: outside the timed call here too
        seed = {"seed_weight": _seed_f2_weight(wshape, device, dtype)} if not skip and nd == 2 else {}
        return x, y, dict(geom, **seed)

    # the least data movement: read x and y, write the counts; FLOPs: the weight gradient's GEMM
    return Problem("coactivation", name, nd, make, lambda mode, e: (X + Y + W) * e, lambda mode: 2 * n * L * W,
                   label=_label(n, c, size, k, s, p, c_out=o), overhead=overhead, differentiable=False, skip=skip)


def _seed_f2_weight(wshape, device, dtype) -> torch.Tensor:
    """The seed's ``stacked_conv.weight``: for each tap ``r = (c, j, h)`` of a filter (row-major), the weight
    that is 1 at ``[:, c, j, h]`` and 0 elsewhere, concatenated along dim 0: ``[R·C_out, C_in/G, kh, kw]``."""
    o, r = wshape[0], math.prod(wshape[1:])
    one_hot = torch.eye(r, device=device, dtype=dtype).view(r, 1, *wshape[1:])
    return one_hot.expand(r, o, *wshape[1:]).reshape(r * o, *wshape[1:])


def _coactivation_seed_f2(x, y, a):
    """The Sparse-CNN notebook's ``f2`` / ``DSConv2d.update_connections_tensor`` (groups 1), transcribed: the input
    repeated ``R`` times through one grouped conv of one-hot filters puts each connection's input value at its
    output's position; ``sigmoid(·) > 0.5`` on both sides, their product summed over batch and positions. The
    notebook's conv has no padding and builds the stacked conv without it; here the geometry's padding is passed
    (zero padding: ``sigmoid(0) = 0.5``, inactive, as in ours)."""
    w, o = a["seed_weight"], y.shape[1]
    r = w.shape[0] // o
    stacked_input = x.repeat((1, r, 1, 1))
    stacked_output = F.conv2d(stacked_input, w, None, a["stride"], a["padding"], 1, r)
    s1 = torch.sigmoid(stacked_output).gt_(0.5)
    s2 = torch.sigmoid(y).gt_(0.5).repeat((1, r, 1, 1))
    h = torch.sum(s2.mul(s1), (0, 2, 3))
    return h.view(r, o).T.reshape(a["weight_shape"])  # the notebook's H[connection_indxs] = H_


_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def _coactivation_conv_weight(x, y, a):
    """``torch.nn.grad.convNd_weight`` of binarized fp copies: the count as a weight gradient, unfused."""
    return _CONV_WEIGHT[x.dim() - 2]((x > 0).to(x.dtype), a["weight_shape"], (y > 0).to(y.dtype), a["stride"],
                                     a["padding"])


def _coactivation_providers() -> list[Provider]:
    """convzoo (``mode='count'``; labelled ``convzoo (CPU path)`` on CPU rows: there it is the conv_weight peer's
    own work), ``conv_weight(x>0, y>0)`` and the seed's method (2-d, where it fits)."""
    return [Provider("convzoo", lambda x, y, a: cf.coactivation(x, y, a["weight_shape"], a["stride"], a["padding"]),
                     overhead=True, cpu_name="convzoo (CPU path)"),
            Provider("conv_weight(x>0, y>0)", _coactivation_conv_weight, overhead=True),
            Provider(SEED_F2, _coactivation_seed_f2, ndims=(2,))]


# ---------------------------------------------------------------------------------------------- dynamic_sparse
DYNAMIC_DENSITY = 0.1
# the training-step providers: (column, layer kind, statistics every this many steps)
_DYNAMIC_KINDS = (("nn.Conv2d (dense)", "dense", None), (f"MaskedConv2d d{DYNAMIC_DENSITY:g}", "masked", None),
                  (f"DynamicSparseConv2d d{DYNAMIC_DENSITY:g} stats every step", "dynamic", 1),
                  (f"DynamicSparseConv2d d{DYNAMIC_DENSITY:g} stats every 100", "dynamic", 100))


def _dynamic_cnn(kind: str, every, c_in: int, c: int, device, dtype) -> torch.nn.Module:
    """The issue's 3-conv CNN (``c_in → c → c → c``, 3×3, padding 1, ReLU after each) of ``kind`` layers."""
    import convzoo

    def conv(i, o):
        if kind == "dense":
            return torch.nn.Conv2d(i, o, 3, padding=1, device=device, dtype=dtype)
        if kind == "masked":
            return convzoo.MaskedConv2d(i, o, 3, padding=1, density=DYNAMIC_DENSITY, device=device, dtype=dtype)
        return convzoo.DynamicSparseConv2d(i, o, 3, padding=1, density=DYNAMIC_DENSITY, update_every=every,
                                           device=device, dtype=dtype)

    return torch.nn.Sequential(conv(c_in, c), torch.nn.ReLU(), conv(c, c), torch.nn.ReLU(), conv(c, c),
                               torch.nn.ReLU())


def _dynamic_sparse_problem(name, n, c_in, c, size) -> Problem:
    """One SGD training step (forward, ``mean(y²)`` backward, ``optimizer.step()``) of the 3-conv CNN per provider
    (each builds its own model on its first, untimed call). Inputs: x and the provider's state. Timed in fwd
    only (the step is the whole call); FLOPs: the dense step's (forward, grad-input of the last two layers,
    grad-weight of all three), so TFLOP/s is the dense-equivalent rate at every density."""
    L = math.prod(size)
    fwd = 2 * n * L * 9 * c * (c_in + 2 * c)
    flops = fwd + 2 * n * L * 9 * c * 2 * c + fwd

    def make(device, dtype, requires_grad):
        return torch.randn(n, c_in, *size, device=device, dtype=dtype), {"c_in": c_in, "c": c}

    act = n * L * c * 4  # the activations written and read (a floor, not a roofline)
    return Problem("dynamic_sparse", name, 2, make, lambda mode, e: act * e, lambda mode: flops,
                   label=f"3×conv N{n} C{c_in}→{c}→{c}→{c} {'×'.join(map(str, size))} k3 p1", differentiable=False)


def _dynamic_step(kind: str, every):
    def step(x, state):
        if "model" not in state:  # built on the first (untimed) call, one model per provider
            state["model"] = _dynamic_cnn(kind, every, state["c_in"], state["c"], x.device, x.dtype)
            state["opt"] = torch.optim.SGD(state["model"].parameters(), lr=1e-3)
        model, opt = state["model"], state["opt"]
        opt.zero_grad(set_to_none=True)
        y = model(x)
        y.square().mean().backward()
        opt.step()
        return y.detach()

    return step


def _dynamic_sparse_providers() -> list[Provider]:
    """The dense layer, the masked one and the dynamic one with statistics every step (``convzoo``: the speedup
    column's base) and every 100 steps."""
    out = []
    for label, kind, every in _DYNAMIC_KINDS:
        base = kind == "dynamic" and every == 1
        out.append(Provider("convzoo" if base else label, _dynamic_step(kind, every), ndims=(2,),
                            cpu_name=label if base else ""))
    return out


# ---------------------------------------------------------------------------------------------- sets
# (name, N, C, spatial, kernel, stride, padding) for unfold/fold; local conv adds C_out after C
# and, optionally, the weight layout (default "module")
_UNFOLD = {
    "tiny": [("2d_tiny", 2, 3, (8, 8), 3, 1, 1), ("3d_tiny", 1, 2, (4, 4, 4), 2, 1, 0)],
    "quick": [("2d_resnet", 8, 64, (32, 32), 3, 1, 1), ("2d_strided", 8, 32, (56, 56), 3, 2, 1),
              ("1d", 16, 64, (1024,), 5, 1, 2), ("3d", 2, 16, (16, 16, 16), 3, 1, 1)],
    "full": [("2d_resnet_56", 32, 64, (56, 56), 3, 1, 1), ("2d_resnet_28", 32, 128, (28, 28), 3, 1, 1),
             ("2d_resnet_14", 32, 256, (14, 14), 3, 1, 1), ("2d_stem_7x7", 32, 3, (224, 224), 7, 2, 3),
             ("2d_strided", 32, 128, (56, 56), 3, 2, 1), ("1d_audio", 16, 64, (16384,), 9, 1, 4),
             ("3d_video", 4, 32, (16, 32, 32), 3, 1, 1)],
}
_LOCAL = {
    "tiny": [("2d_tiny", 2, 3, 4, (6, 6), 3, 1, 1)],
    # the same shape with both weight layouts: convzoo with its module's layout, and with hypnettorch's
    "quick": [("2d", 16, 16, 16, (16, 16), 3, 1, 1), ("1d", 16, 16, 16, (128,), 5, 1, 2),
              ("2d_c32_wmodule", 16, 32, 32, (32, 32), 3, 1, 1, "module"),
              ("2d_c32_whypnet", 16, 32, 32, (32, 32), 3, 1, 1, "hypnettorch")],
    "full": [("2d_hypnet", 32, 64, 64, (32, 32), 3, 1, 1),
             ("2d_hypnet_whypnet", 32, 64, 64, (32, 32), 3, 1, 1, "hypnettorch"),
             ("2d_batch256", 256, 32, 32, (16, 16), 3, 1, 1),
             ("2d_strided", 32, 32, 64, (32, 32), 3, 2, 1), ("1d", 32, 64, 64, (256,), 5, 1, 2),
             ("3d", 8, 16, 16, (8, 16, 16), 3, 1, 1)],
}
# (name, N, C, spatial, kernel, stride, padding) for patch_covariance, each in both modes
_KFAC = {
    "tiny": [("2d_tiny", 2, 3, (8, 8), 3, 1, 1), ("3d_tiny", 1, 2, (4, 4, 4), 2, 1, 0)],
    "quick": [("2d_resnet", 8, 64, (32, 32), 3, 1, 1), ("2d_strided", 8, 32, (56, 56), 3, 2, 1),
              ("3d", 2, 8, (8, 8, 8), 3, 1, 1)],
    # ResNet-50's 3×3 layers (stages 1-3) at batch 32, and a video-sized 3-d layer
    "full": [("2d_resnet_56", 32, 64, (56, 56), 3, 1, 1), ("2d_resnet_28", 32, 128, (28, 28), 3, 1, 1),
             ("2d_resnet_14", 32, 256, (14, 14), 3, 1, 1), ("2d_strided", 32, 128, (56, 56), 3, 2, 1),
             ("3d_video", 4, 16, (8, 32, 32), 3, 1, 1)],
}
# (name, N, C_in, C_out, spatial, kernel, stride, padding) for masked_conv, each at every MASK_DENSITIES entry
_MASKED = {
    "tiny": [("2d_tiny", 2, 16, 64, (8, 8), 3, 1, 1), ("3d_tiny", 1, 4, 64, (4, 4, 4), 3, 1, 1)],
    # a ResNet stage-2 3×3 layer and its strided entry, small enough for a 2-core CPU, and a 3-d layer
    "quick": [("2d_resnet", 8, 64, 64, (32, 32), 3, 1, 1), ("2d_strided", 8, 64, 128, (32, 32), 3, 2, 1),
              ("3d", 2, 32, 32, (8, 16, 16), 3, 1, 1)],
    # ResNet-50's 3×3 layers (stages 1-3) and the strided entry of stage 2 at batch 32, a video-sized 3-d layer
    "full": [("2d_resnet_56", 32, 64, 64, (56, 56), 3, 1, 1), ("2d_resnet_28", 32, 128, 128, (28, 28), 3, 1, 1),
             ("2d_resnet_14", 32, 256, 256, (14, 14), 3, 1, 1), ("2d_strided", 32, 64, 128, (56, 56), 3, 2, 1),
             ("3d_video", 4, 32, 32, (16, 32, 32), 3, 1, 1)],
}
# (name, N, C_in, C, spatial) for dynamic_sparse: the 3-conv CNN (32 → 128 channels, batch 32 at 32×32)
_DYNAMIC = {"tiny": [("cnn3_tiny", 2, 4, 16, (8, 8))],
            "quick": [("cnn3", 32, 32, 128, (32, 32))],
            "full": [("cnn3", 32, 32, 128, (32, 32)), ("cnn3_n64", 64, 32, 128, (32, 32))]}
# (name, N, C_in, C_out, spatial, kernel, stride, padding) for coactivation: CIFAR-ResNet's 3×3 layers (16, 32, 64
# channels at 32², 16², 8²) and a strided stage entry
_COACT = {
    "tiny": [("2d_tiny", 2, 4, 8, (8, 8), 3, 1, 1)],
    "quick": [("2d_c16", 8, 16, 16, (32, 32), 3, 1, 1), ("2d_c32", 8, 32, 32, (16, 16), 3, 1, 1),
              ("2d_c64", 8, 64, 64, (8, 8), 3, 1, 1), ("2d_strided", 8, 16, 32, (32, 32), 3, 2, 1)],
    # batch 128 (the seed's method skipped: ~6 GiB each) and batch 32, where it fits
    "full": [("2d_c16", 128, 16, 16, (32, 32), 3, 1, 1), ("2d_c32", 128, 32, 32, (16, 16), 3, 1, 1),
             ("2d_c64", 128, 64, 64, (8, 8), 3, 1, 1), ("2d_strided", 128, 16, 32, (32, 32), 3, 2, 1),
             ("2d_c16_n32", 32, 16, 16, (32, 32), 3, 1, 1), ("2d_c32_n32", 32, 32, 32, (16, 16), 3, 1, 1),
             ("2d_c64_n32", 32, 64, 64, (8, 8), 3, 1, 1)],
}


def _seed_f2_skipped() -> str:
    """The coactivation shapes, per size, that the seed's method is not run on, with what it would hold."""
    out = []
    for size, shapes in _COACT.items():
        for _, *shape in shapes:
            if (nbytes := _seed_f2_bytes(*shape)) > SEED_F2_LIMIT:
                n, c, o, spatial, k, s, p = shape
                out.append(f"--{size} {_label(n, c, spatial, k, s, p, c_out=o)} ({nbytes / 2**30:.1f} GiB)")
    return "; ".join(out)


KFAC_MODES = ("expand", "reduce")
OPS = ("unfold", "fold", "local_conv", "patch_covariance", "masked_conv", "coactivation", "dynamic_sparse",
       "kfac")
SIZES = ("tiny", "quick", "full")
# a line under an op's table (printed and in the markdown): what its rows mean beyond the shape
NOTES = {
    "kfac": (
        "kfac: one training step of the whole CNN (forward, cross entropy, backward; batch-norm in training mode) "
        "per row, timed in fwd only: `convzoo` with KFACFactors(gradients=True, scale='curvlinops') hooked (A and G "
        "of every conv and the Linear, expand), `convzoo A only` without G, `plain step` with no hooks, and "
        "curvlinops' KFACLinearOperator.compute_kronecker_factors() (A and G with its own forward and backward; "
        "empirical, expand). The factor update's own cost is `convzoo` − `plain step`; TFLOP/s counts the "
        "training step's three conv GEMMs, not the factors'."),
    "masked_conv": (
        "masked_conv: TFLOP/s and % matmul count the dense-equivalent work (2·N·L·C_out·C_in/G·∏k, ×2 more for "
        f"bwd) at every density, so they compare across densities. `dρ block` keeps whole {MASK_TILE}×{MASK_TILE} "
        "tiles of each group's [C_out/G, C_in/G·∏k] weight matrix, `dρ unstructured` each weight with "
        "probability ρ (both seeded; the kept fraction in parentheses where it differs from ρ). On a CPU convzoo "
        "runs its CPU path, labelled `convzoo (CPU path)`: F.convNd of the masked weight, the dense peer's "
        "work, no tile skipped."),
    "coactivation": (
        "coactivation: mode='count' of a conv's input and output (both randn, about half active), timed in fwd only "
        "(a statistic); TFLOP/s counts the weight gradient's GEMM, 2·N·L·C_out·C_in·∏k. `conv_weight(x>0, y>0)` is "
        "torch.nn.grad.convNd_weight of binarized fp copies; on a CPU convzoo runs its CPU path, labelled "
        "`convzoo (CPU path)`: the same counts as exact int8 matmuls (torch._int_mm) of the 0/1 tensors read as "
        "bytes. `seed f2` is the Sparse-CNN notebook's method "
        "(the input repeated C_in·∏k times through a grouped conv of one-hot filters, sigmoid > 0.5 on both "
        "sides, product summed; its one-hot weight built outside the timed call, as the notebook builds it at "
        "layer init); it holds (X + 4·Y)·C_in·∏k elements (X, Y: the input's and output's sizes) and is not run "
        f"where that exceeds {SEED_F2_LIMIT >> 30} GiB: {_seed_f2_skipped()}."),
    "dynamic_sparse": (
        "dynamic_sparse: one SGD training step (forward, backward of mean(y²), optimizer.step) of a 3-conv CNN "
        "(3×3, ReLU after each) built of nn.Conv2d, MaskedConv2d or DynamicSparseConv2d (density "
        f"{DYNAMIC_DENSITY:g}, score='count': the coactivation statistics of every layer on every step, or every "
        "100th; no prune_regrow in the timed step). The speedup column's base is the every-step row: a dense row "
        "of 0.70x means every-step statistics cost 1/0.70 = 1.43× the dense step. TFLOP/s counts the dense "
        "step's work."),
}


def overhead_problems(ops=OPS) -> list[Problem]:
    """One eager call of each op on a tiny 2-d shape, where the host's microseconds are all there is."""
    out = []
    for op in ops:
        if op in ("unfold", "fold"):
            out.append(_unfold_problem(op, "overhead", 2, 3, (8, 8), 3, 1, 1, overhead=True))
        elif op == "patch_covariance":
            out.append(_kfac_problem("overhead", 2, 3, (8, 8), 3, 1, 1, "expand", overhead=True))
        elif op == "masked_conv":
            out.append(_masked_conv_problem("overhead", 2, 3, 4, (8, 8), 3, 1, 1, overhead=True))
        elif op == "coactivation":
            out.append(_coactivation_problem("overhead", 2, 3, 4, (8, 8), 3, 1, 1, overhead=True))
        elif op == "dynamic_sparse":  # a training step of layers: the masked_conv rows hold its per-call overhead
            continue
        elif op == "kfac":
            out.append(_kfac_update_problem("overhead", *_KFAC_MODELS["tiny"][0][1:], overhead=True))
        else:
            out.append(_local_conv_problem("overhead", 2, 3, 4, (8, 8), 3, 1, 1, overhead=True))
    return out


def problems(size: str, ops=OPS) -> list[Problem]:
    """The problems of one size (``tiny``, ``quick``, ``full``) for ``ops``, in order."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {SIZES}")
    out = []
    for op in ops:
        if op in ("unfold", "fold"):
            out += [_unfold_problem(op, *shape) for shape in _UNFOLD[size]]
        elif op == "local_conv":
            out += [_local_conv_problem(*shape) for shape in _LOCAL[size]]
        elif op == "patch_covariance":
            out += [_kfac_problem(f"{shape[0]}_{m}", *shape[1:], m) for shape in _KFAC[size] for m in KFAC_MODES]
        elif op == "masked_conv":
            out += [_masked_conv_problem(f"{shape[0]}_d{d:g}_{kind}", *shape[1:], d, kind) for shape in _MASKED[size]
                    for d, kind in MASK_DENSITIES]
        elif op == "coactivation":
            out += [_coactivation_problem(*shape) for shape in _COACT[size]]
        elif op == "dynamic_sparse":
            out += [_dynamic_sparse_problem(*shape) for shape in _DYNAMIC[size]]
        elif op == "kfac":
            out += [_kfac_update_problem(*shape) for shape in _KFAC_MODELS[size]]
        else:
            raise ValueError(f"unknown op {op!r}; choose from {OPS}")
    return out


# the kernels each op's rows launch (fwd and its gradients): what tuning for the bench tunes
OP_KERNELS = {"unfold": ("unfold", "fold"), "fold": ("fold", "unfold"),
              "local_conv": ("local_conv_fwd", "local_conv_grad_input", "local_conv_grad_weight"),
              "patch_covariance": ("patch_covariance",),
              "masked_conv": ("masked_conv_fwd", "masked_conv_grad_input", "masked_conv_grad_weight"),
              "coactivation": ("masked_conv_grad_weight",),  # mode='count': grad-weight with fused thresholds
              "dynamic_sparse": ("masked_conv_fwd", "masked_conv_grad_input", "masked_conv_grad_weight"),
              "kfac": ("patch_covariance",)}


def tune_layers(size: str, ops=OPS) -> list[Layer]:
    """The shapes one bench size times, as tuning layers (``convzoo-autotune --grid bench-<size>``): one
    layer per distinct geometry, holding the kernels of every op timed on it (:data:`OP_KERNELS`)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {SIZES}")
    shapes: dict[tuple, list] = {}  # (n, c, size, k, s, p, c_out) -> [name, kernels]
    for op in ops:
        if op not in OP_KERNELS:
            raise ValueError(f"unknown op {op!r}; choose from {OPS}")
        if op in ("unfold", "fold"):
            geoms = [(name, n, c, sz, k, s, p, None) for name, n, c, sz, k, s, p in _UNFOLD[size]]
        elif op == "patch_covariance":
            geoms = [(name, n, c, sz, k, s, p, None) for name, n, c, sz, k, s, p in _KFAC[size]]
        elif op == "dynamic_sparse":  # the CNN's two distinct layers
            geoms = [g for name, n, ci, c, sz in _DYNAMIC[size]
                     for g in ((f"{name}_l1", n, ci, sz, 3, 1, 1, c), (f"{name}_l2", n, c, sz, 3, 1, 1, c))]
        elif op == "kfac":  # each conv's input: the factor's geometry
            geoms = []
            for name, n, convs, sz in _KFAC_MODELS[size]:
                for i, (c_in, _, stride) in enumerate(convs):
                    geoms.append((f"{name}_{i}", n, c_in, sz, 3, stride, 1, None))
                    sz = tuple((d - 1) // stride + 1 for d in sz)
        else:
            table = {"local_conv": _LOCAL, "masked_conv": _MASKED, "coactivation": _COACT}[op][size]
            geoms = [(name, n, c, sz, k, s, p, o) for name, n, c, o, sz, k, s, p, *_ in table]
        for name, *geom in geoms:
            entry = shapes.setdefault(tuple(geom), [f"{op}_{name}", []])
            entry[1] += [k for k in OP_KERNELS[op] if k not in entry[1]]
    return [Layer(name, n, c, tuple(sz), k, s, p, o, tuple(kernels))
            for (n, c, sz, k, s, p, o), (name, kernels) in shapes.items()]


def default_modes(size: str) -> tuple[str, ...]:
    """The modes a size times unless told: all three for ``full``, else fwd and fwd+bwd."""
    return ("fwd", "bwd", "fwd+bwd") if size == "full" else ("fwd", "fwd+bwd")


def for_size(size: str, ops=OPS) -> list[Problem]:
    """What one bench size runs: ``tiny`` its shapes; ``quick`` / ``full`` their shapes and the overhead
    problems; ``overhead`` only those. The CLI and the pytest-benchmark entry both take their problems here."""
    if size == "overhead":
        return overhead_problems(ops)
    return problems(size, ops) + (overhead_problems(ops) if size in ("quick", "full") else [])


def providers() -> dict[str, list[Provider]]:
    return {"unfold": _unfold_providers("unfold"), "fold": _unfold_providers("fold"),
            "local_conv": _local_conv_providers(), "patch_covariance": _kfac_providers(),
            "masked_conv": _masked_conv_providers(), "coactivation": _coactivation_providers(),
            "dynamic_sparse": _dynamic_sparse_providers(),
            "kfac": _kfac_update_providers()}
