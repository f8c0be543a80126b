"""The benched sparse ops: masked conv, the coactivation statistics and the dynamic sparse training step; their
problems (shapes, masks, rooflines) and providers (convzoo and its peers)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import convzoo.functional as cf
from convzoo.tools.bench.harness import Problem, Provider, _label, _out

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


