"""Case lists with readable ids, the per-dtype tolerance table, and independent oracles.

The oracles use only torch and the peer unfoldNd (never convzoo.reference): padding through
``F.pad`` in the asked mode, then ``F.unfold`` (2-d) or ``unfoldNd`` (1-d, 3-d), all in float64;
fold is the exact vector-Jacobian product of that unfold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import unfoldNd

# atol, rtol against a float64 reference, for arithmetic; data movement is compared exactly.
TOL = {
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
    torch.float32: (1e-5, 1.3e-6),
    torch.float64: (1e-12, 1e-12),
}


@dataclass(frozen=True)
class Case:
    n: int
    c: int
    size: tuple
    kernel: tuple
    stride: tuple = None
    padding: object = 0  # int, tuple, per-dim (lo, hi) pairs, 'same', 'valid'
    dilation: tuple = None
    mode: str = "zeros"

    @property
    def ndim(self):
        return len(self.size)

    def kwargs(self):
        nd = self.ndim
        return dict(kernel_size=self.kernel, dilation=self.dilation or (1,) * nd, padding=self.padding,
                    stride=self.stride or (1,) * nd, padding_mode=self.mode)

    @property
    def id(self):
        dims = "DHW"[3 - self.ndim:]
        s = f"N{self.n}_C{self.c}_" + "".join(f"{d}{v}" for d, v in zip(dims, self.size))

        def fmt(t):
            return "x".join(map(str, t)) if isinstance(t, tuple) else str(t)

        s += f"_K{fmt(self.kernel)}"
        if self.stride:
            s += f"_S{fmt(self.stride)}"
        if self.padding != 0:
            p = self.padding
            if isinstance(p, tuple) and isinstance(p[0], tuple):
                s += "_P" + "x".join(f"{a}-{b}" for a, b in p)
            else:
                s += "_P" + (p if isinstance(p, str) else fmt(p))
        if self.dilation:
            s += f"_D{fmt(self.dilation)}"
        return s + ("" if self.mode == "zeros" else f"_{self.mode}")


def _t(v, nd):
    return v if isinstance(v, tuple) else (v,) * nd


CASES = [
    # 2-d
    Case(2, 3, (7, 9), (3, 3)),
    Case(2, 3, (7, 9), (3, 3), (2, 2), 1, (2, 2)),
    Case(1, 1, (5, 5), (1, 1)),
    Case(2, 2, (11, 13), (2, 3), (4, 5)),  # stride > kernel
    Case(2, 2, (8, 8), (3, 3), None, ((1, 2), (2, 0))),  # asymmetric padding
    Case(2, 3, (6, 10), (2, 3), (1, 2), (1, 0), (3, 1)),  # asymmetric tuple args
    Case(2, 2, (13, 7), (3, 3), None, (0, 1), (4, 2)),  # large dilation
    Case(2, 2, (5, 7), (2, 3), (2, 2), "same"),  # strided 'same', even kernel
    Case(1, 3, (6, 6), (3, 3), None, "same", (2, 2)),
    Case(2, 2, (4, 6), (2, 2), (3, 3), "valid"),
    Case(2, 2, (5, 7), (3, 3), (2, 2), 1, None, "circular"),
    Case(2, 2, (5, 7), (3, 3), None, 2, None, "reflect"),
    Case(2, 2, (5, 7), (3, 3), (2, 1), (2, 3), None, "replicate"),
    Case(1, 2, (2, 3), (3, 3), None, (2, 3), None, "circular"),  # padding == size
    Case(2, 1, (4, 4), (2, 2), None, ((0, 3), (3, 1)), (1, 2), "replicate"),
    # 1-d
    Case(2, 3, (17,), (3,)),
    Case(2, 2, (16,), (4,), (3,), (2,), (2,)),
    Case(1, 1, (7,), (1,)),
    Case(2, 2, (9,), (3,), (2,), (2,), None, "reflect"),
    Case(2, 2, (6,), (2,), (1,), "same", (3,), "circular"),
    # 3-d
    Case(2, 2, (5, 6, 7), (2, 2, 2)),
    Case(1, 2, (4, 5, 6), (1, 2, 3), (2, 1, 2), 1, (2, 1, 1)),
    Case(2, 1, (3, 4, 5), (2, 2, 2), None, 1, None, "reflect"),
    Case(1, 2, (3, 4, 5), (2, 3, 2), (1, 2, 1), ((1, 0), (1, 1), (0, 2)), None, "replicate"),
    Case(1, 1, (3, 3, 4), (2, 2, 2), None, "same", None, "circular"),
]
IDS = [c.id for c in CASES]


def flat_padding(case: Case) -> list:
    """The case's padding as the ops' flat [lo_0, hi_0, ...] list (an independent restatement)."""
    nd, p = case.ndim, case.padding
    if p == "valid":
        return [0] * 2 * nd
    if p == "same":
        flat = []
        for n, k, d, s in zip(case.size, case.kernel, _t(case.dilation or 1, nd), _t(case.stride or 1, nd)):
            total = max((math.ceil(n / s) - 1) * s + d * (k - 1) + 1 - n, 0)
            flat += [total // 2, total - total // 2]
        return flat
    if isinstance(p, tuple) and isinstance(p[0], tuple):
        return [v for pair in p for v in pair]
    return [v for e in _t(p, nd) for v in (e, e)]


def oracle_unfold(x: torch.Tensor, case: Case) -> torch.Tensor:
    nd = case.ndim
    flat = flat_padding(case)
    fpad = [v for i in reversed(range(nd)) for v in (flat[2 * i], flat[2 * i + 1])]
    mode = "constant" if case.mode == "zeros" else case.mode
    xp = F.pad(x.double(), fpad, mode=mode)
    kw = dict(dilation=case.dilation or 1, padding=0, stride=case.stride or 1)
    if nd == 2:
        y = F.unfold(xp, case.kernel, **kw)
    else:
        y = unfoldNd.unfoldNd(xp, case.kernel, **kw)
    return y.to(x.dtype)


def oracle_fold(cols: torch.Tensor, case: Case) -> torch.Tensor:
    x = torch.zeros(cols.shape[0], cols.shape[1] // math.prod(case.kernel), *case.size,
                    dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(oracle_unfold(x, case), x, cols.double())
    return g.to(cols.dtype)


def make_input(case: Case, dtype, device, layout="contiguous", integer=False) -> torch.Tensor:
    """The case's input ``[N, C, *size]`` in the given memory layout, same values for every layout."""
    shape = (case.n, case.c, *case.size)
    base = torch.randint(-8, 9, shape).to(dtype) if integer else torch.randn(shape, dtype=dtype)
    base = base.to(device)
    if layout == "contiguous":
        return base
    if layout == "channels_last":
        perm = [0, *range(2, base.dim()), 1]
        inv = [0, base.dim() - 1, *range(1, base.dim() - 1)]
        return base.permute(perm).contiguous().permute(inv)
    if layout == "strided":  # every other element of a twice-as-wide buffer
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
        wide[..., ::2] = base
        return wide[..., ::2]
    raise ValueError(layout)


def integer_like(t: torch.Tensor) -> torch.Tensor:
    return torch.randint(-8, 9, t.shape, device=t.device).to(t.dtype)


def assert_tune_problems_match(kernel: str, device, layers: int | None = 1) -> None:
    """The first ``layers`` (None: all) of the tuner's small grid, as ``kernel``'s TuneProblem builds them: the
    launch with the interpreter's default config equals the problem's own reference (fp32)."""
    from convzoo import autotune
    from convzoo.autotune.grids import GRIDS

    spec = autotune.get_spec(kernel)
    for layer in GRIDS["small"][:layers]:
        problem = spec.problem(layer, torch.float32, torch.device(device))
        fn, ref = problem.setup()
        torch.testing.assert_close(fn(spec.default_config(problem.dims, torch.float32, True)).double(),
                                   ref().double(), atol=1e-5, rtol=1e-5)
