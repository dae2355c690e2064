"""The TTT-Linear kind (Sun et al., 2024): mini-batch gradient descent on a LayerNorm inner model with a residual.

Per head, the inner model is f(x) = x + LN(x W + b) with W [K, V], b [V] (K = V) and the LayerNorm's weight and
bias (ln_weight, ln_bias [H, V]) learned by the outer model. Each token's loss is l = 1/2 |f(k) - v|^2, i.e. LN(k W + b)
fitted to the target v - k. Within a mini-batch of N tokens every gradient is taken at the mini-batch's first
(W, b) and token t's step scales it by its own learning rate theta_t:

    (W, b)_t = (W, b)_{t-1} - theta_t grad l((W, b)_*; k_t, v_t)        o_t = q_t + LN(q_t W_t + b_t)

the output reading every token's partial update (the "dual form"). The LayerNorm makes the update non-linear in
the state, so mini-batches run in order (templates/torch/ttt.py.j2) and there is no affine map for LASP-2. Ops carry
the state as [N, H, K + 1, V]: W, then b as the last row.

Triton kernels (templates/triton/ttt.py.j2): a walk per (sequence, head) over the mini-batches holding (W, b) in
registers, each mini-batch's steps, dual-form output and update in the walk; the backward a reverse walk from the
stored mini-batch entry states.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..ir.nodes import Family, Recurrence
from . import Kind
from .decay import read

if TYPE_CHECKING:
    from ..backends.context import LSMContext
    from ..backends.stats import Sizes

EPS = 1e-6  # the inner LayerNorm's epsilon
GATES = ["theta", "ln_weight", "ln_bias"]  # the op's arguments: the lr [B, T, H], the LayerNorm's [H, V] params


def layer_norm(z, weight, bias):
    """(LN(z), z normalized, 1 / std) over the last dim."""
    centered = z - z.mean(-1, keepdim=True)
    inv_std = ((centered * centered).mean(-1, keepdim=True) + EPS).rsqrt()
    normalized = centered * inv_std
    return normalized * weight + bias, normalized, inv_std


def inner_gradient(k, v, W, b, weight, bias):
    """d l / d z at z = k W + b for l = 1/2 |LN(z) - (v - k)|^2: the LayerNorm's backward, written out."""
    z = read(k, W) + b
    out, normalized, inv_std = layer_norm(z, weight, bias)
    d_normalized = (out - (v - k)) * weight
    return inv_std * (d_normalized - d_normalized.mean(-1, keepdim=True)
                      - normalized * (d_normalized * normalized).mean(-1, keepdim=True))


def oracle_state_in(rec: Recurrence, state):
    """The oracle's working state [.., K + 1, 2V]: (W; b) and the gradient point, set at each mini-batch start."""
    import torch

    return torch.cat([state, state], dim=-1)


def oracle_state_out(rec: Recurrence, state):
    return state[..., : state.shape[-1] // 2]


def oracle_step(rec: Recurrence, state, q, k, v, inputs, scale):
    """One token, exactly as the module docstring writes it (scale is 1: validate and the op check it)."""
    import torch

    V = state.shape[-1] // 2
    current, anchor = state[..., :V], state[..., V:]
    if inputs["position"] % rec.minibatch == 0:
        anchor = current
    weight, bias = inputs["ln_weight"], inputs["ln_bias"]
    dz = inner_gradient(k, v, anchor[..., :-1, :], anchor[..., -1, :], weight, bias)
    theta = inputs["theta"][..., None]
    step = torch.cat([k[..., :, None] * dz[..., None, :], dz[..., None, :]], dim=-2)  # (grad W; grad b)
    current = current - theta[..., None] * step
    out = q + layer_norm(read(q, current[..., :-1, :]) + current[..., -1, :], weight, bias)[0]
    return torch.cat([current, anchor], dim=-1), out


MAX_TRITON_MINIBATCH = 64  # a mini-batch is one tile of the walks: its [N, D] and [N, N] tiles sit in registers


def supports(ctx: "LSMContext") -> tuple[bool, str]:
    """Mini-batches up to 64 tokens (templates/triton/ttt.py.j2; head dims up to 128 are checked when the op runs)."""
    if ctx.rec.minibatch > MAX_TRITON_MINIBATCH:
        return False, (f"the TTT-Linear Triton walks take minibatch(N) with N <= {MAX_TRITON_MINIBATCH} (a mini-batch is "
                       f"one tile in registers), got {ctx.rec.minibatch}: the torch path runs it")
    return True, ""


def emit_triton(ctx: "LSMContext", header: str) -> str:
    from ..backends.render import render

    return render("triton/ttt.py.j2", ctx=ctx, header=header, max_dim=KIND.triton_max_head_dim)


def costs(ctx: "LSMContext", s: "Sizes", ends: int):
    """templates/triton/ttt.py.j2 (the torch path computes the same products; its backward is autograd's), per
    mini-batch of N tokens (s.C is the chunk; the mini-batch is rec.minibatch). Forward: k W and q W ([N, K] x [K, V]),
    the in-batch scores q k^T and their product with the steps, the update k^T dz; element-wise LayerNorms (forward,
    backward, output) at ~10 flops per value. Backward: the forward's again but the update, six more products of a
    token by a state (k dW, dZ W^T, dz dW^T, dz0 W^T, q^T dZ, k^T dz0) and four more in-batch ones, the LayerNorms'
    backwards at twice the forward's element-wise work. Bytes: the inputs and outputs once, the mini-batch entry
    states in fp32 written by the forward and read by the backward."""
    b = ctx.rec.minibatch
    entries = -(-s.N // b) * s.H * (s.K + 1) * s.V * 4
    in_batch = s.N * s.H * b * (s.K + s.V)  # one in-batch product ([N, K] x [K, N] or [N, N] x [N, V]; K = V)
    forward = 3 * s.inter + 2 * in_batch + 30 * s.N * s.H * s.V
    backward = 8 * s.inter + 6 * in_batch + 60 * s.N * s.H * s.V
    nbytes = 3 * s.qk + s.vv + s.N * s.H * 4 + entries + ends
    return [("ttt_fwd_walk", True, forward, nbytes), ("ttt_bwd_walk", False, backward, nbytes + s.vv + 3 * s.qk)]


KIND = Kind(
    family=Family.ttt,
    matches=lambda rec: rec.update == "ttt",
    oracle_step=oracle_step,
    torch_template="torch/ttt.py.j2",
    supports=supports,
    emit_triton=emit_triton,
    costs=costs,
    lasp2_map=None,
    state_rows=1,
    triton_max_head_dim=128,  # the walks hold W [D, D] fp32 in one program's registers
    oracle_state_in=oracle_state_in,
    oracle_state_out=oracle_state_out,
)  # on by default since bench/ttt_gpu.py check passed on an H100 (2026-12-07: every row, both output placements)
