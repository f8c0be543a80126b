"""The static sm_90 report (``convzoo-gpu-check --static``): its SASS reading on hand-written SASS, its occupancy
and gate rules, and the gate itself — every kernel compiled through its launcher for sm_90a on this machine,
no spill / missing tensor cores / low occupancy that :data:`EXCEPTIONS` does not excuse."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from convzoo import autotune, kernels
from convzoo.tools import static_report as sr

_SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
.L_x_1:
        /*0020*/                   IMAD R8, R9, R10, RZ ;
        /*0030*/                   HGMMA.64x128x16.F32 R24, gdesc[UR4], R24 ;
        /*0040*/                   HGMMA.64x128x16.F32 R24, gdesc[UR8], R24, gsb0 ;
        /*0050*/                   LDL R11, [R1+0x10] ;
        /*0060*/                   ISETP.NE.AND P0, PT, R8, RZ, PT ;
        /*0070*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0080*/                   LDG.E.U16 R12, desc[UR4][R2.64] ;
        /*0090*/                   STG.E R12, desc[UR4][R6.64] ;
        /*00a0*/                   IADD3 R2, R2, 0x2, RZ ;
        /*00b0*/                   BRA `(.L_x_2) ;
        /*00c0*/                   EXIT ;
"""


def test_sass_is_read_into_instructions_and_labels():
    insns = sr.parse_sass(_SASS)
    assert [x["op"] for x in insns][:4] == ["LDC", "LDG.E.128", "IMAD", "HGMMA.64x128x16.F32"]
    assert insns[2]["labels"] == [".L_x_1"] and insns[8]["labels"] == [".L_x_2"]
    assert sr._loops(insns) == [(2, 7), (8, 11)]


def test_hot_loop_is_the_innermost_loop_with_mmas():
    insns = sr.parse_sass(_SASS)
    row = sr.hot_loop(insns, num_warps=8)
    assert (row["loop_instructions"], row["loop_mmas"], row["loop_local"]) == (6, 2, 1)
    # 2 wgmma per warpgroup × 2 warpgroups × 64·128·16·2 FLOP / 4096 per clock = 512 cycles; 8 warps × 6 / 4 = 12
    assert row["issue_bound"] == 1.0
    row = sr.hot_loop(insns, num_warps=4)
    assert row["issue_bound"] == 1.0  # 256 / 6 cycles: capped
    assert sr.tensor_cores(insns) == "wgmma" and sr.vector_loads(insns)


def test_issue_bound_of_a_long_loop():
    body = "\n".join(f"        /*{0x20 + 16 * i:04x}*/                   IMAD R8, R9, R10, RZ ;" for i in range(3476))
    text = (".L_x_1:\n" + body + "\n" + "\n".join(
        f"        /*{0x20 + 16 * (3476 + i):04x}*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], R24 ;"
        for i in range(8)) + f"\n        /*{0x20 + 16 * 3484:04x}*/                   BRA `(.L_x_1) ;\n")
    row = sr.hot_loop(sr.parse_sass(text), num_warps=4)
    # masked_conv's forward as the issue measured it: 8 × 64·64·16·2 / 4096 = 256 cycles over 4 × 3485 / 4
    assert row["loop_instructions"] == 3485 and row["loop_mmas"] == 8
    assert row["issue_bound"] == pytest.approx(256 / 3485, abs=1e-3)


def test_gather_loop_gets_an_hbm_bound_instead():
    insns = sr.parse_sass(_SASS)[8:]
    row = sr.hot_loop(insns, num_warps=4)
    assert row["loop_mmas"] == 0 and row["issue_bound"] == ""
    moved = (2 + 4) * 32 * 4  # bytes per block-iteration: a u16 load and a 4-byte store per thread
    want = moved / (4 * 5 / 4) * 132 * 1.755e9 / 3.35e12
    assert row["hbm_bound"] == pytest.approx(min(1.0, want), abs=1e-3)


def test_mma_sync_flops_and_kinds():
    assert sr._mma_flops({"op": "HMMA.16816.F32"}, 4) == (2 * 16 * 8 * 16 * 4, "f16")
    assert sr._mma_flops({"op": "HMMA.1684.F32.TF32"}, 8) == (2 * 16 * 8 * 4 * 8, "tf32")
    assert sr._mma_flops({"op": "HGMMA.64x32x8.F32.TF32"}, 4) == (2 * 64 * 32 * 8, "tf32")
    assert sr._mma_flops({"op": "FFMA"}, 4) is None


@pytest.mark.parametrize(("registers", "shared", "warps", "want"), [
    (255, 32772, 4, (2, 8)),      # registers: 8,192 per warp
    (126, 98304, 8, (2, 16)),     # shared memory: 2 × 97 KB
    (32, 0, 4, (16, 64)),         # the 64-warp limit
    (64, 240 * 1024, 4, (0, 0)),  # more shared memory than a block may have
])
def test_occupancy(registers, shared, warps, want):
    assert sr.occupancy(registers, shared, warps) == want


def test_breaks_and_exceptions(monkeypatch):
    assert all(rule in ("spills", "no_tensor_cores", "low_warps") and why for (_, rule), why in sr.EXCEPTIONS.items())
    # a list of its own: the real one shrinks as kernels are fixed
    monkeypatch.setattr(sr, "EXCEPTIONS", {("local_conv_fwd", rule): "a reason" for rule in ("spills", "low_warps")})
    row = {"kernel": "local_conv_fwd", "dtype": "float16", "spill_stores": 8, "spill_loads": 0,
           "tensor_cores": "none", "warps_per_sm": 4}
    assert sr.breaks(row) == ["spills", "no_tensor_cores", "low_warps"]
    assert sr.unexcused([row]) == [row]  # no_tensor_cores is excused for no kernel
    fine = {**row, "tensor_cores": "mma.sync"}
    assert sr.unexcused([fine]) == []  # spills and low warps are listed for local_conv_fwd
    assert sr.unexcused([{**fine, "kernel": "unfold"}])  # but not for unfold
    assert sr.breaks({**row, "dtype": "float32", "spill_stores": 0, "warps_per_sm": 8}) == []


def test_static_flag_needs_its_partner():
    out = subprocess.run([sys.executable, "-m", "convzoo.tools.gpu_check", "--quick"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--quick goes with --static" in out.stderr


def test_static_report_gates_every_kernel(tmp_path):
    """The CI gate: every registered kernel with a tuning problem, fp16 and fp32, default config, compiled for
    sm_90a through its launcher; any break of the rules that EXCEPTIONS does not list fails here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "convzoo.tools.gpu_check", "--static", "--quick", "--out",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=1500)
    assert (tmp_path / sr.STATIC_MD).is_file(), proc.stderr[-3000:]
    with (tmp_path / sr.STATIC_CSV).open() as f:
        rows = list(csv.DictReader(f))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (calibration,) = [r for r in rows if r["kernel"] == "calibration_tutorial_matmul"]
    assert calibration["tensor_cores"] == "wgmma" and float(calibration["issue_bound"]) == 1.0
    assert calibration["spill_stores"] == "0" and int(calibration["loop_mmas"]) == 4
    kernels.load_all()
    want = {name for name, spec in autotune.registered().items() if spec.problem is not None}
    for dtype in ("float16", "float32"):
        assert want <= {r["kernel"] for r in rows if r["dtype"] == dtype}, dtype
    for r in rows:
        assert int(r["registers"]) > 0 and int(r["loop_instructions"]) > 0, r
        if r["kernel"] in sr.DOT_KERNELS and r["dtype"] == "float16":
            assert r["tensor_cores"] in ("wgmma", "mma.sync"), r
        assert set(r["breaks"].split()) <= {b for (k, b) in sr.EXCEPTIONS if k == r["kernel"]}, r
