"""The element-wise kind: S_t = exp(G_t) * S_{t-1} + k_t w_t^T with a log gate G_t in R^{K x V} (G_t <= 0).

Two shapes of G, both never materialised over the sequence:

- outer sum (GFW, GLA with gk and gv): G_t = g_t 1^T + 1 gv_t^T, g_t in R^K (absent: 0), gv_t in R^V; w_t = v_t.
- outer product (Mamba's selective scan, S4D): G_t[n, d] = dt_t[d] A[d, n] with a per-channel step dt_t in R^V
  and a rate A [H, V, K] (mamba_ssm's A [D, N] per head); the step also discretizes the input, w_t = dt_t * v_t.

The torch template (templates/torch/elementwise.py.j2) and the Triton template (templates/triton/elementwise.py.j2:
walks over chunks with an associative scan over time inside each) run both. The outer sum also has a chunk form on
the matrix units (templates/triton/outer_sum.py.j2, CONFIG "form": "chunk"; opt-in until a GPU has checked and timed
it): GLA's chunkwise products with a value-side factor, the gates' gradients from reverse sums within each chunk.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..ir.nodes import Family, Recurrence
from . import Kind
from .decay import read

SCAN = 16  # tokens per scan step of the Triton walks by default (their CONFIG["scan"]): one stored state per SCAN tokens

if TYPE_CHECKING:
    from ..backends.context import LSMContext
    from ..backends.stats import Sizes


def log_gate(rec: Recurrence, inputs):
    """G [..., K, V] of one token from its inputs (g, gv; or dt, A)."""
    if rec.elementwise == "outer_product":
        return inputs["dt"][..., None, :] * inputs["A"].transpose(-1, -2)
    gate = inputs["gv"][..., None, :]
    return gate if inputs.get("g") is None else gate + inputs["g"][..., :, None]


def oracle_step(rec: Recurrence, S, q, k, v, inputs, scale):
    write = inputs["dt"] * v if rec.elementwise == "outer_product" else v
    S_next = log_gate(rec, inputs).exp() * S + k[..., :, None] * write[..., None, :]
    return S_next, read(q, S_next) * scale


def supports(ctx: "LSMContext") -> tuple[bool, str]:
    return True, ""  # every element-wise gate, head dim and chunk size


def emit_triton(ctx: "LSMContext", header: str) -> str:
    from ..backends.render import render

    return render("triton/elementwise.py.j2", ctx=ctx, header=header, product=ctx.rec.elementwise == "outer_product",
                  key_gate="g" in ctx.args, scan=SCAN)


def costs(ctx: "LSMContext", s: "Sizes", ends: int):
    """templates/triton/elementwise.py.j2 at its defaults. The scans are element-wise work on the [K, V] state, off
    the matrix units: about 8 flops per state element and token forward (exp, the scan's multiply-adds, the read),
    3x that backward (the recomputed states, the reverse scan, five reductions). Bytes: each input once, the fp32
    chunk-entry states (one per SCAN tokens) written forward and read backward, dq, dk (and dg) as fp32 partial sums
    per V block of 16. The floor `--stats` prints takes the bf16 matmul peak, which element-wise fp32 work cannot
    reach (an H100's CUDA cores: ~67 TFLOP/s): read this kind's flops against that."""
    key_gate = "g" in ctx.args
    gates = s.vv + (s.qk if key_gate else 0)  # dt, or gv (+ g), in the inputs' dtype
    element = s.N * s.H * s.K * s.V
    stored = -(-s.N // SCAN) * s.H * s.K * s.V * 4
    fp32_keys = s.N * s.H * s.K * 4 * -(-s.V // 16)  # one [N, H, K] fp32 partial sum per V block
    fp32_values = s.N * s.H * s.V * 4
    forward = 2 * s.qk + s.vv + gates + s.vv + stored + ends  # q, k, v, gates in; o, states (final state) out
    backward = (2 * s.qk + 2 * s.vv + gates + stored + ends  # q, k, v, do, gates, states, d final state in
                + (3 if key_gate else 2) * fp32_keys + 2 * fp32_values + ends)  # dq, dk (dg); dv, d dt or d gv; dh0
    return [("fwd", True, 8 * element, forward), ("bwd", False, 24 * element, backward)]


KIND = Kind(
    family=Family.elementwise,
    matches=lambda rec: rec.elementwise != "none",
    oracle_step=oracle_step,
    torch_template="torch/elementwise.py.j2",
    supports=supports,
    emit_triton=emit_triton,
    costs=costs,
    lasp2_map=["B", "H", "K", "V"],
)  # on by default since bench/correctness_gpu.sh passed on an H100 (2026-12-07: Mamba, GFW, bf16 and fp32, packed)
