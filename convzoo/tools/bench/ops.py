"""The benched ops: their shapes (tiny / quick / full / overhead), rooflines and providers (convzoo and peers).

Peers are optional: a missing one drops its column, and :func:`missing_peers` says how to install it. The
problems and providers of each family are built in :mod:`~convzoo.tools.bench.ops_patches` (unfold / fold,
local_conv, patch_covariance, kfac; the optional peers) and :mod:`~convzoo.tools.bench.ops_sparse` (masked_conv,
coactivation, dynamic_sparse); here are the sets of shapes and the lists every caller reads (the names of those
modules that callers and tests read here too are imported here; a peer is dropped in ``ops_patches``).
"""

from __future__ import annotations

from convzoo.autotune.grids import Layer
from convzoo.tools.bench.harness import Problem, Provider, _label
from convzoo.tools.bench.ops_patches import (  # noqa: F401
    _KFAC_MODELS,
    _kfac_problem,
    _kfac_providers,
    _kfac_update_problem,
    _kfac_update_providers,
    _local_conv_problem,
    _local_conv_providers,
    _unfold_problem,
    _unfold_providers,
    missing_peers,
)
from convzoo.tools.bench.ops_sparse import (  # noqa: F401
    _DYNAMIC_KINDS,
    DYNAMIC_DENSITY,
    MASK_DENSITIES,
    MASK_TILE,
    SEED_F2,
    SEED_F2_LIMIT,
    _coactivation_problem,
    _coactivation_providers,
    _coactivation_seed_f2,
    _dynamic_sparse_problem,
    _dynamic_sparse_providers,
    _mask,
    _masked_conv_problem,
    _masked_conv_providers,
    _seed_f2_bytes,
)

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
