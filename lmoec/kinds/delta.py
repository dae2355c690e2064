"""The delta-rule kind: exp(g_t) (I - beta_t k_t k_t^T) S + beta_t k_t v_t^T (DeltaNet, Gated DeltaNet).

Triton kernels from templates/triton/delta.py.j2 (WY / UT representation). One template covers DeltaNet (no
decay), Gated DeltaNet (scalar or constant decay) and the delta rule with a vector decay; the template branches on
the decay at generation time, so each emitted file holds only its spec's kernels.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..ir.nodes import Family, Recurrence
from . import Kind
from .decay import decayed, output, read

if TYPE_CHECKING:
    from ..backends.context import LSMContext
    from ..backends.stats import Sizes

BLOCK = 16  # rows of the UT transform's tiles (the smallest tl.dot tile); the chunk is a multiple of it


def oracle_step(rec: Recurrence, S, q, k, v, inputs, scale):
    S_next = decayed(rec, S, inputs.get("g"))
    kS = read(k, S_next)
    S_next = S_next + inputs["beta"][..., None, None] * k[..., :, None] * (v - kS)[..., None, :]
    return S_next, output(rec, S, S_next, q, k, v, inputs, scale)


def supports(ctx: "LSMContext") -> tuple[bool, str]:
    if ctx.rec.bonus:
        return False, "the delta rule with a bonus term u has no Triton kernels"
    return True, ""


def fuses_output(ctx: "LSMContext") -> bool:
    """Whether the emitted forward walk computes the output by default (CONFIG fuse_output). Measured on an H100
    (bench/results/triton_delta.md): faster without a decay; with one, the decayed scores make the fused walk
    spill and the output's own, chunk-parallel kernel wins."""
    return ctx.rec.decay == "none"


def emit_triton(ctx: "LSMContext", header: str) -> str:
    from ..backends.render import render

    decay = "scalar" if ctx.rec.decay == "constant" else ctx.rec.decay
    return render("triton/delta.py.j2", ctx=ctx, header=header, decay=decay, block=BLOCK, fuse_output=fuses_output(ctx))


def walk_programs(s: "Sizes") -> int:
    """Programs of the emitted walks at these sizes: the V block (64) halves, down to 16, while fewer than 64 would
    walk (CONFIG BV and seq_programs of templates/triton/delta.py.j2, whose _walk_layout this mirrors)."""
    blocks = lambda bv: -(-s.V // bv)
    bv = min(max(16, 1 << (s.V - 1).bit_length()), 64)
    while bv > 16 and s.B * s.H * blocks(bv) < 64:
        bv //= 2
    return s.B * s.H * blocks(bv)


def costs(ctx: "LSMContext", s: "Sizes", ends: int):
    """templates/triton/delta.py.j2 at its default launch settings. Without a vector decay they depend on the walks'
    programs (>= 128: v' formed in the walk from Tm, else w and u by their own kernel); with one the UT kernel
    forms w and u. DeltaNet's output is fused in the walk while >= 128 programs walk. The UT transform's 16 x 16
    forward substitutions are left out (C * 16 flops per token, off the matrix units); its tile products are
    bounded by one C x C x C product per chunk."""
    g_per_token = {"none": 0, "constant": 1, "scalar": 1, "vector": s.K}[ctx.rec.decay]
    g = s.N * s.H * g_per_token * 4  # g, G or dg in fp32
    beta = s.N * s.H * 4
    tm = s.squares // 2  # Tm in bf16
    fp32_k = 2 * s.qk  # dw, the partial dk
    many = walk_programs(s) >= 128
    writes = s.vv + s.states + ends  # v' and the chunk-start states (and the final state)
    ut = (s.intra_qk + s.cube, s.qk + beta + 2 * g + tm)  # A, Tm and G: reads k, beta, g; writes Tm, G
    w_kernel = (s.intra_qk, tm + s.qk + beta + g + s.qk)  # w = Tm x: reads Tm, k, beta, G; writes w
    if ctx.rec.decay == "vector":  # w and u from the UT kernel's tiles; the walk reads k, w, u
        ut = (ut[0] + s.intra_qk + s.intra_v, ut[1] + s.vv + s.qk + s.vv)
        state = (2 * s.inter, 2 * s.qk + s.vv + g + writes)
        w_and_u = []
    elif many:  # v' = Tm (beta v - x S): reads k, Tm, v, beta, G; the backward then makes w
        state = (2 * s.inter + s.intra_v, s.qk + tm + s.vv + beta + g + writes)
        w_and_u = [("wu", False, *w_kernel)]
    else:  # w and u by their own kernel; the walk reads k, w, u
        state = (2 * s.inter, 2 * s.qk + s.vv + g + writes)
        w_and_u = [("wu", True, w_kernel[0] + s.intra_v, w_kernel[1] + 2 * s.vv)]
    out = (s.inter + s.intra_qk + s.intra_v, 2 * s.qk + 2 * s.vv + g + s.states)
    if fuses_output(ctx) and many:  # one pass less: q read and o written by the walk
        forward = [("chunk_state", True, state[0] + out[0], state[1] + s.qk + s.vv)]
    else:
        forward = [("chunk_state", True, *state), ("chunk_output", True, *out)]
    return [
        ("ut", True, *ut),
        *forward,
        *w_and_u,
        ("chunk_bwd_dstate", False, 3 * s.inter + s.intra_qk + s.intra_v, 3 * s.qk + 2 * s.vv + g + s.states + ends),
        ("bwd_dqk", False, 3 * s.inter + s.intra_v + (3 if g_per_token == 1 else 2) * s.intra_qk,
         2 * s.qk + 2 * s.states + 3 * s.vv + s.qk + 2 * fp32_k + 2 * g),
        ("bwd_wy", False, 2 * s.intra_v + 4 * s.intra_qk + 2 * s.cube,
         s.qk + 2 * s.vv + 2 * beta + tm + 2 * fp32_k + s.qk + s.vv + 3 * g),
    ]


KIND = Kind(
    family=Family.delta,
    matches=lambda rec: rec.delta and not rec.dplr,
    oracle_step=oracle_step,
    torch_template="torch/chunk.py.j2",
    supports=supports,
    emit_triton=emit_triton,
    costs=costs,
    lasp2_map=["B", "H", "K", "K"],
    # the vector-decay delta kernels (specs/lsm/gated_delta_vector.lsm) pass the interpreter, compile for sm_90 and, on
    # an H100 (Triton 3.6), give the forward, final state, dq and the decode step within bounds and every gradient in
    # fp32; with bf16 inputs the backward's state walk turns some V columns non-finite (bench/results/run11)
    auto_torch_reason=lambda rec: ("the vector-decay delta Triton kernels failed their GPU check (bf16 backward: the "
                                   "state walk's gradients go non-finite on an H100 with Triton 3.6, bench/results/run11); "
                                   "backend='triton' forces them"
                                if rec.decay == "vector" else ""),
    chunk_log_decay_limit=lambda rec: 80.0 if rec.decay == "vector" else 0.0,  # as DPLR's (the scalar decay: exp(G_i - G_j))
)
