"""The bench harness: problems × providers × modes → timed rows with derived metrics.

A *problem* is one op at one shape: it builds its inputs, states its shape in a readable label and
knows the bytes and FLOPs each mode must at least move / do (its roofline). A *provider* is one
implementation of the op (convzoo or a peer). Each (problem, mode) is timed for every provider in
interleaved rounds (:mod:`convzoo.tools.bench.timing`), so the speedups between providers come from
the same pass; each (problem, provider, mode) becomes a :class:`Row`: time quantiles (p20/p50/p80),
GB/s and % of the measured copy bandwidth, TFLOP/s and % of the measured matmul peak where FLOPs
matter, peak memory, the speedup against convzoo and why it is noisy, if it is.

*Overhead* problems time one eager call on a tiny shape (µs per call: the host's share, which decides
small layers on a GPU) in the modes ``call`` (inputs without grad) and ``call+grad`` (inputs requiring
grad, forward only).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from convzoo.tools._cli import git_sha
from convzoo.tools.bench import timing
from convzoo.tools.bench.memory import peak_bytes

MODES = ("fwd", "bwd", "fwd+bwd")
OVERHEAD_MODES = ("call", "call+grad")
SPEEDUP_LEGEND = ("speedup = peer time / convzoo time, both from the same interleaved pass; > 1 means convzoo "
                  "is faster")


@dataclass
class Problem:
    """One op at one shape.

    ``name`` is a short id, ``label`` states the shape (``N8 C64 32×32 k3 p1 s1``).
    ``make(device, dtype, requires_grad)`` returns the provider inputs (a tuple); ``bytes`` and
    ``flops`` map a mode to what that mode must at least move / compute (no FLOPs: pure data
    movement). ``overhead`` problems time eager calls in :data:`OVERHEAD_MODES`. A problem that is not
    ``differentiable`` (a statistic such as a KFAC factor) is timed in ``fwd`` (and ``call``) only.
    ``skip`` maps the name of a provider that must not run this problem (one that would not fit in memory)
    to the reason, which :func:`run` prints.
    """

    op: str
    name: str
    ndim: int
    make: Callable[[torch.device, torch.dtype, bool], tuple]
    bytes: Callable[[str, int], float]  # (mode, element size) -> bytes
    flops: Callable[[str], float] = lambda mode: 0.0
    label: str = ""
    overhead: bool = False
    differentiable: bool = True
    skip: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.label = self.label or self.name

    @property
    def id(self) -> str:
        """The label as an ASCII identifier (pytest-benchmark ids): ``N2_C3to4_8x8_k3_p1_s1``."""
        return self.label.replace("×", "x").replace("→", "to").replace(" ", "_")

    @property
    def moves_data_only(self) -> bool:
        return self.flops("fwd") == 0

# the shape helpers of every family's problems (bench/ops_patches.py, bench/ops_sparse.py): the output size of
# a conv geometry, and the label a problem states its shape in
def _out(size, k, s, p):
    return tuple((n + 2 * p - k) // s + 1 for n in size)


def _label(n, c, size, k, s, p, c_out=None) -> str:
    """The shape as a reader wants it: ``N8 C64 32×32 k3 p1 s1`` (``C16→32`` when channels change)."""
    chans = f"C{c}" if c_out is None else f"C{c}→{c_out}"
    return f"N{n} {chans} {'×'.join(map(str, size))} k{k} p{p} s{s}"


@dataclass
class Provider:
    """One implementation: ``fn(*inputs) -> output``; ``ndims`` it supports; ``full_only`` for slow
    extras (compiling) that only ``--full`` runs; ``cuda_only`` for what needs a GPU; ``overhead`` for
    those timed on the overhead problems too (convzoo and the one peer each op's call is held against);
    ``cpu_name``, when set, the name its rows carry on a CPU (where an op runs a path of its own that the
    rows must say they time, such as masked_conv's ``convzoo (CPU path)``)."""

    name: str
    fn: Callable
    ndims: tuple = (1, 2, 3)
    full_only: bool = False
    cuda_only: bool = False
    overhead: bool = False  # also timed on the overhead problems
    cpu_name: str = ""

    def label(self, device: torch.device) -> str:
        """The provider column of its rows on ``device``."""
        return self.cpu_name if self.cpu_name and torch.device(device).type == "cpu" else self.name

    def runs(self, problem: Problem, device: torch.device, full: bool) -> bool:
        return problem.ndim in self.ndims and not (self.full_only and not full) and \
            not (self.cuda_only and device.type != "cuda") and (self.overhead or not problem.overhead) and \
            self.name not in problem.skip


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
    timer: str
    op: str
    shape: str
    mode: str
    dtype: str
    provider: str
    ms_p50: float
    ms_p20: float
    ms_p80: float
    samples: int
    gb_per_s: float
    pct_copy_bw: float
    tflop_per_s: float
    pct_matmul_peak: float
    peak_mib: float
    speedup: float = field(default=float("nan"))
    noisy: str = ""

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# ---------------------------------------------------------------------------------------------- timing
def default_timer(device: torch.device, threads: int | None = None, min_run_time: float = 0.2):
    """``do_bench`` on CUDA, ``torch.utils.benchmark`` (``threads`` threads) on CPU."""
    return timing.CudaTimer() if device.type == "cuda" else timing.CpuTimer(threads, min_run_time)


def measure_limits(device: torch.device, dtype: torch.dtype, timer=None) -> Limits:
    """Measure a large device-to-device copy and a large matmul on ``device``."""
    timer = timer or default_timer(device)
    if device.type == "cuda":
        n_bytes, n = 1 << 30, 8192
    else:
        n_bytes, n = 1 << 26, 1024
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms = timing.quantiles(timer(lambda: dst.copy_(src)))[0]
    mm_dtype = dtype if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    mm_ms = timing.quantiles(timer(lambda: a @ b))[0]
    return Limits(2 * n_bytes / (copy_ms * 1e-3), 2 * n**3 / (mm_ms * 1e-3), str(mm_dtype).replace("torch.", ""))


# ---------------------------------------------------------------------------------------------- running
def call(problem: Problem, provider: Provider, mode: str, device, dtype) -> Callable[[], object]:
    """A zero-argument callable doing ``mode`` of ``provider`` on fresh inputs of ``problem``."""
    inputs = problem.make(device, dtype, mode not in ("fwd", "call"))
    if mode in ("fwd", "call", "call+grad"):
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


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else the platform's word for it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {cpu_model()} x{os.cpu_count()} (plain-torch paths)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "device": name,
            "torch": torch.__version__, "triton": triton_version, "git_sha": git_sha()}


def jobs(problems: Sequence[Problem], providers: dict[str, Sequence[Provider]], modes: Sequence[str],
         device: torch.device, full: bool = False) -> list[tuple[Problem, str, list[Provider]]]:
    """What :func:`run` times: (problem, mode, the providers that run it), in order."""
    out = []
    for problem in problems:
        chosen = OVERHEAD_MODES if problem.overhead else modes
        if not problem.differentiable:  # nothing to differentiate, and no input that requires grad
            chosen = [m for m in chosen if m in ("fwd", "call")]
        for mode in chosen:
            provs = [p for p in providers[problem.op] if p.runs(problem, device, full)]
            if provs:
                out.append((problem, mode, provs))
    return out


@contextlib.contextmanager
def compile_guard(limit: int = 256):
    """Room for one compiled graph per (shape, requires_grad) of the compiled peers, and an error, not a
    silent fall back to eager code under a "compile(...)" label, should a run ever exceed it."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
        yield


@compile_guard()
def run(problems: Sequence[Problem], providers: dict[str, Sequence[Provider]], modes: Sequence[str],
        device: torch.device, dtype: torch.dtype, limits: Limits, full: bool = False, rounds: int = 3,
        timer=None, overhead_timer=None, load: timing.ForeignLoad | None = None, memory: bool = True,
        progress: Callable[[str], None] | None = print, env: dict | None = None,
        max_minutes: float | None = None, on_rows: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Time every (problem, mode) for all its providers in ``rounds`` interleaved rounds; fill in the
    derived metrics, speedups and noise marks.

    ``timer(fn) -> [ms, ...]`` (one round; default :func:`default_timer`) times the problems,
    ``overhead_timer`` the overhead problems (default: the CPU timer, one thread, on every device); ``load``
    measures other processes' CPU use (default :class:`timing.ForeignLoad`); ``progress`` gets one line
    per timed row; ``env`` is :func:`environment`'s record for ``device`` when the caller has it
    already. With ``max_minutes``, no new (problem, mode) starts after that many minutes. ``on_rows``
    gets each (problem, mode)'s rows as soon as they are timed (the CLI appends them to the CSV then, so
    a run that is stopped keeps what it timed). It runs under :func:`compile_guard`.
    """
    env = env or environment(device)
    timer = timer or default_timer(device)
    overhead_timer = overhead_timer or timing.CpuTimer(1, 0.2)
    load = load or timing.ForeignLoad()
    e = torch.empty((), dtype=dtype).element_size()
    todo = jobs(problems, providers, modes, device, full)
    n_rows, rows, t0 = sum(len(p) for *_, p in todo), [], time.perf_counter()
    told = set()
    for problem, mode, provs in todo:
        if max_minutes is not None and rows and time.perf_counter() - t0 > 60 * max_minutes:
            if progress:
                progress(f"# --max-minutes {max_minutes:g} reached: {n_rows - len(rows)} rows not timed")
            break
        if progress and id(problem) not in told:  # once per problem, not per mode
            told.add(id(problem))
            names = {p.name for p in providers[problem.op]}
            for name, why in problem.skip.items():
                if name in names:
                    progress(f"# {name} not run on {problem.op} {problem.label}: {why}")
        fns = [call(problem, p, mode, device, dtype) for p in provs]
        clock = overhead_timer if problem.overhead else timer
        samples = [[] for _ in provs]
        for fn in fns:  # compile / JIT / first-touch before the clock and the load meter start
            fn()
        load.start()
        for _ in range(rounds):
            for s, fn in zip(samples, fns):
                s += clock(fn)
        foreign = load.stop()
        group = []
        for prov, fn, s in zip(provs, fns, samples):
            p50, p20, p80 = timing.quantiles(s)
            peak = peak_bytes(fn, device) / 2**20 if memory else float("nan")
            work = "fwd" if problem.overhead else mode  # an eager call does a forward's work
            nbytes, flops = problem.bytes(work, e), problem.flops(work)
            sec = p50 * 1e-3
            arith = not problem.moves_data_only
            group.append(Row(
                **env, timer=getattr(clock, "name", "custom"), op=problem.op, shape=problem.label, mode=mode,
                dtype=str(dtype).replace("torch.", ""), provider=prov.label(device), ms_p50=p50, ms_p20=p20, ms_p80=p80,
                samples=len(s), gb_per_s=nbytes / sec / 1e9, pct_copy_bw=100 * nbytes / sec / limits.copy_bytes_per_s,
                tflop_per_s=flops / sec / 1e12 if arith else float("nan"),
                pct_matmul_peak=100 * flops / sec / limits.matmul_flops_per_s if arith else float("nan"),
                peak_mib=peak, noisy=timing.noise(p20, p80, foreign)))
            if progress:
                r = group[-1]
                progress(f"[{len(rows) + len(group):>3}/{n_rows}] {problem.op:<10} {problem.label:<28} {mode:<9} "
                         f"{r.provider:<16} {_time(r, 'p50'):>10}" + (f"  noisy: {r.noisy}" if r.noisy else ""))
        base = next((r.ms_p50 for r, prov in zip(group, provs) if prov.name == "convzoo"), None)
        for r in group:
            r.speedup = r.ms_p50 / base if base else float("nan")
        rows += group
        if on_rows:
            on_rows(group)
    return rows


# ---------------------------------------------------------------------------------------------- output
def _time(r: Row, q: str) -> str:
    ms = getattr(r, f"ms_{q}")
    return f"{ms * 1e3:.1f} µs" if r.mode in OVERHEAD_MODES else f"{ms:.3f} ms"


def _num(v: float, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _groups(rows: Sequence[Row]) -> list[tuple[str, str, list[Row]]]:
    """(title, legend, rows) per op, overhead rows in a table of their own at the end."""
    out = []
    for op in dict.fromkeys(r.op for r in rows if r.mode not in OVERHEAD_MODES):
        op_rows = [r for r in rows if r.op == op and r.mode not in OVERHEAD_MODES]
        arith = any(not math.isnan(r.tflop_per_s) for r in op_rows)
        what = ("FLOPs matter: TFLOP/s and % of the measured matmul peak, GB/s and % of the measured copy "
                "bandwidth beside them" if arith else
                "data movement: GB/s and % of the measured copy bandwidth")
        out.append((f"{op} ({what})", SPEEDUP_LEGEND, op_rows))
    over = [r for r in rows if r.mode in OVERHEAD_MODES]
    if over:
        out.append(("host overhead: one eager call on a tiny shape, µs (call: inputs without grad; call+grad: "
                    "inputs requiring grad, forward only)", SPEEDUP_LEGEND, over))
    return out


def _table(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    overhead = rows[0].mode in OVERHEAD_MODES
    arith = any(not math.isnan(r.tflop_per_s) for r in rows)
    unit = "µs" if overhead else "ms"
    head = ["shape", "mode", "provider", f"p50 {unit}", f"p20 {unit}", f"p80 {unit}"]
    if not overhead:
        head += ["TFLOP/s", "% matmul"] if arith else []
        head += ["GB/s", "% copy BW", "peak MiB"]
    head += ["speedup", "noisy"]
    body = []
    for r in rows:
        scale, fmt = (1e3, ".1f") if overhead else (1.0, ".3f")
        b = [r.shape, r.mode, r.provider] + [format(getattr(r, f"ms_{q}") * scale, fmt) for q in ("p50", "p20", "p80")]
        if not overhead:
            b += [_num(r.tflop_per_s, ".3f"), _num(r.pct_matmul_peak, ".1f")] if arith else []
            b += [_num(r.gb_per_s, ".2f"), _num(r.pct_copy_bw, ".1f"), _num(r.peak_mib, ".1f")]
        b += [_num(r.speedup, ".2f") + "x", "noisy" if r.noisy else ""]
        body.append(b)
    return head, body


def format_table(rows: Sequence[Row], markdown: bool = False, notes: dict[str, str] | None = None) -> str:
    """One table per op (the overhead rows in their own), each with a title and the legend under it, and
    under that the op's line in ``notes`` (op -> text, e.g. :data:`convzoo.tools.bench.ops.NOTES`), if any."""
    parts = []
    for title, legend, group in _groups(rows):
        head, body = _table(group)
        note = (notes or {}).get(group[0].op) if group[0].mode not in OVERHEAD_MODES else None
        if markdown:
            lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(b) + " |" for b in body]
            lines += ["", legend + "."] + (["", note] if note else [])
        else:
            widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
            fmt = "  ".join(f"{{:<{w}}}" if i < 3 or h == "noisy" else f"{{:>{w}}}"
                            for i, (w, h) in enumerate(zip(widths, head)))
            lines = [f"## {title}", fmt.format(*head).rstrip()] + [fmt.format(*b).rstrip() for b in body]
            lines += [legend + "."] + ([note] if note else [])
        parts.append("\n".join(lines))
    noisy = [r for r in rows if r.noisy]
    if noisy:
        parts.append(f"{len(noisy)} of {len(rows)} rows are noisy (spread p80/p20 > {timing.SPREAD_BOUND} or other "
                     f"processes busy on more than {timing.load_bound():.1f} CPUs while timed); their reasons are "
                     "in the CSV's `noisy` column. Rerun them on a quiet machine before trusting them.")
    return "\n\n".join(parts)


def device_slug(device_name: str) -> str:
    from convzoo.autotune import device_slug as slug

    return slug(device_name.split(" (")[0])


def append_csv(path: Path, rows: Sequence[Row]) -> Path | None:
    """Append rows (with a header when the file is new). A file written with other columns (an older
    schema, or not a CSV of ours at all) is moved aside first, to ``<name>.old-<n>.csv``; its new path is
    returned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    moved = None
    if path.exists() and path.stat().st_size:
        with path.open(newline="", errors="replace") as f:
            header = next(csv.reader(f.read(1 << 16).replace("\0", "").splitlines()), [])
        if header != Row.columns():
            n = 1
            while (moved := path.with_name(f"{path.stem}.old-{n}.csv")).exists():
                n += 1
            path.rename(moved)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=Row.columns())
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    return moved


def check_outputs(folder: Path, slug: str) -> None:
    """What a run will write under ``folder`` can be written: the CSV and markdown are files (or absent),
    the plot folder a folder (or absent). Checked before any timing, not after minutes of it.

    Raises:
        ValueError: one of them is in the way, naming it.
    """
    for path, kind in ((folder / f"{slug}.csv", "file"), (folder / f"{slug}.md", "file"), (folder / slug, "dir")):
        if path.exists() and (path.is_dir() != (kind == "dir")):
            raise ValueError(f"{path} is a {'folder' if path.is_dir() else 'file'}; the bench writes a {kind} there")
        if path.exists() and not os.access(path, os.W_OK):
            raise ValueError(f"{path} cannot be written")


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_markdown(path: Path, rows: Sequence[Row], limits: Limits, run_label: str,
                   notes: dict[str, str] | None = None) -> None:
    r0 = rows[0]
    text = (f"# convzoo bench: {r0.device}\n\n"
            f"{run_label} run of {r0.date}, torch {r0.torch}, triton {r0.triton or '-'}, git {r0.git_sha or '-'}, "
            f"{r0.dtype}; timers: {', '.join(dict.fromkeys(r.timer for r in rows))}. "
            f"Measured limits: copy {limits.copy_bytes_per_s / 1e9:.1f} GB/s, "
            f"matmul {limits.matmul_flops_per_s / 1e12:.2f} TFLOP/s ({limits.dtype}). '% copy BW' is the bytes the "
            f"op must move over the p50 time, against the measured copy; '% matmul' its FLOPs against the measured "
            f"matmul. A row is noisy when p80/p20 > {timing.SPREAD_BOUND} or other processes kept more than "
            f"{timing.load_bound():.1f} CPUs busy while it was timed.\n\n"
            + format_table(rows, markdown=True, notes=notes) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_plots(folder: Path, rows: Sequence[Row]) -> list[Path]:
    """One PNG per op: p50 time per shape, one bar per provider with its p20–p80 spread as an error bar,
    one panel per mode (log scale); dtype and device in the title."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # they show the latest run: an op it did not time has no plot
        old.unlink()
    paths = []
    for _, _, op_rows in _groups(rows):
        op = op_rows[0].op if op_rows[0].mode not in OVERHEAD_MODES else "overhead"
        overhead = op == "overhead"
        unit, scale = ("µs", 1e3) if overhead else ("ms", 1.0)
        modes = list(dict.fromkeys(r.mode for r in op_rows))
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            mrows = [r for r in op_rows if r.mode == mode]
            shapes = list(dict.fromkeys((r.op, r.shape) if overhead else r.shape for r in mrows))
            provs = list(dict.fromkeys(r.provider for r in mrows))
            width = 0.8 / len(provs)
            for j, prov in enumerate(provs):
                xs, ys, lo, hi = [], [], [], []
                for i, s in enumerate(shapes):
                    for r in mrows:
                        if ((r.op, r.shape) if overhead else r.shape) == s and r.provider == prov:
                            xs.append(i + j * width)
                            ys.append(r.ms_p50 * scale)
                            lo.append((r.ms_p50 - r.ms_p20) * scale)
                            hi.append((r.ms_p80 - r.ms_p50) * scale)
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=prov)
            names = [f"{s[0]}\n{s[1]}" if overhead else s.replace(" k", "\nk") for s in shapes]
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], names, fontsize=6)
            ax.set_yscale("log")
            ax.set_xlabel("shape")
            ax.set_ylabel(f"time per call, {unit} (p50, bars p20–p80; lower is better)", fontsize=7)
            ax.set_title(f"{op} {mode}", fontsize=9)
        axes[0][0].legend(fontsize=7)
        r0 = op_rows[0]
        fig.suptitle(f"{op}: {r0.dtype} on {r0.device} ({r0.timer})", fontsize=9)
        fig.tight_layout()
        path = folder / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
