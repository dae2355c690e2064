"""The decay kinds: additive, constant, scalar and vector (RWKV6's bonus u goes with a vector decay).

They share templates: torch/chunk.py.j2 and triton/chunk.py.j2. Constant decay runs the scalar-decay Triton
kernels on g broadcast per token: one kernel set less to keep right, and the broadcast is H floats per token.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..ir.nodes import Family, Recurrence
from . import Kind

if TYPE_CHECKING:
    from ..backends.context import LSMContext
    from ..backends.stats import Sizes

SUB_CHUNK = 16  # rows of the vector-decay sub-chunks (and the smallest tl.dot tile)

_KERNEL_DECAY = {"none": "none", "constant": "scalar", "scalar": "scalar", "vector": "vector"}


def decayed(rec: Recurrence, S, g):
    """S after the token's decay (shared with the kinds that decay before their own update)."""
    if rec.decay in ("constant", "scalar"):
        return S * g.exp()[..., None, None]
    if rec.decay == "vector":
        return S * g.exp()[..., :, None]
    return S


def read(q, S):
    """q^T S for every (batch, head): [N,H,K] x [N,H,K,V] -> [N,H,V]."""
    return (q[..., None, :] @ S)[..., 0, :]


def output(rec: Recurrence, S_prev, S, q, k, v, inputs, scale):
    """o_t = scale S_t^T q_t; with RWKV6's bonus, scale (S_{t-1}^T q_t + (q_t . (u * k_t)) v_t)."""
    if rec.bonus:
        return (read(q, S_prev) + (q * inputs["u"] * k).sum(-1, keepdim=True) * v) * scale
    return read(q, S) * scale


def oracle_step(rec: Recurrence, S, q, k, v, inputs, scale):
    S_next = decayed(rec, S, inputs.get("g")) + k[..., :, None] * v[..., None, :]
    return S_next, output(rec, S, S_next, q, k, v, inputs, scale)


def supports(ctx: "LSMContext") -> tuple[bool, str]:
    if ctx.rec.bonus and ctx.rec.decay != "vector":
        return False, f"the bonus term u is emitted for vector decay (RWKV6) only, not for {ctx.rec.key}"
    return True, ""


def fuses_walks(ctx: "LSMContext") -> bool:
    """Whether the walks compute the output (forward) and dv (backward) by default (CONFIG fuse_output, fuse_dv).
    Measured on an H100 (bench/results/issue22.md): fused is faster without a decay or with a scalar one; a vector
    decay's exp() tiles make the fused walks slower than the chunk-parallel kernels they replace."""
    return ctx.rec.decay != "vector"


def emit_triton(ctx: "LSMContext", header: str) -> str:
    from ..backends.render import render

    return render("triton/chunk.py.j2", ctx=ctx, header=header, decay=_KERNEL_DECAY[ctx.rec.decay], bonus=ctx.rec.bonus,
                  sub=SUB_CHUNK, fuse_walks=fuses_walks(ctx))


def costs(ctx: "LSMContext", s: "Sizes", ends: int):
    """templates/triton/chunk.py.j2 at its default launch. Fused (fuses_walks): the forward walk computes the output
    from the state in registers, the reverse walk dv; else their own chunk-parallel kernels do, reading the stored
    states. Either way the forward stores the chunk states for the backward."""
    g = s.N * s.H * {"none": 0, "constant": 1, "scalar": 1, "vector": s.K}[ctx.rec.decay] * 4  # g, G or dg in fp32
    walk = (s.inter, s.qk + s.vv + g + s.states + ends)  # reads k, v (q, do backward); stores the states
    output = (s.inter + s.intra_qk + s.intra_v, 2 * s.qk + 2 * s.vv + g + s.states)  # q S + tril(q k^T) v (dv likewise)
    if fuses_walks(ctx):  # one pass less: q (k) read and o (dv) written by the walk
        out = [("chunk_fwd", True, walk[0] + output[0], walk[1] + s.qk + s.vv),
               ("state_bwd", False, walk[0] + output[0], walk[1] + s.qk + s.vv)]
    else:
        out = [("chunk_fwd", True, *walk), ("output_fwd", True, *output),
               ("state_bwd", False, *walk), ("grad_v", False, *output)]
    out.append(("grad_qk", False, 2 * s.inter + s.intra_v + 2 * s.intra_qk, 4 * s.qk + 2 * s.vv + 2 * g + 2 * s.states))
    if g:
        out.append(("dg_chunk", False, s.inter / s.C, 2 * g + 2 * s.states))  # exit term: h . dh per chunk
    return out


def _kind(family: Family, decay: str, lasp2_map: list[str]) -> Kind:
    return Kind(
        family=family,
        matches=lambda rec: rec.decay == decay,
        oracle_step=oracle_step,
        torch_template="torch/chunk.py.j2",
        supports=supports,
        emit_triton=emit_triton,
        costs=costs,
        lasp2_map=lasp2_map,
    )


# a constant decay's map is known to every rank: nothing to send
KINDS = [_kind(Family.additive, "none", []), _kind(Family.constant, "constant", []),
         _kind(Family.scalar, "scalar", ["B", "H"]), _kind(Family.vector, "vector", ["B", "H", "K"])]
