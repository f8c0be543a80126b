"""``convzoo-gpu-check --static`` (or ``python -m convzoo.tools.static_report``): how every kernel will run on an
H100, read from the compiler on a machine without a GPU.

For every registered kernel, each dtype it takes and its default config (what a user gets on a new GPU before
tuning) on representative problems (the tuning grids' layers), the kernel's own launcher runs with its real
arguments; the launch is turned into a compile for ``sm_90a`` (Triton's own specialisation: divisibility hints,
constexprs, dtypes, options), not a GPU launch. Then the ``ptxas`` bundled with Triton reports registers and
spills, and the SASS (``nvdisasm``, also bundled) is read: the tensor-core instruction, vectorised global
loads, and the innermost loop that holds the MMAs (or, for gather kernels, the global loads): instructions,
MMAs, local loads/stores per iteration, and

* ``issue_bound`` — the tensor cores' cycles for that iteration's MMAs (H100 per SM per clock: 4,096 FLOP
  fp16/bf16, 2,048 tf32, 128 fp64) over the schedulers' ``warps × instructions / 4`` cycles, capped at 1: the
  fraction of tensor-core peak the loop can reach at best;
* ``hbm_bound`` (loops without MMAs) — the bytes the loop's global loads and stores move per issue cycle on 132
  SMs at 1.755 GHz, over the H100's 3.35 TB/s, capped at 1.

Occupancy (blocks and warps per SM) follows from registers (65,536 per SM, allocated per warp in 256s), shared
memory (228 KB per SM, 227 KB per block, 1 KB reserved per block), 64 warps and 32 blocks per SM.

A row per (kernel, dtype, config, problem); Triton's tutorial matmul (128×128×64, 8 warps, fp16) is the
calibration row (issue bound 1.0). :data:`EXCEPTIONS` lists the known, justified breaks of the gate's rules
(spills, no tensor cores on a 16-bit ``tl.dot`` kernel, fewer than 8 warps per SM), each with its reason; the CI
test fails on any break not listed there.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

STATIC_CSV, STATIC_MD = "static.csv", "static.md"
DTYPES = ("float16", "bfloat16", "float32", "float64")
# per SM per clock, by MMA input kind
TC_FLOP_PER_CLOCK = {"f16": 4096, "tf32": 2048, "f64": 128}
H100 = {"regs": 65536, "smem": 228 * 1024, "smem_block": 227 * 1024, "smem_reserved": 1024, "warps": 64,
        "blocks": 32, "sms": 132, "clock_ghz": 1.755, "hbm_tbs": 3.35}
DOT_KERNELS = {"local_conv_fwd", "local_conv_grad_weight", "local_conv_grad_input", "patch_covariance",
               "masked_conv_fwd", "masked_conv_grad_weight", "masked_conv_grad_input", "coactivation_correlation",
               "ekfac"}
# The known breaks of the gate's rules, (kernel, rule) -> reason; rule in spills / no_tensor_cores / low_warps.
# Issue "No spills, Hopper tensor cores fed" rewrites these loops; each entry goes when its kernel is fixed.
_HOT_LOOP = "per-element gather index math in the hot loop (issue: No spills, Hopper tensor cores fed)"
EXCEPTIONS = {
    # fp32 (no tensor cores), the 64 × 64 block: 40 bytes of spill stores under triton 3.8 on conv3_x, conv5_x,
    # cifar_conv2 and local_2d (none under 3.6, none with local_2d_b256's 32-row block)
    ("coactivation_correlation", "spills"): _HOT_LOOP + "; fp32 with the 64 × 64 block under triton 3.8",
}
FIELDS = ("kernel", "dtype", "config", "problem", "arch", "registers", "spill_stores", "spill_loads", "shared",
          "local", "blocks_per_sm", "warps_per_sm", "tensor_cores", "vector_loads", "loop_instructions",
          "loop_mmas", "loop_local", "issue_bound", "hbm_bound", "breaks", "exception")


# ---------------------------------------------------------------------------------------------- SASS reading
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def parse_sass(text: str) -> list[dict]:
    """``nvdisasm -c`` output as instructions ``{addr, op, args, label}`` (``label``: the label it carries)."""
    out, pending = [], []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSN.search(line)
        if m:
            out.append({"addr": int(m.group(1), 16), "op": m.group(3), "args": m.group(4), "labels": pending})
            pending = []
    return out


def _mma_flops(insn: dict, num_warps: int) -> tuple[int, str] | None:
    """FLOP of one block's execution of MMA instruction ``insn`` and its kind, or None if it is no MMA."""
    op = insn["op"]
    if op.startswith("HGMMA"):  # wgmma: one instruction per warpgroup computes 64×N×K
        m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
        if not m:
            return None
        mm, nn, kk = map(int, m.groups())
        kind = "tf32" if "TF32" in op else "f16"
        return 2 * mm * nn * kk * max(num_warps // 4, 1), kind
    if op.startswith(("HMMA", "DMMA")):  # mma.sync: one instruction per warp computes m×n×k
        m = re.match(r"[HD]MMA\.(\d\d)(\d)(\d+)", op)
        if not m:
            return None
        mm, nn, kk = map(int, m.groups())
        kind = "f64" if op.startswith("DMMA") else ("tf32" if "TF32" in op else "f16")
        return 2 * mm * nn * kk * num_warps, kind
    return None


_GLOBAL_BYTES = re.compile(r"^(LDG|STG|LDGSTS)(?:\.[A-Z0-9_]+)*")


def _global_bytes(op: str) -> int:
    """Bytes per thread one global load/store moves (0 for anything else)."""
    if not _GLOBAL_BYTES.match(op):
        return 0
    for width, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if width in op:
            return size
    return 4


def _loops(insns: list[dict]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every loop: a branch back to a label at or before it."""
    where = {label: i for i, insn in enumerate(insns) for label in insn["labels"]}
    loops = []
    for i, insn in enumerate(insns):
        if insn["op"].startswith("BRA"):
            m = _TARGET.search(insn["args"])
            if m and where.get(m.group(1), i + 1) <= i:
                loops.append((where[m.group(1)], i))
    return loops


def hot_loop(insns: list[dict], num_warps: int) -> dict:
    """The innermost loop holding MMAs (else the innermost holding global loads; else the whole kernel) and what
    it costs: instructions, MMAs and local loads/stores per iteration, the issue and HBM bounds."""
    loops = _loops(insns)

    def inner(pred):
        held = [(b - a, a, b) for a, b in loops if any(pred(x) for x in insns[a:b + 1])]
        return min(held)[1:] if held else None

    span = (inner(lambda x: _mma_flops(x, num_warps) is not None)
            or inner(lambda x: x["op"].startswith(("LDG", "LDGSTS"))) or (0, len(insns) - 1))
    body = insns[span[0]:span[1] + 1]
    mmas = [f for f in (_mma_flops(x, num_warps) for x in body) if f is not None]
    issue_cycles = num_warps * len(body) / 4
    row = {"loop_instructions": len(body), "loop_mmas": len(mmas),
           "loop_local": sum(x["op"].startswith(("LDL", "STL")) for x in body), "issue_bound": "", "hbm_bound": ""}
    if mmas:
        tc_cycles = sum(flops / TC_FLOP_PER_CLOCK[kind] for flops, kind in mmas)
        row["issue_bound"] = round(min(1.0, tc_cycles / issue_cycles), 3)
    else:
        moved = sum(_global_bytes(x["op"]) for x in body) * 32 * num_warps  # bytes per block-iteration
        per_s = moved / issue_cycles * H100["sms"] * H100["clock_ghz"] * 1e9
        row["hbm_bound"] = round(min(1.0, per_s / (H100["hbm_tbs"] * 1e12)), 3)
    return row


def tensor_cores(insns: list[dict]) -> str:
    ops = {x["op"].split(".")[0] for x in insns}
    return "wgmma" if "HGMMA" in ops else "mma.sync" if ops & {"HMMA", "DMMA"} else "none"


def vector_loads(insns: list[dict]) -> bool:
    return any(_global_bytes(x["op"]) >= 8 and x["op"].startswith(("LDG", "LDGSTS")) for x in insns)


def occupancy(registers: int, shared: int, num_warps: int) -> tuple[int, int]:
    """Blocks and warps per SM on an H100."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = H100["regs"] // (per_warp * num_warps)
    by_smem = H100["smem"] // (shared + H100["smem_reserved"]) if shared else H100["blocks"]
    blocks = max(0, min(H100["blocks"], by_regs, by_smem, H100["warps"] // num_warps))
    if shared > H100["smem_block"]:
        blocks = 0
    return blocks, blocks * num_warps


# ---------------------------------------------------------------------------------------------- the tools
def _bin(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not bundled with this triton ({path})")
    return str(path)


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def ptxas_info(ptx: str, arch: str, work: Path) -> dict:
    """Registers, spill bytes and local memory (stack frame) from ``ptxas -v`` on ``ptx``."""
    src = work / "k.ptx"
    src.write_text(ptx)
    ptxas = os.environ.get("TRITON_PTXAS_PATH") or _bin("ptxas")
    out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(src), "-o", str(work / "k.o")],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr[-2000:]}")
    m, r = _PTXAS.search(out.stderr), _REGS.search(out.stderr)
    return {"registers": int(r.group(1)) if r else 0, "local": int(m.group(1)) if m else 0,
            "spill_stores": int(m.group(2)) if m else 0, "spill_loads": int(m.group(3)) if m else 0}


def sass(cubin: bytes, work: Path) -> str:
    path = work / "k.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([_bin("nvdisasm"), "-c", str(path)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {out.stderr[-2000:]}")
    return out.stdout


# ---------------------------------------------------------------------------------------------- capturing launches
class _Sm90Driver:
    """Just enough of a Triton driver for a launcher's ``kernel[grid](...)`` to compile for a target."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


def capture_launches(capability: int = 90):
    """Patch Triton so that every launch compiles for ``sm_<capability>`` and is not run; returns the list the
    compiled launches are appended to, as ``(JITFunction, CompiledKernel)``. For a fresh process with
    ``TRITON_INTERPRET`` unset (real ``JITFunction``s)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    import convzoo.autotune as autotune

    driver.set_active(_Sm90Driver(capability))
    launches = []
    original = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append((self, kernel))
        return kernel

    JITFunction.run = compile_only
    # the launchers' device check takes CPU tensors (the kernels are real JITFunctions, so bf16 is not widened);
    # the config lookup still answers as on a GPU before tuning: the heuristic default
    autotune.interpret_mode = lambda: True
    return launches


# the tuning grids' layers the full report compiles for (those a kernel serves): a ResNet stage at 28² and at 7²
# (few programs), a CIFAR KFAC layer, the two locally connected maps; the quick report takes the first served
REPRESENTATIVE = ("conv3_x", "conv5_x", "cifar_conv2", "local_2d", "local_2d_b256")


def _problems(spec, quick: bool):
    from convzoo.autotune.grids import GRIDS

    served = {layer.name: layer for layer in GRIDS["all"] if layer.kernels is None or spec.name in layer.kernels}
    layers = [served[name] for name in REPRESENTATIVE if name in served] or list(served.values())[:1]
    return layers[:1] if quick else layers


def _dtypes(spec, quick: bool) -> Iterable[str]:
    return ("float16", "float32") if quick else DTYPES


def rows(quick: bool = False, kernels: Iterable[str] | None = None, arch: int = 90) -> list[dict]:
    """Every row of the report (see the module docstring)."""
    import torch

    launches = capture_launches(arch)
    from convzoo import autotune
    from convzoo import kernels as kernel_modules

    kernel_modules.load_all()
    from convzoo import _compat

    if any(_compat.interpreted(spec.kernel) for spec in autotune.registered().values()):
        raise RuntimeError("the kernels were decorated under TRITON_INTERPRET=1: run the report in a fresh process "
                           "without it")
    work = Path(tempfile.mkdtemp(prefix="convzoo-static-"))
    out, seen = [calibration(arch, work, launches)], set()
    for name, spec in sorted(autotune.registered().items()):
        if (kernels is not None and name not in kernels) or spec.problem is None:
            continue
        for dtype_name in _dtypes(spec, quick):
            dtype = getattr(torch, dtype_name)
            for layer in _problems(spec, quick):
                try:
                    problem = spec.problem(layer, dtype, torch.device("cpu"))
                except (ValueError, TypeError, NotImplementedError):
                    continue  # the kernel does not take this dtype or layer
                if problem is None:
                    continue
                config = spec.default_config(problem.dims, dtype, False)
                del launches[:]
                run, _ = problem.setup()
                run(config)
                for fn, compiled in launches:
                    if id(compiled) in seen:
                        continue
                    seen.add(id(compiled))
                    kernel = name if fn is spec.kernel else fn.__name__.removesuffix("_kernel")
                    out.append(_row(kernel, dtype_name, config, layer.name, arch, compiled, work))
                    print(f"  {kernel} {dtype_name} {layer.name}: {out[-1]['breaks'] or 'ok'}", file=sys.stderr,
                          flush=True)
    return out


def _row(kernel: str, dtype: str, config, problem: str, arch: int, compiled, work: Path) -> dict:
    num_warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared
    info = ptxas_info(compiled.asm["ptx"], f"sm_{arch}a" if arch == 90 else f"sm_{arch}", work)
    insns = parse_sass(sass(compiled.asm["cubin"], work))
    blocks, warps = occupancy(info["registers"], shared, num_warps)
    row = {"kernel": kernel, "dtype": dtype, "problem": problem, "arch": f"sm_{arch}",
           "config": config if isinstance(config, str) else
           f"{dict(config.meta)} w{config.num_warps} s{config.num_stages}",
           **info, "shared": shared, "blocks_per_sm": blocks, "warps_per_sm": warps,
           "tensor_cores": tensor_cores(insns), "vector_loads": vector_loads(insns), **hot_loop(insns, num_warps)}
    row["breaks"] = " ".join(breaks(row))
    row["exception"] = "; ".join(sorted({EXCEPTIONS[(kernel, b)] for b in breaks(row) if (kernel, b) in EXCEPTIONS}))
    return row


def breaks(row: dict) -> list[str]:
    """The gate's rules this row breaks: ``spills``, ``no_tensor_cores`` (a 16-bit ``tl.dot`` kernel without),
    ``low_warps`` (fewer than 8 active warps per SM)."""
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append("spills")
    if row["kernel"] in DOT_KERNELS and row["dtype"] in ("float16", "bfloat16") and row["tensor_cores"] == "none":
        out.append("no_tensor_cores")
    if row["warps_per_sm"] < 8:
        out.append("low_warps")
    return out


def unexcused(rows_: Iterable[dict]) -> list[dict]:
    """The rows that break a rule :data:`EXCEPTIONS` does not excuse."""
    return [r for r in rows_ if any((r["kernel"], b) not in EXCEPTIONS for b in breaks(r))]


def calibration(arch: int, work: Path, launches: list) -> dict:
    """Triton's tutorial matmul, 128×128×64 tiles, 8 warps, 3 stages, fp16, compiled the same way."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def tutorial_matmul(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                        stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(tl.float16), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    a = torch.empty(4096, 4096, dtype=torch.float16)
    c = torch.empty_like(a)
    del launches[:]
    tutorial_matmul[(32, 32)](a, a, c, 4096, 4096, 4096, 4096, 1, 4096, 1, 4096, 1, BLOCK_M=128, BLOCK_N=128,
                              BLOCK_K=64, num_warps=8, num_stages=3)
    (_, compiled), = launches
    return _row("calibration_tutorial_matmul", "float16", "{'BLOCK_M': 128, 'BLOCK_N': 128, 'BLOCK_K': 64} w8 s3",
                "4096^3", arch, compiled, work)


# ---------------------------------------------------------------------------------------------- output
def write(rows_: list[dict], folder: Path, title: str = "") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = folder / STATIC_CSV, folder / STATIC_MD
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for r in rows_:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    cols = ("kernel", "dtype", "problem", "config", "registers", "spill_stores", "shared", "warps_per_sm",
            "tensor_cores", "vector_loads", "loop_instructions", "loop_mmas", "loop_local", "issue_bound",
            "hbm_bound", "breaks")
    lines = [f"# Static sm_90 report{f' — {title}' if title else ''}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows_]
    used = {(r["kernel"], b) for r in rows_ for b in breaks(r)}
    lines += ["", "Exceptions (known breaks of the gate's rules, each with its reason):", ""]
    lines += [f"- `{k}` {rule}: {why}{'' if (k, rule) in used else ' (not hit in this run)'}"
              for (k, rule), why in sorted(EXCEPTIONS.items())]
    bad = unexcused(rows_)
    lines += ["", f"Unexcused breaks: {len(bad)}"] + [f"- {r['kernel']} {r['dtype']} {r['problem']}: {r['breaks']}"
                                                     for r in bad]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="convzoo-gpu-check --static", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for static.csv and static.md")
    ap.add_argument("--quick", action="store_true", help="fp16 and fp32 on one problem per kernel (the CI gate)")
    ap.add_argument("--kernels", nargs="+", default=None, help="only these registered kernels")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # the kernels must be decorated as real JITFunctions: a fresh process without the interpreter
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "convzoo.tools.static_report", *argv], env=env).returncode
    import triton

    result = rows(args.quick, args.kernels)
    csv_path, md_path = write(result, args.out, f"triton {triton.__version__}")
    bad = unexcused(result)
    print(f"{len(result)} rows -> {csv_path}, {md_path}; unexcused breaks: {len(bad)}")
    for r in bad:
        print(f"  {r['kernel']} {r['dtype']} {r['problem']}: {r['breaks']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
