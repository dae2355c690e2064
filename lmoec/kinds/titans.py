"""The Titans kind: a linear memory trained at test time by gradient steps with momentum and weight decay.

Per head, memory M [K, V], momentum S [K, V], inner loss l(M; k, v) = 1/2 |M^T k - v|^2 with gradient
k (M^T k - v)^T, gates per token: the learning rate theta_t, the momentum eta_t, the weight decay alpha_t:

    S_t = eta_t S_{t-1} - theta_t k_t (M_*^T k_t - v_t)^T        M_t = (1 - alpha_t) M_{t-1} + S_t
    o_t = scale M_t^T q_t

M_* is M_{t-1} (`gradient = token`: Titans' exact per-token recurrence) or the memory at the start of the token's
mini-batch (`gradient = minibatch(N)`: Titans' parallel form, and TTT's mini-batch gradient descent without the
LayerNorm). A missing momentum is eta = 0, a missing weight decay alpha = 0. The joint state (M, S) evolves by an
affine map with rank-one parts, X_t = D_t X_{t-1} + theta_t [k_t; k_t] e_t^T, with D_t = [[1 - alpha_t, eta_t],
[0, eta_t]] (x) I_K and the error e_t = v_t - M_*^T k_t: chunkwise, a triangular solve per chunk gives the errors
(templates/torch/titans.py.j2). Ops carry the joint state as one tensor [N, H, K, 2V]: M in [..., :V], S in
[..., V:].

Triton kernels (templates/triton/titans.py.j2), both gradient points: a chunk-parallel kernel forms the chunk's 2 x 2
gate products, the solve Tm = (I + L)^-1 and the masked q k^T scores; a walk per (V block, sequence, head) carries
(M, S) and forms the errors, the output and the next state; the backward mirrors it (a reverse walk for the state's
and v's gradients, then a chunk-parallel kernel for q, k and the gates, the gates' through the products' loop in
reverse).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..ir.nodes import Family, Recurrence
from . import Kind
from .decay import read

if TYPE_CHECKING:
    from ..backends.context import LSMContext
    from ..backends.stats import Sizes

STATE_WIDTH = 2  # the op's state is [N, H, K, STATE_WIDTH * V]: the memory M, then the momentum S


def gates(rec: Recurrence) -> list[str]:
    """The op's gate arguments [B, T, H], in contract order: learning rate, then momentum and weight decay if any."""
    return ["theta"] + (["eta"] if rec.momentum else []) + (["alpha"] if rec.weight_decay else [])


def oracle_state_in(rec: Recurrence, state):
    """The oracle's working state [.., K, 3V]: (M, S) and the gradient point M_*, set at each mini-batch start."""
    import torch

    V = state.shape[-1] // STATE_WIDTH
    return torch.cat([state, state[..., :V]], dim=-1)


def oracle_state_out(rec: Recurrence, state):
    """(M, S) of the oracle's working state."""
    return state[..., : STATE_WIDTH * (state.shape[-1] // 3)]


def oracle_step(rec: Recurrence, state, q, k, v, inputs, scale):
    """One token, exactly as the module docstring writes it (state as `oracle_state_in` makes it)."""
    V = state.shape[-1] // 3
    M, S, anchor = state[..., :V], state[..., V: 2 * V], state[..., 2 * V:]
    if inputs["position"] % rec.minibatch == 0:  # a mini-batch starts: its gradients are taken at this memory
        anchor = M
    theta = inputs["theta"][..., None, None]
    eta = inputs["eta"][..., None, None] if rec.momentum else 0
    alpha = inputs["alpha"][..., None, None] if rec.weight_decay else 0
    gradient = k[..., :, None] * (read(k, anchor) - v)[..., None, :]
    S = eta * S - theta * gradient
    M = (1 - alpha) * M + S
    import torch

    return torch.cat([M, S, anchor], dim=-1), read(q, M) * scale


MAX_TRITON_CHUNK = 64  # at chunk 128 the walks' [C, K] and [C, C] tiles need 514 KB of shared memory (K = V = 128)


def supports(ctx: "LSMContext") -> tuple[bool, str]:
    """Both gradient points and any head dims; chunks up to 64 (lmoec.backends.triton checks the power of two)."""
    if ctx.chunk_size > MAX_TRITON_CHUNK:
        return False, (f"the Titans Triton kernels take chunk_size <= {MAX_TRITON_CHUNK} (their walks' tiles outgrow "
                       f"an H100's shared memory beyond it), got {ctx.chunk_size}: the torch path runs it")
    return True, ""


def emit_triton(ctx: "LSMContext", header: str) -> str:
    from ..backends.render import render

    return render("triton/titans.py.j2", ctx=ctx, header=header)


def costs(ctx: "LSMContext", s: "Sizes", ends: int):
    """templates/triton/titans.py.j2 (the torch path computes the same products; its backward is autograd's). The
    chunk-parallel kernels' loops over the chunk's tokens (the 2 x 2 products, the forward substitution, the gates'
    reverse pass) are C^2 element-wise flops per token, counted once as one C x C x C product per chunk. Bytes: the
    inputs once per kernel that reads them, Tm and the masked scores in fp32, E and dv in fp32, the joint chunk-entry
    states and their gradients in fp32 ([K, 2V] per chunk and head), the end states (M and S)."""
    gates_in = s.N * s.H * s.elem * len(gates(ctx.rec))
    gates_fp32 = s.N * s.H * 4 * len(gates(ctx.rec))
    weights = s.N * s.H * 4 * 7  # wts: seven rows of C per chunk and head
    values_fp32 = s.N * s.H * s.V * 4  # E or dv
    joint = 2 * s.NC * s.H * s.K * s.V * 4  # the chunk-entry (M, S), or their gradients, in fp32
    prepare = (2 * s.intra_qk + s.cube, 2 * s.qk + gates_in + 2 * s.squares + weights)
    walk = (6 * s.inter + 2 * s.intra_v, 2 * s.qk + s.vv + 2 * s.squares + weights + s.vv + values_fp32 + joint + 4 * ends)
    bwd_walk = (6 * s.inter + 2 * s.intra_v, 2 * s.qk + s.vv + 2 * s.squares + weights + values_fp32 + joint + 4 * ends)
    bwd_chunk = (2 * s.intra_qk + 4 * s.intra_v + 6 * s.inter + 4 * s.intra_qk + 2 * s.cube,
                 2 * s.qk + gates_in + 2 * values_fp32 + s.vv + 2 * joint + 2 * s.N * s.H * s.K * 4 + gates_fp32
                 + 2 * s.squares)
    return [("prepare", True, *prepare), ("fwd", True, *walk), ("bwd_walk", False, *bwd_walk),
            ("bwd_chunk", False, *bwd_chunk)]


KIND = Kind(
    family=Family.titans,
    matches=lambda rec: rec.update == "titans",
    oracle_step=oracle_step,
    torch_template="torch/titans.py.j2",
    supports=supports,
    emit_triton=emit_triton,
    costs=costs,
    lasp2_map=["B", "H", "2K", "2K"],
    state_width=STATE_WIDTH,
    oracle_state_in=oracle_state_in,
    oracle_state_out=oracle_state_out,
    # per token, every row of bench/titans_gpu.py's check passed on an H100 (bench/results/run11); at chunk-start
    # gradients only D = 128 has run there (its D = 64 and packed-sequence rows never did)
    auto_torch_reason=lambda rec: ("the Titans Triton kernels at chunk-start gradients (minibatch) have passed their "
                                   "GPU check at D = 128 only, not yet on packed sequences (bench/results/run11); "
                                   "backend='triton' forces them" if rec.minibatch > 1 else ""),
)
