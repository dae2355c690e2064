"""The element-wise kind: S_t = exp(G_t) * S_{t-1} + k_t w_t^T with a log gate G_t in R^{K x V} (G_t <= 0).

Two shapes of G, both never materialised over the sequence:

- outer sum (GFW, GLA with gk and gv): G_t = g_t 1^T + 1 gv_t^T, g_t in R^K (absent: 0), gv_t in R^V; w_t = v_t.
- outer product (Mamba's selective scan, S4D): G_t[n, d] = dt_t[d] A[d, n] with a per-channel step dt_t in R^V
  and a rate A [H, V, K] (mamba_ssm's A [D, N] per head); the step also discretizes the input, w_t = dt_t * v_t.

The torch template (templates/torch/elementwise.py.j2) and the Triton template (templates/triton/elementwise.py.j2:
walks over chunks with an associative scan over time inside each) run both.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..ir.nodes import Family, Recurrence
from . import Kind
from .decay import read

if TYPE_CHECKING:
    from ..backends.context import LSMContext


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
    return True, ""


def emit_triton(ctx: "LSMContext", header: str) -> str:
    from ..backends.render import render

    return render("triton/elementwise.py.j2", ctx=ctx, header=header, product=ctx.rec.elementwise == "outer_product",
                  key_gate="g" in ctx.args)


KIND = Kind(
    family=Family.elementwise,
    matches=lambda rec: rec.elementwise != "none",
    oracle_step=oracle_step,
    torch_template="torch/elementwise.py.j2",
    supports=supports,
    emit_triton=emit_triton,
    costs=None,
    lasp2_map=["B", "H", "K", "V"],
)
