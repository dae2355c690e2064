"""The DPLR kind: (Diag(exp(g_t)) + a_t b_t^T) S + k_t v_t^T (RWKV7's generalized delta rule).

Triton kernels from templates/triton/dplr.py.j2: the chunkwise UT form of the delta template with its two
rank-one vectors made independent (the removal a and the read b are inputs of their own, there is no beta, and
the value key is k itself). The kernels take a vector log decay; a scalar or constant one is broadcast over K by
the emitted wrappers. Everything but the state recursion runs chunk-parallel; the recursion applies each chunk's
affine map S -> Gam_C * S + P S + M, one matrix product per chunk (the template's docstring has the kernels and
grids).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..ir.nodes import Family, Recurrence
from . import Kind
from .decay import decayed, output, read

if TYPE_CHECKING:
    from ..backends.context import LSMContext
    from ..backends.stats import Sizes


def oracle_step(rec: Recurrence, S, q, k, v, inputs, scale):
    S_next = decayed(rec, S, inputs.get("g"))
    S_next = S_next + inputs["a"][..., :, None] * read(inputs["b"], S)[..., None, :]
    S_next = S_next + k[..., :, None] * v[..., None, :]
    return S_next, output(rec, S, S_next, q, k, v, inputs, scale)


def supports(ctx: "LSMContext") -> tuple[bool, str]:
    if ctx.rec.decay == "none":
        return False, "the DPLR recurrence without decay has no Triton kernels: use the torch backend"
    return True, ""


def emit_triton(ctx: "LSMContext", header: str) -> str:
    from ..backends.render import render

    return render("triton/dplr.py.j2", ctx=ctx, header=header)


def costs(ctx: "LSMContext", s: "Sizes", ends: int):
    """Each chunk's affine map S <- Gam S + P S + M (P [K, K] bf16, M [K, V] fp32) is built chunk-parallel, so
    the two sequential kernels do one [K, K] @ [K, V] product per chunk."""
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


KIND = Kind(
    family=Family.dplr,
    matches=lambda rec: rec.dplr,
    oracle_step=oracle_step,
    torch_template="torch/chunk.py.j2",
    supports=supports,
    emit_triton=emit_triton,
    costs=costs,
    lasp2_map=["B", "H", "K", "K"],
    # the chunk's decay factored as exp(G_i) exp(-G_j): NaN in the interpreter from 96 a chunk, exact at 86
    chunk_log_decay_limit=lambda rec: 80.0,
)
