"""Every kernel compiles for sm_90 / sm_80 with the real Triton → PTX → cubin pipeline (no GPU
needed), in every dtype, with its default config and the largest tiles the tuner may try; the
``tl.dot`` kernels get tensor-core instructions and stay within the H100's shared memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

H100_SHARED_BYTES = 227 * 1024


@pytest.mark.slow
def test_kernels_compile_for_nvidia_targets():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("aot_compile.py"))], env=env,
                          capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['config']}: {r['error']}"
                                 for r in failed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = {r["kernel"] for r in rows}
    assert {"unfold", "fold", "local_conv_fwd", "local_conv_grad_input", "local_conv_grad_weight",
            "unfold_transpose", "unfold_transpose_backward", "patch_covariance",
            "extract_patches", "masked_conv_fwd", "masked_conv_grad_weight", "masked_conv_grad_input",
            "coactivation_correlation"} <= kernels
    assert {r["dtype"] for r in rows} == {"torch.float16", "torch.bfloat16", "torch.float32", "torch.float64"}
    for name in ("masked_conv_fwd", "masked_conv_grad_weight", "masked_conv_grad_input", "coactivation_correlation"):
        masked = [r for r in rows if r["kernel"] == name and r["dot"]]
        assert {r["arch"] for r in masked} == {80, 90} and all(r["mma"] for r in masked), name  # every block
    for r in rows:
        assert r["shared"] <= H100_SHARED_BYTES, r
        assert r["mma"] or not r["dot"], f"{r['kernel']} {r['dtype']} sm_{r['arch']}: tl.dot without mma"
