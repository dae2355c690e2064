"""FLOPs and bytes of each emitted Triton kernel, and the floor time they imply on a GPU.

One row per kernel that `chunk()` launches at its default settings on whole sequences, named as in the emitted
file (`_chunk_state_kernel` -> `chunk_state`); the vector decay's sub-chunk fallbacks, which act only on chunks
of extreme decay, are not counted. When few sequences x heads would leave the GPU idle, the walks run per segment and the segments'
maps (one more pass over k and v, forward; q and do, backward) and their prefix are added: not counted here. Counts
follow what each kernel computes (templates/triton/*.py.j2): matrix products count 2 flops per multiply-add;
bytes are the least the kernel must move (each tensor it reads read once, each it writes written once) at
the dtypes the kernels use: q/k/v/o and chunk states in 2 bytes (bf16), gates and fp32 intermediates in 4.
The floor of a kernel is the larger of flops / peak and bytes / bandwidth: no implementation of that kernel
runs much faster.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import triton_delta
from .context import LSMContext

GPUS = {  # bf16 dense matmul peak (FLOP/s), memory bandwidth (B/s)
    "h100": (790e12, 3.0e12),
    "h200": (790e12, 4.3e12),
}


@dataclass(frozen=True)
class Sizes:
    """Element counts and the recurring flop terms of one call at (B, T, H, K, V) and chunk C."""

    N: int  # tokens
    NC: int  # chunks
    H: int
    K: int
    V: int
    C: int
    elem: int  # bytes of a bf16 activation

    @property
    def qk(self) -> int:  # bytes of one of q, k, dq, dk (or a, b, w, ...) [N, H, K]
        return self.N * self.H * self.K * self.elem

    @property
    def vv(self) -> int:  # bytes of one of v, o, do, dv (or u, v') [N, H, V]
        return self.N * self.H * self.V * self.elem

    @property
    def states(self) -> int:  # bytes of the chunk-start states (or their gradients) in bf16
        return self.NC * self.H * self.K * self.V * self.elem

    @property
    def squares(self) -> int:  # bytes of one fp32 C x C matrix per chunk (Tm, score gradients)
        return self.N * self.H * self.C * 4

    @property
    def inter(self) -> float:  # one token-by-state product per token: [C, K] @ [K, V] per chunk
        return 2 * self.N * self.H * self.K * self.V

    @property
    def intra_qk(self) -> float:  # [C, K] @ [K, C] per chunk
        return 2 * self.N * self.H * self.C * self.K

    @property
    def intra_v(self) -> float:  # [C, C] @ [C, V] per chunk
        return 2 * self.N * self.H * self.C * self.V

    @property
    def cube(self) -> float:  # [C, C] @ [C, C] per chunk
        return 2 * self.N * self.H * self.C * self.C


def kernel_costs(ctx: LSMContext, B: int, T: int, H: int, K: int, V: int, elem: int = 2) -> list[tuple[str, bool, float, float]]:
    """[(kernel, in the forward, flops, bytes)] of one forward and one backward."""
    s = Sizes(N=B * T, NC=B * math.ceil(T / ctx.chunk_size), H=H, K=K, V=V, C=ctx.chunk_size, elem=elem)
    ends = B * H * K * V * 4  # initial / final state (or their gradients) in fp32
    if ctx.rec.dplr:
        return _dplr_costs(s, ends)
    g_per_token = {"none": 0, "constant": 1, "scalar": 1, "vector": K}[ctx.rec.decay]
    g = s.N * H * g_per_token * 4  # g, G or dg in fp32
    if ctx.rec.delta:
        return _delta_costs(s, ends, g, scalar=g_per_token == 1, fused_output=triton_delta.fuses_output(ctx))
    from .triton import fuses_walks

    return _decay_costs(s, ends, g, fused=fuses_walks(ctx))


def _decay_costs(s: Sizes, ends: int, g: int, fused: bool) -> list[tuple[str, bool, float, float]]:
    """templates/triton/chunk.py.j2 at its default launch. fused (lmoec.backends.triton.fuses_walks): the forward walk
    computes the output from the state in registers, the reverse walk dv; else their own chunk-parallel kernels do,
    reading the stored states. Either way the forward stores the chunk states for the backward."""
    walk = (s.inter, s.qk + s.vv + g + s.states + ends)  # reads k, v (q, do backward); stores the states
    output = (s.inter + s.intra_qk + s.intra_v, 2 * s.qk + 2 * s.vv + g + s.states)  # q S + tril(q k^T) v (dv likewise)
    if fused:  # one pass less: q (k) read and o (dv) written by the walk
        costs = [("chunk_fwd", True, walk[0] + output[0], walk[1] + s.qk + s.vv),
                 ("state_bwd", False, walk[0] + output[0], walk[1] + s.qk + s.vv)]
    else:
        costs = [("chunk_fwd", True, *walk), ("output_fwd", True, *output),
                 ("state_bwd", False, *walk), ("grad_v", False, *output)]
    costs.append(("grad_qk", False, 2 * s.inter + s.intra_v + 2 * s.intra_qk, 4 * s.qk + 2 * s.vv + 2 * g + 2 * s.states))
    if g:
        costs.append(("dg_chunk", False, s.inter / s.C, 2 * g + 2 * s.states))  # exit term: h . dh per chunk
    return costs


def _delta_costs(s: Sizes, ends: int, g: int, scalar: bool, fused_output: bool) -> list[tuple[str, bool, float, float]]:
    """templates/triton/delta.py.j2. The UT transform's 16 x 16 forward substitutions are left out (C * 16 flops
    per token, off the matrix units); its tile products are bounded by one C x C x C product per chunk.
    fused_output: the forward walk computes the output (the emitted default, triton_delta.fuses_output)."""
    beta = s.N * s.H * 4
    tm = s.squares // 2  # Tm in bf16
    fp32_k = 2 * s.qk  # dw, the partial dk
    state = (2 * s.inter, 2 * s.qk + 2 * s.vv + g + s.states + ends)  # reads k, w, u; stores v' and the states
    output = (s.inter + s.intra_qk + s.intra_v, 2 * s.qk + 2 * s.vv + g + s.states)
    if fused_output:  # one pass less: q read and o written by the walk
        forward = [("chunk_state", True, state[0] + output[0], state[1] + s.qk + s.vv)]
    else:
        forward = [("chunk_state", True, *state), ("chunk_output", True, *output)]
    return [
        ("ut", True, 2 * s.intra_qk + s.intra_v + s.cube, s.qk + s.vv + beta + 2 * g + s.qk + s.vv + tm),
        *forward,
        ("chunk_bwd_dstate", False, 3 * s.inter + s.intra_qk + s.intra_v, 3 * s.qk + 2 * s.vv + g + s.states + ends),
        ("bwd_dqk", False, 3 * s.inter + s.intra_v + (3 if scalar else 2) * s.intra_qk,
         2 * s.qk + 2 * s.states + 3 * s.vv + s.qk + 2 * fp32_k + 2 * g),
        ("bwd_wy", False, 2 * s.intra_v + 4 * s.intra_qk + 2 * s.cube,
         s.qk + 2 * s.vv + 2 * beta + tm + 2 * fp32_k + s.qk + s.vv + 3 * g),
    ]


def _dplr_costs(s: Sizes, ends: int) -> list[tuple[str, bool, float, float]]:
    """templates/triton/dplr.py.j2: each chunk's affine map S <- Gam S + P S + M (P [K, K] bf16, M [K, V] fp32)
    is built chunk-parallel, so the two sequential kernels do one [K, K] @ [K, V] product per chunk."""
    g = s.N * s.H * s.K * 4
    gc = s.NC * s.H * s.K * 4
    tm = s.squares // 2  # Tm in bf16
    chunk_map = 2 * s.NC * s.H * s.K * s.K * s.V  # P S per chunk
    fp32_states = 2 * s.states
    return [
        ("ut_fwd", True, 3 * s.intra_qk + 2 * s.intra_v + 4 * s.cube, 3 * s.qk + g + s.vv + 3 * s.qk + s.vv + tm + gc),
        ("chunk_map", True, 2 * s.N * s.H * s.K * s.K + 2 * s.inter,
         3 * s.qk + 2 * s.vv + s.NC * s.H * s.K * s.K * s.elem + fp32_states),
        ("fwd_state", True, chunk_map, s.NC * s.H * s.K * s.K * s.elem + fp32_states + gc + s.states + ends),
        ("fwd_out", True, 2 * s.inter + 2 * s.intra_qk + 2 * s.intra_v, 4 * s.qk + g + s.states + 2 * s.vv + 2 * s.vv),
        ("bwd_local", False, s.intra_qk + 3 * s.intra_v + 2 * s.inter,
         3 * s.qk + g + 3 * s.vv + 2 * s.vv + fp32_states + 2 * s.squares),
        ("bwd_dstate", False, chunk_map,
         s.NC * s.H * s.K * s.K * s.elem + fp32_states + gc + s.states + ends),
        ("bwd_dv", False, 2 * s.intra_qk + 6 * s.intra_v + 3 * s.inter + 2 * s.cube,
         5 * s.qk + g + tm + 2 * s.states + 2 * s.vv * 2 + s.vv + 2 * s.vv + 2 * s.squares),
        ("bwd_dqk", False, 4 * s.inter + 10 * s.intra_qk,
         4 * s.qk + g + tm + 2 * s.states + 4 * s.vv + 4 * s.squares + 4 * s.qk + g),
    ]


def kernel_stats(ctx: LSMContext, B: int, T: int, H: int, K: int, V: int, gpu: str = "h100") -> str:
    """A markdown table: each kernel's GFLOP, MB moved and floor time at the GPU's peak rates."""
    if gpu not in GPUS:
        raise ValueError(f"unknown gpu {gpu!r}; one of {', '.join(GPUS)}")
    flops_peak, bw = GPUS[gpu]
    lines = [
        f"{ctx.name} ({ctx.rec.key}), chunk {ctx.chunk_size}, B={B} T={T} H={H} K={K} V={V}, bf16, {gpu}: "
        f"{flops_peak / 1e12:.0f} TFLOP/s, {bw / 1e12:.1f} TB/s",
        "| kernel | pass | GFLOP | MB moved | floor ms | bound by |",
        "|---|---|---|---|---|---|",
    ]
    total = {True: 0.0, False: 0.0}
    for name, forward, flops, nbytes in kernel_costs(ctx, B, T, H, K, V):
        t_f, t_b = flops / flops_peak, nbytes / bw
        floor = max(t_f, t_b)
        total[forward] += floor
        lines.append(f"| {name} | {'fwd' if forward else 'bwd'} | {flops / 1e9:.1f} | {nbytes / 1e6:.0f} | "
                     f"{floor * 1e3:.3f} | {'compute' if t_f > t_b else 'memory'} |")
    lines.append(f"| forward total | | | | {total[True] * 1e3:.3f} | |")
    lines.append(f"| forward + backward total | | | | {(total[True] + total[False]) * 1e3:.3f} | |")
    return "\n".join(lines) + "\n"
