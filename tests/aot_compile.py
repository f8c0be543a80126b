"""Compile every registered kernel ahead of time for real NVIDIA targets, without a GPU.

Run as a script with ``TRITON_INTERPRET=0`` (kernels must be real ``JITFunction``s): for each kernel,
dtype and config it builds the Triton → PTX → cubin pipeline with the bundled ``ptxas`` for
``sm_90`` (H100; the fp16 defaults also for ``sm_80``, A100), and prints one JSON line per compile:
whether it compiled, its shared memory, and whether a ``tl.dot`` kernel got tensor-core instructions. The interpreter
never lowers a kernel, so this is what catches code that only the GPU compiler rejects.
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from convzoo import autotune, kernels

kernels.load_all()  # registers every kernel's autotune spec

TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
DOT_KERNELS = {"local_conv_fwd", "local_conv_grad_weight", "local_conv_grad_input", "patch_covariance",
               "masked_conv_fwd", "masked_conv_grad_weight", "masked_conv_grad_input", "coactivation_correlation",
               "ekfac"}
# lookup dims per kernel (default: 256 each). masked_conv's BLOCK_O × BLOCK_K is the tile lists' block, a
# lookup dim (BO, BK), not a config entry: compiled for a small, the tuner's and the largest block
# (the grad-weight's M 4096: its default then splits, SPLIT > 1)
DIMS = {"masked_conv_fwd": [{"M": 256, "O": 256, "K": 256, "BO": bo, "BK": bk}
                            for bo, bk in ((32, 32), (64, 64), (128, 128))],
        "masked_conv_grad_weight": [{"M": 4096, "O": 256, "K": 256, "BO": bo, "BK": bk}
                                    for bo, bk in ((32, 32), (64, 64), (128, 128))]
        # the plane walk (PLANE: BL positions of a plane per sample, at most BLOCK_M): one sample per step, and
        # (a 32-position plane) several
        + [{"M": 4096, "O": 256, "K": 256, "BO": 64, "BK": 64, "PLANE": 128},
           {"M": 4096, "O": 256, "K": 256, "BO": 32, "BK": 64, "PLANE": 32}],
        "masked_conv_grad_input": [{"M": 256, "C": 256, "K": 256, "BO": bo, "BK": bk}
                                   for bo, bk in ((32, 32), (64, 64), (128, 128))]}
# tile constexprs that come from the dims, not from the config
FIXED_TILES = {name: (lambda dims: {"BLOCK_O": dims["BO"], "BLOCK_K": dims["BK"]})
               for name in ("masked_conv_fwd", "masked_conv_grad_weight", "masked_conv_grad_input")}
FIXED_TILES["masked_conv_grad_weight"] = lambda dims: {"BLOCK_O": dims["BO"], "BLOCK_K": dims["BK"],
                                                       "PLANE": "PLANE" in dims, "BL": dims.get("PLANE", 1)}
# masked_conv's tap walk (C/G = 256: SUB = BK, what the launchers pick) with int32 offsets and positions, 2-d
# (DIMS), a packed channels-last dY (DY_FLAT): the specialisation a ResNet layer's launch gets
TAP_WALK = {"SUB": None, "NARROW": True, "OFF32": True, "POS32": True, "DIMS": 2, "DY_FLAT": True}
# patch_covariance's channels per (tap, channel block) pair come from the group's channels (the launcher's): 16 ≤ any
# BLOCK_D compiles the several-taps-per-tile path
FIXED_TILES["patch_covariance"] = lambda dims: {"BLOCK_C": 16}
# ekfac walks its patch rows the same way: 16 channels per pair is one tap per step at BLOCK_K 16 and two at 32;
# a second lookup-dims entry (ONE_TAP) takes BLOCK_C = BLOCK_K, one tap per step, every channel block full (FULL_C).
# 'zeros' (mode 0) walks the windows (WINDOW), reflect computes each step's sources: as the launcher picks
DIMS["ekfac"] = [{"O": 256, "D": 256, "L": 256, "N": 256, "G": 256},
                 {"O": 256, "D": 256, "L": 256, "N": 256, "G": 256, "ONE_TAP": 1}]
FIXED_TILES["ekfac"] = lambda dims: {"BLOCK_C": None if "ONE_TAP" in dims else 16, "FULL_C": "ONE_TAP" in dims}
# local_conv's forward: batch-last x with the row table (int32 math, 16-byte rows), C_out- and batch-major MMAs (a
# second lookup-dims entry with a small C_out), and (WIDE) the int64 rows of a batch-first x past 2^31, gathered as
# the newest Triton's launcher lays it
DIMS["local_conv_fwd"] = [{"N": 256, "O": 256, "R": 256}, {"N": 256, "O": 32, "R": 256},
                          {"N": 256, "O": 256, "R": 256, "WIDE": 1}]
FIXED_TILES["local_conv_fwd"] = lambda dims: {"GATHER_T": "WIDE" in dims, "NARROW": "WIDE" not in dims,
                                              "ROW_TABLE": "WIDE" not in dims, "ALIGN": 1 if "WIDE" in dims else 16,
                                              "N_MAJOR": dims["N"] > dims["O"]}
# fold_kernel serves fold (mode 2: its reflect candidate loops) and, TRANSPOSED, unfold_transpose's adjoint: each
# spec compiles its launcher's flag, not mode 2's
FIXED_TILES["fold"] = lambda dims: {"TRANSPOSED": False}
FIXED_TILES["unfold_transpose_backward"] = lambda dims: {"TRANSPOSED": True}
# unfold's gather (unfold and unfold_transpose): its int32 index math, positions × rows, and (a second lookup-dims
# entry, WIDE) the int64 one of a plane past 2^31, rows × positions (the launcher's orientation depends on Triton)
for _name in ("unfold", "unfold_transpose"):
    DIMS[_name] = [{"R": 256, "L": 256}, {"R": 256, "L": 256, "WIDE": 1}]
    FIXED_TILES[_name] = lambda dims: {"NARROW": "WIDE" not in dims, "POS_FIRST": "WIDE" not in dims}
# local_conv grad-input: the launcher picks the MMA orientation and the int32 deltas: the C_in-major, narrow one
FIXED_TILES["local_conv_grad_input"] = lambda dims: {"C_MAJOR": True, "NARROW": True}
# grad-weight: batch-last x, the C_out tile as the MMA's M and (a small C_out) the R tile
DIMS["local_conv_grad_weight"] = [{"O": 256, "R": 256, "N": 256}, {"O": 32, "R": 256, "N": 256}]
FIXED_TILES["local_conv_grad_weight"] = lambda dims: {"NARROW": True, "R_MAJOR": dims["O"] < 64, "ALIGN": 16}
# pointer arguments that are not of the data's dtype (masked_conv's tile lists, the grad-weight's byte mask,
# local_conv's row table)
INT_PTRS = {"count_ptr": "*i32", "index_ptr": "*i32", "mask_ptr": "*u8", "tab_ptr": "*i64"}
# runtime arguments that are floats (the grad-weight kernel's coactivation thresholds)
FLOAT_ARGS = {"x_threshold": "fp32", "y_threshold": "fp32"}
# a 2-d 3×3 geometry (leading unit depth), stride (2, 1), dilation (1, 2), padding 1
GEOMETRY = {"KS": (1, 3, 3), "ST": (1, 2, 1), "LO": (0, 1, 1), "HI": (0, 1, 1), "DIL": (1, 1, 2)}


def constexprs(fn, dtype, mode, cfg, fixed, has_bias=True):
    fp64 = dtype == torch.float64
    values = {**GEOMETRY, "MODE": mode, "NC": (1, 3, 3) if mode else (1, 1, 1),
              "HAS_BIAS": has_bias, "HAS_MASK": True, "BINARIZE": False, "TRANSPOSED": mode == 2, "READ_OUT": True,
              "FP64": fp64, "PRECISION": "tf32" if dtype == torch.float32 else "ieee",
              "UPCAST": False,  # bf16 reaches the tensor cores on a GPU (only the interpreter upcasts)
              "ACC_DTYPE": tl.float64 if fp64 else tl.float32, **TAP_WALK, "SUB": fixed.get("BLOCK_K"),
              "VEC": 16 // dtype.itemsize,  # x's rows 16-byte aligned (masked_conv grad-weight's launcher proves it)
              **cfg.meta,
              **fixed}
    values["BL"] = min(values.get("BL", 1), values.get("BLOCK_M", 1))  # the plane walk's BL: at most BLOCK_M
    if "BLOCK_C" in fixed and fixed["BLOCK_C"] is None:  # ekfac's one tap per step
        values["BLOCK_C"] = values["BLOCK_K"]
    values["WINDOW"] = mode == 0  # ekfac's window walk: 'zeros' (the geometry's 9 taps)
    return {p.name: values[p.name] for p in fn.params if p.is_constexpr}


def compile_one(spec, dtype, cfg, mode, arch, fixed, ones=False):
    """``ones``: every int argument is the constant 1, as Triton passes an int argument equal to 1 (a size or
    stride of 1 must compile: no ``.to`` on an argument)."""
    fn = spec.kernel
    const = constexprs(fn, dtype, mode, cfg, fixed)
    if ones:
        const.update({p.name: 1 for p in fn.params if not p.is_constexpr and not p.name.endswith("_ptr")
                      and p.name not in FLOAT_ARGS and p.name not in ("alpha", "coef")})
    sig = {p.name: "constexpr" if p.name in const else
           (INT_PTRS.get(p.name, f"*{TL[dtype]}") if p.name.endswith("_ptr") else FLOAT_ARGS.get(p.name, "i32"))
           for p in fn.params}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = k.asm["ptx"]
    return {"shared": k.metadata.shared, "mma": "mma" in ptx}


def main():
    results = []
    for name, spec in sorted(autotune.registered().items()):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            for dims in DIMS.get(name, [{d: 256 for d in spec.dims}]):
                fixed = FIXED_TILES[name](dims) if name in FIXED_TILES else {}
                configs = [spec.default_config(dims, dtype, False)]
                if dtype == torch.float16:  # the largest tiles the tuner may try, too
                    configs.append(max(spec.candidates(dims, dtype),
                                       key=lambda c: (math_prod(c.meta), c.num_stages)))
                # reflect: fold's and masked_conv_grad_input's candidate loops, masked_conv's gather; patch_covariance's
                # and unfold_transpose's mode 2 compiles their transposed gathers (TRANSPOSED = mode == 2)
                modes = (0, 2) if name in ("fold", "local_conv_grad_input", "patch_covariance", "masked_conv_fwd",
                                           "masked_conv_grad_weight", "masked_conv_grad_input",
                                           "unfold_transpose", "coactivation_correlation", "ekfac") else (0,)
                for i, cfg in enumerate(configs):
                    for arch in (90, 80) if i == 0 and dtype == torch.float16 else (90,):
                        for mode in modes:
                            row = {"kernel": name, "dtype": str(dtype), "config": cfg.to_json(), "fixed": fixed,
                                   "arch": arch, "mode": mode, "dot": name in DOT_KERNELS and dtype != torch.float64}
                            try:
                                row.update(compile_one(spec, dtype, cfg, mode, arch, fixed), ok=True)
                            except Exception as e:
                                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
                            results.append(row)
                            print(json.dumps(row), flush=True)
        # every int argument 1, once per kernel (fp16's default config, mode 0, sm_90)
        cfg = spec.default_config(DIMS.get(name, [{d: 256 for d in spec.dims}])[0], torch.float16, False)
        fixed = FIXED_TILES[name](DIMS.get(name, [{d: 256 for d in spec.dims}])[0]) if name in FIXED_TILES else {}
        row = {"kernel": name, "dtype": "torch.float16", "config": cfg.to_json(), "fixed": fixed, "arch": 90,
               "mode": 0, "ones": True, "dot": False}
        try:
            row.update(compile_one(spec, torch.float16, cfg, 0, 90, fixed, ones=True), ok=True)
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
        results.append(row)
        print(json.dumps(row), flush=True)
    return 0 if all(r["ok"] for r in results) else 1


def math_prod(meta):
    out = 1
    for v in meta.values():
        out *= v
    return out


if __name__ == "__main__":
    sys.exit(main())
