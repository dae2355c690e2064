"""FLOPs and bytes of each emitted Triton kernel, and the floor time they imply on a GPU.

One row per kernel that `chunk()` launches at its default settings on whole sequences, named as in the emitted
file (`_chunk_state_kernel` -> `chunk_state`); the vector decay's sub-chunk fallbacks, which act only on chunks
of extreme decay, are not counted. When few sequences x heads would leave the GPU idle, the walks run per segment and the segments'
maps (one more pass over k and v, forward; q and do, backward) and their prefix are added: not counted here. Counts
follow what each kernel computes (templates/triton/*.py.j2): matrix products count 2 flops per multiply-add;
bytes are the least the kernel must move (each tensor it reads read once, each it writes written once) at
the dtypes the kernels use: q/k/v/o and chunk states in 2 bytes (bf16), gates and fp32 intermediates in 4.
The floor of a kernel is the larger of flops / peak and bytes / bandwidth: no implementation of that kernel
runs much faster. The op floor is what any implementation of the whole op must move: its inputs read once and its
outputs written once (log decays in fp32, the rest in bf16), as one fused kernel would; the gap between it and the
kernels' sum is the traffic of intermediates between kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..kinds import kind_of
from ..runtime.contract import gate_shapes
from .context import LSMContext

GPUS = {  # bf16 dense matmul peak (FLOP/s), memory bandwidth (B/s)
    "h100": (790e12, 3.0e12),
    "h200": (790e12, 4.3e12),
}


@dataclass(frozen=True)
class Sizes:
    """Element counts and the recurring flop terms of one call at (B, T, H, K, V) and chunk C."""

    B: int  # sequences
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
    """[(kernel, in the forward, flops, bytes)] of one forward and one backward (the kind's cost model)."""
    s = Sizes(B=B, N=B * T, NC=B * math.ceil(T / ctx.chunk_size), H=H, K=K, V=V, C=ctx.chunk_size, elem=elem)
    ends = B * H * K * V * 4  # initial / final state (or their gradients) in fp32
    return kind_of(ctx.rec).costs(ctx, s, ends)


LOG_GATES = {"g", "gv", "dt"}  # log decays: fp32 inputs of the ops


def op_bytes(ctx: LSMContext, B: int, T: int, H: int, K: int, V: int, elem: int = 2) -> tuple[int, int]:
    """(forward, backward) bytes of the op's own inputs and outputs, each moved once: forward q, k, v and the gates
    in, o out; backward q, k, v, the gates and do in, their gradients out (initial and final states not counted)."""
    qkv = B * T * H * (2 * K + V) * elem
    gates = sum(math.prod(shape) * (4 if name in LOG_GATES else elem)
                for name, shape in gate_shapes(ctx.rec, B, T, H, K, V).items())
    o = B * T * H * V * elem
    return qkv + gates + o, 2 * (qkv + gates) + o


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
    fwd, bwd = op_bytes(ctx, B, T, H, K, V)
    lines.append(f"| op floor: inputs read once, outputs written once | fwd | | {fwd / 1e6:.0f} | {fwd / bw * 1e3:.3f} | memory |")
    lines.append(f"| op floor | fwd + bwd | | {(fwd + bwd) / 1e6:.0f} | {(fwd + bwd) / bw * 1e3:.3f} | memory |")
    return "\n".join(lines) + "\n"
