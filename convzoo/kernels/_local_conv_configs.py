"""local_conv's configs: the three GEMM-shaped kernels' heuristic defaults, candidates and config spaces
(the tuned tables' validity check), for :mod:`convzoo.kernels.local_conv`'s KernelSpecs."""

from __future__ import annotations

import torch

from convzoo.autotune import Config, ConfigSpace
from convzoo.kernels import _common as cm


def _gemm_default(m: int, n: int, k: int, dtype, interpret: bool, m_cap: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a per-position GEMM ``[m, k] · [k, n]``.

    The interpreter pays per program and per loop step, not per element: the largest tiles.
    fp64 runs as a broadcast-sum (an M·N·K tile in registers): the smallest.
    """
    if interpret:
        return cm._fit(m, 16, 64), cm._fit(n, 16, 64), cm._fit(k, 16, 128), 4, 1
    if dtype == torch.float64:
        return 16, 16, 16, 4, 1
    bm, bn = cm._fit(m, 16, m_cap), cm._fit(n, 16, 64)
    bk = 64 if dtype in (torch.float16, torch.bfloat16) else 32
    return bm, bn, bk, (8 if bm * bn >= 8192 else 4), 3


def _fwd_default(dims, dtype, interpret: bool) -> Config:
    # weight-bandwidth bound: one program covers a batch of up to 64 (the MMA's N) for a C_out tile (its M)
    # of W_l, so each weight element is fetched from DRAM once for a batch ≤ 64 (larger batches re-read it
    # from L2); a batch tile of 128 costs 4 warps 255 registers and spills (static sm_90 report)
    bn, bo, br, warps, stages = _gemm_default(dims["N"], dims["O"], dims["R"], dtype, interpret, m_cap=64)
    if not interpret and dtype in (torch.float16, torch.bfloat16):
        # static sm_90 report (fp16 local_2d, the row table): a 64 × 32 × 64 step issues 94 instructions for 4
        # HGMMAs (bound 0.68), 64 × 32 × 128 126 for 8 (1.0); C_out tiles of 128 take 8 warps (two warpgroups)
        bo, br = cm._fit(dims["O"], 16, 128), cm._fit(dims["R"], 16, 128)
        warps = 8 if bo >= 128 else 4
    return Config({"BLOCK_N": bn, "BLOCK_O": bo, "BLOCK_R": br}, num_warps=warps, num_stages=stages)


def _grad_weight_default(dims, dtype, interpret: bool) -> Config:
    # the output dW is the big tensor: wide R tiles make its stores long contiguous runs
    bo, br, bn, warps, stages = _gemm_default(dims["O"], dims["R"], dims["N"], dtype, interpret, m_cap=64)
    if not interpret and dtype != torch.float64:
        br = cm._fit(dims["R"], 16, 128)
        # static sm_90 report (batch-last x): 64 × 128 tiles take 8 warps to 127 registers; a C_out tile below 64
        # makes the R tile the MMA's M (_r_major), one warpgroup of 4 warps (32 × 128: 168 registers, bound 0.81
        # against 0.62 at 8 warps, local_2d_b256)
        warps = 8 if bo * br >= 4096 and not _r_major({"BLOCK_O": bo, "BLOCK_R": br}) else 4
    return Config({"BLOCK_O": bo, "BLOCK_R": br, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _n_major(meta) -> bool:
    """Whether the forward kernel makes the batch tile the MMA's M (``y_l = P_l · W_lᵀ``): when it is the larger
    tile, so a small C_out (below 64) still makes ``wgmma`` for a large batch (the C_out tile otherwise)."""
    return meta["BLOCK_N"] > meta["BLOCK_O"]


def _r_major(meta) -> bool:
    """Whether the grad-weight kernel makes the R tile the MMA's M (``dW_lᵀ = P_lᵀ · dY_l``): when the C_out tile
    is below 64 rows (``wgmma`` needs 64 per warpgroup) and the R tile is larger."""
    return meta["BLOCK_O"] < 64 and meta["BLOCK_R"] > meta["BLOCK_O"]


def _c_major(meta) -> bool:
    """Whether the grad-input kernel makes the C_in tile the MMA's M (``dxᵀ = W_lᵀ · dY_lᵀ``): when it is
    the larger tile, so 64 rows per warpgroup make ``wgmma`` for a small batch (the batch tile otherwise)."""
    return meta["BLOCK_C"] > meta["BLOCK_N"]


def _grad_input_default(dims, dtype, interpret: bool) -> Config:
    # static sm_90 report: registers grow with the weight tile BLOCK_C × BLOCK_O (its gather is one scalar load
    # per element): a C_out step of 64 on a 128 × 64 output tile takes 8 warps to 255 registers, 32 to 214
    bn, bc, bo, warps, stages = _gemm_default(dims["N"], dims["C"], dims["O"], dtype, interpret, m_cap=128)
    if not interpret and dtype in (torch.float16, torch.bfloat16):
        # the larger of C_in and the batch is the MMA's M (see _c_major): up to 128 rows, the other up to 64
        big, small = (dims["C"], dims["N"]) if dims["C"] > dims["N"] else (dims["N"], dims["C"])
        bm, bs = cm._fit(big, 16, 128), cm._fit(small, 16, 64)
        bc, bn = (bm, bs) if dims["C"] > dims["N"] else (bs, bm)
        bo, warps = (64 if bm * bs <= 4096 else 32), (8 if bm * bs >= 4096 else 4)
    elif not interpret and dtype == torch.float32:
        warps = 8 if bn * bc >= 4096 else 4  # 128 × 32 at 4 warps: 255 registers, 24 B spills
    return Config({"BLOCK_N": bn, "BLOCK_C": bc, "BLOCK_O": bo}, num_warps=warps, num_stages=stages)


def _gemm_candidates(m_name: str, n_name: str, k_name: str):
    def gen(dims, dtype):
        sizes = (16, 32, 64, 128)
        for m in sizes:
            for n in sizes:
                for k in (16, 32, 64):
                    for warps in (4, 8):
                        for stages in (1, 3):
                            cfg = Config({m_name: m, n_name: n, k_name: k}, num_warps=warps, num_stages=stages)
                            if _keep(cfg, m_name, n_name, k_name, dtype):
                                yield cfg
    return gen


def _keep(cfg: Config, m_name: str, n_name: str, k_name: str, dtype) -> bool:
    """Validity: tiles ≥ 16 for ``tl.dot``; the accumulator and the two operand tiles fit in registers
    (≤ 64 fp32 values per thread each); fp64 (broadcast-sum) keeps the M·N·K product small."""
    m, n, k = cfg.meta[m_name], cfg.meta[n_name], cfg.meta[k_name]
    threads = 32 * cfg.num_warps
    if dtype == torch.float64:
        return m * n * k <= 8192 and cfg.num_stages == 1
    return min(m, n, k) >= 16 and m * n <= 64 * threads and (m + n) * k <= 64 * threads


def _gemm_space(m_name: str, n_name: str, k_name: str) -> ConfigSpace:
    """What a tuned table entry may hold: tiles 16..128 (tl.dot needs ≥ 16; the candidates' and the
    heuristic's largest is 128), 4 or 8 warps, 1..3 stages, under ``_keep``."""
    return ConfigSpace(dict.fromkeys((m_name, n_name, k_name), (16, 128)), num_warps=(4, 8), num_stages=(1, 3),
                       keep=lambda cfg, dtype: _keep(cfg, m_name, n_name, k_name, dtype))
