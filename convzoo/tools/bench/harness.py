"""The bench harness: problems × providers × modes → timed rows with derived metrics.

A *problem* is one op at one shape: it builds its inputs and knows the bytes and FLOPs each mode
must move/do (its roofline). A *provider* is one implementation of the op (convzoo or a peer).
Each (problem, provider, mode) becomes a :class:`Row`: time quantiles (p20/p50/p80), GB/s,
TFLOP/s, % of the roofline time on this device's *measured* limits, and peak memory.

GPU: ``triton.testing.do_bench``. CPU: wall-clock samples of the CPU paths, labelled CPU.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from convzoo.tools.bench.memory import peak_bytes

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Problem:
    """One op at one shape.

    ``make(device, dtype, requires_grad)`` returns the provider inputs (a tuple); ``bytes`` and
    ``flops`` map a mode to what that mode must at least move / compute.
    """

    op: str
    name: str
    ndim: int
    make: Callable[[torch.device, torch.dtype, bool], tuple]
    bytes: Callable[[str, int], float]  # (mode, element size) -> bytes
    flops: Callable[[str], float] = lambda mode: 0.0


@dataclass
class Provider:
    """One implementation: ``fn(*inputs) -> output``; ``ndims`` it supports; ``full_only`` for slow
    extras (compiling) that only ``--full`` runs; ``cuda_only`` for what needs a GPU."""

    name: str
    fn: Callable
    ndims: tuple = (1, 2, 3)
    full_only: bool = False
    cuda_only: bool = False


@dataclass
class Limits:
    """This device's measured copy bandwidth (bytes/s) and matmul throughput (FLOP/s, in ``dtype``)."""

    copy_bytes_per_s: float
    matmul_flops_per_s: float
    dtype: str


@dataclass
class Row:
    date: str
    device: str
    torch: str
    triton: str
    git_sha: str
    op: str
    shape: str
    mode: str
    dtype: str
    provider: str
    ms_p50: float
    ms_p20: float
    ms_p80: float
    gb_per_s: float
    tflop_per_s: float
    pct_of_limit: float
    peak_mib: float
    vs_convzoo: float = field(default=float("nan"))

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# ---------------------------------------------------------------------------------------------- timing
def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 7) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(samples, n=10, method="inclusive")  # deciles
    return statistics.median(samples), q[1], q[7]


def measure_limits(device: torch.device, dtype: torch.dtype) -> Limits:
    """Measure a large device-to-device copy and a large matmul on ``device``."""
    if device.type == "cuda":
        n_bytes, n = 1 << 30, 8192
    else:
        n_bytes, n = 1 << 26, 1024
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms, _, _ = time_ms(lambda: dst.copy_(src), device)
    mm_dtype = dtype if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    mm_ms, _, _ = time_ms(lambda: a @ b, device)
    return Limits(2 * n_bytes / (copy_ms * 1e-3), 2 * n**3 / (mm_ms * 1e-3), str(mm_dtype).replace("torch.", ""))


# ---------------------------------------------------------------------------------------------- running
def _call(problem: Problem, provider: Provider, mode: str, device, dtype) -> Callable[[], object]:
    """A zero-argument callable doing ``mode`` of ``provider`` on fresh inputs of ``problem``."""
    inputs = problem.make(device, dtype, mode != "fwd")
    if mode == "fwd":
        return lambda: provider.fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if mode == "bwd":
        y = provider.fn(*inputs)
        gy = torch.randn_like(y)
        return lambda: torch.autograd.grad(y, leaves, gy, retain_graph=True)

    def fwd_bwd():
        y = provider.fn(*inputs)
        return torch.autograd.grad(y, leaves, torch.ones_like(y))

    return fwd_bwd


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} (plain-torch paths)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "device": name,
            "torch": torch.__version__, "triton": triton_version, "git_sha": sha}


def run(problems: Sequence[Problem], providers: dict[str, Sequence[Provider]], modes: Sequence[str],
        device: torch.device, dtype: torch.dtype, limits: Limits, full: bool = False, reps: int = 7,
        memory: bool = True, log=print, env: dict | None = None) -> list[Row]:
    """Time every (problem, provider, mode); fill in the derived metrics. ``env`` is
    :func:`environment`'s record for ``device`` when the caller has it already."""
    env = env or environment(device)
    rows = []
    for problem in problems:
        for mode in modes:
            for prov in providers[problem.op]:
                if problem.ndim not in prov.ndims or (prov.full_only and not full) or \
                        (prov.cuda_only and device.type != "cuda"):
                    continue
                fn = _call(problem, prov, mode, device, dtype)
                p50, p20, p80 = time_ms(fn, device, reps)
                peak = peak_bytes(fn, device) / 2**20 if memory else float("nan")
                e = torch.empty((), dtype=dtype).element_size()
                nbytes, flops = problem.bytes(mode, e), problem.flops(mode)
                t_min = max(nbytes / limits.copy_bytes_per_s, flops / limits.matmul_flops_per_s)
                rows.append(Row(**env, op=problem.op, shape=problem.name, mode=mode,
                                dtype=str(dtype).replace("torch.", ""), provider=prov.name,
                                ms_p50=p50, ms_p20=p20, ms_p80=p80, gb_per_s=nbytes / p50 / 1e6,
                                tflop_per_s=flops / p50 / 1e9, pct_of_limit=100 * t_min / (p50 * 1e-3),
                                peak_mib=peak))
                if log:
                    log(f"  {problem.op:<10} {problem.name:<14} {mode:<7} {prov.name:<16} {p50:9.3f} ms")
    base = {(r.op, r.shape, r.mode): r.ms_p50 for r in rows if r.provider == "convzoo"}
    for r in rows:
        if (r.op, r.shape, r.mode) in base:
            r.vs_convzoo = r.ms_p50 / base[r.op, r.shape, r.mode]
    return rows


# ---------------------------------------------------------------------------------------------- output
def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    head = ["op", "shape", "mode", "provider", "p50 ms", "p20 ms", "p80 ms", "GB/s", "TFLOP/s", "% limit",
            "peak MiB", "time vs convzoo"]
    body = [[r.op, r.shape, r.mode, r.provider, f"{r.ms_p50:.3f}", f"{r.ms_p20:.3f}", f"{r.ms_p80:.3f}",
             f"{r.gb_per_s:.2f}", f"{r.tflop_per_s:.3f}", f"{r.pct_of_limit:.1f}", f"{r.peak_mib:.1f}",
             f"{r.vs_convzoo:.2f}x"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head)] + [fmt.format(*b) for b in body])


def device_slug(device_name: str) -> str:
    from convzoo.autotune import device_slug as slug

    return slug(device_name.split(" (")[0])


def append_csv(path: Path, rows: Sequence[Row]) -> None:
    """Append rows (with a header when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=Row.columns())
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_markdown(path: Path, rows: Sequence[Row], limits: Limits, mode_label: str) -> None:
    r0 = rows[0]
    text = (f"# convzoo bench: {r0.device}\n\n"
            f"{mode_label} run of {r0.date}, torch {r0.torch}, triton {r0.triton or '-'}, git {r0.git_sha or '-'}, "
            f"{r0.dtype}. Measured limits: copy {limits.copy_bytes_per_s / 1e9:.1f} GB/s, matmul "
            f"{limits.matmul_flops_per_s / 1e12:.2f} TFLOP/s ({limits.dtype}). '% limit' is the roofline time "
            f"max(bytes / copy bandwidth, FLOPs / matmul peak) over the measured p50.\n\n"
            + format_table(rows, markdown=True) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_plots(folder: Path, rows: Sequence[Row]) -> list[Path]:
    """One PNG per op: p50 time per shape, one bar per provider, one panel per mode (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for op in dict.fromkeys(r.op for r in rows):
        op_rows = [r for r in rows if r.op == op]
        modes = list(dict.fromkeys(r.mode for r in op_rows))
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.6), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            mrows = [r for r in op_rows if r.mode == mode]
            shapes = list(dict.fromkeys(r.shape for r in mrows))
            provs = list(dict.fromkeys(r.provider for r in mrows))
            width = 0.8 / len(provs)
            for j, prov in enumerate(provs):
                xs, ys = [], []
                for i, s in enumerate(shapes):
                    for r in mrows:
                        if r.shape == s and r.provider == prov:
                            xs.append(i + j * width)
                            ys.append(r.ms_p50)
                ax.bar(xs, ys, width, label=prov)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, rotation=20, fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("p50 ms (lower is better)")
            ax.set_title(f"{op} {mode}")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{op} on {op_rows[0].device}", fontsize=9)
        fig.tight_layout()
        path = folder / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
