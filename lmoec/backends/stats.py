"""FLOPs and bytes of each emitted kernel, and the floor time they imply on a GPU.

Counts follow the chunkwise form (DESIGN.md) the kernels compute, from the IR's recurrence and the
chunk size (the DPLR family, RWKV7, has kernels of its own: templates/triton/dplr.py.j2): matrix products count 2 flops per multiply-add; bytes are the least each kernel must move
(each input read once, each output written once), with q/k/v/o and chunk states in 2-byte (bf16) and
gates, gradients of gates and the states crossing calls in fp32. The floor of a kernel is the larger of
flops / peak and bytes / bandwidth: no implementation of that kernel runs much faster.
"""
from __future__ import annotations

import math

from .context import LSMContext

GPUS = {  # bf16 dense matmul peak (FLOP/s), memory bandwidth (B/s)
    "h100": (790e12, 3.0e12),
    "h200": (790e12, 4.3e12),
}


def kernel_costs(ctx: LSMContext, B: int, T: int, H: int, K: int, V: int, elem: int = 2) -> list[tuple[str, float, float]]:
    """[(kernel, flops, bytes)] of one forward and one backward (states recomputed in the backward)."""
    C = ctx.chunk_size
    N = B * T  # tokens
    NC = B * math.ceil(T / C)  # chunks
    decay = ctx.rec.decay
    g_bytes = {"none": 0, "constant": N * H * 4, "scalar": N * H * 4, "vector": N * H * K * 4}[decay]
    qk = N * H * K * elem  # one of q, k, dq, dk
    vv = N * H * V * elem  # one of v, o, do, dv
    states = NC * H * K * V * elem  # chunk states h (or dh)
    inter = 2 * N * H * K * V  # one token-by-state product per token
    intra_qk = 2 * N * H * C * K  # (C x K) @ (K x C) per chunk
    intra_v = 2 * N * H * C * V  # (C x C) @ (C x V) per chunk
    ends = B * H * K * V * 4  # initial / final state fp32
    if ctx.rec.dplr:
        return _dplr_costs(N, H, C, inter, intra_qk, intra_v, qk, vv, N * H * K * 4, states, ends)
    costs = [
        ("state_fwd", inter, qk + vv + g_bytes + states + ends),
        ("output_fwd", inter + intra_qk + intra_v, 2 * qk + 2 * vv + g_bytes + states),
        ("state_fwd (bwd recompute)", inter, qk + vv + g_bytes + states + ends),
        ("state_bwd", inter, qk + vv + g_bytes + states + ends),
        ("grad_v", inter + intra_qk + intra_v, 2 * qk + 2 * vv + g_bytes + states),
        ("grad_qk", 2 * inter + intra_v + 2 * intra_qk, 4 * qk + 2 * vv + g_bytes + 2 * states + (g_bytes if decay != "none" else 0)),
    ]
    if decay != "none":
        costs.append(("dg_chunk", 2 * N * H * K * V / C, 2 * g_bytes + 2 * states))  # exit term: h . dh per chunk
    return costs


def _dplr_costs(N, H, C, inter, intra_qk, intra_v, qk, vv, g_bytes, states, ends) -> list[tuple[str, float, float]]:
    """The four DPLR kernels (the backward reads the chunk states and reads r the forward saved).

    The triangular solve (I - L)^-1 is a forward substitution, 2 C^2 flops per token, outside the matrix units;
    its backward dL = Tm^T dTm Tm^T is two C x C x C products per chunk.
    """
    solve = 2 * N * H * C * C
    return [
        ("ut_fwd", 3 * intra_qk + 2 * intra_v + solve, 4 * qk + 2 * vv + g_bytes),
        ("chunk_fwd", 4 * inter + 2 * intra_qk + 2 * intra_v, 4 * qk + 4 * vv + g_bytes + states + ends),
        ("bwd_dstate", 3 * inter + intra_qk + intra_v, 3 * qk + 2 * vv + g_bytes + states + ends),
        ("bwd_intra", 5 * inter + 14 * intra_qk + 8 * intra_v + 3 * solve,
         8 * qk + 5 * vv + 2 * g_bytes + 2 * states),
    ]


_FORWARD = ("state_fwd", "output_fwd", "ut_fwd", "chunk_fwd")


def kernel_stats(ctx: LSMContext, B: int, T: int, H: int, K: int, V: int, gpu: str = "h100") -> str:
    """A markdown table: each kernel's GFLOP, MB moved and floor time at the GPU's peak rates."""
    if gpu not in GPUS:
        raise ValueError(f"unknown gpu {gpu!r}; one of {', '.join(GPUS)}")
    flops_peak, bw = GPUS[gpu]
    lines = [
        f"{ctx.name} ({ctx.rec.key}), chunk {ctx.chunk_size}, B={B} T={T} H={H} K={K} V={V}, bf16, {gpu}: "
        f"{flops_peak / 1e12:.0f} TFLOP/s, {bw / 1e12:.1f} TB/s",
        "| kernel | GFLOP | MB moved | floor ms | bound by |",
        "|---|---|---|---|---|",
    ]
    total = {"fwd": 0.0, "bwd": 0.0}
    for name, flops, nbytes in kernel_costs(ctx, B, T, H, K, V):
        t_f, t_b = flops / flops_peak, nbytes / bw
        floor = max(t_f, t_b)
        total["fwd" if name in _FORWARD else "bwd"] += floor
        lines.append(f"| {name} | {flops / 1e9:.1f} | {nbytes / 1e6:.0f} | {floor * 1e3:.3f} | {'compute' if t_f > t_b else 'memory'} |")
    lines.append(f"| forward total | | | {total['fwd'] * 1e3:.3f} | |")
    lines.append(f"| forward + backward total | | | {(total['fwd'] + total['bwd']) * 1e3:.3f} | |")
    return "\n".join(lines) + "\n"
