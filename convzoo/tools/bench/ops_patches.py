"""The benched im2col and KFAC ops: unfold / fold, local conv, patch covariance and the KFAC factor update; their
problems (shapes, rooflines) and providers (convzoo and its peers).

Peers are optional: a missing one drops its column, and :func:`missing_peers` says how to install it. Each peer is
looked up here when a provider list is built, so dropping one means setting its name here to None.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import convzoo.functional as cf
from convzoo.tools.bench.harness import Problem, Provider, _label, _out

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


