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


def supports(ctx: "LSMContext") -> tuple[bool, str]:
    return True, ""  # both gradient points, any head dims; the chunk size is checked by lmoec.backends.triton


def emit_triton(ctx: "LSMContext", header: str) -> str:
    from ..backends.render import render

    return render("triton/titans.py.j2", ctx=ctx, header=header)


def costs(ctx: "LSMContext", s: "Sizes", ends: int):
    """The chunkwise algorithm of templates/torch/titans.py.j2 (what a fused kernel set would also compute). Per chunk:
    K K^T and the C x C solve, the solved U = T v and W = T k for both state halves (chunk-parallel); the walk's
    error E = U - W_M M - W_S S and the two state updates (sequential); the outputs q M plus the in-chunk scores
    (chunk-parallel). Bytes: the inputs once, U, W and E in fp32, the chunk-entry joint states. The backward (autograd
    in the torch path) is counted as twice the forward's flops, reading what the forward read and stored."""
    joint = 2 * s.states  # chunk-entry (M, S) in fp32
    gates_bytes = s.N * s.H * 4 * len(gates(ctx.rec))
    fp32 = s.N * s.H * 4
    solve = (s.intra_qk + s.cube + s.intra_v + 2 * s.intra_qk, 2 * s.qk + s.vv + gates_bytes + fp32 * (s.V + 2 * s.K))
    walk = (3 * s.inter + 2 * s.inter, fp32 * (s.V + 2 * s.K) + fp32 * s.V + joint + 2 * ends)
    out = (2 * s.inter + s.intra_qk + s.intra_v, 2 * s.qk + fp32 * s.V + joint + s.vv)
    forward = [("titans_solve", True, *solve), ("titans_walk", True, *walk), ("titans_output", True, *out)]
    flops = sum(f for _, _, f, _ in forward)
    nbytes = sum(b for _, _, _, b in forward)
    return forward + [("titans_backward", False, 2 * flops, nbytes + 2 * s.qk + 2 * s.vv + gates_bytes)]


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
    auto_torch_reason="the Titans Triton kernels have not run on a GPU yet (bench/titans_gpu.py); backend='triton' "
                      "forces them",
)
