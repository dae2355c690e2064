"""LASP-2 and LASP-2H: sequence parallelism for LSM ops and softmax attention.

Each rank of the sequence-parallel group holds a contiguous, equal-length slice
of T (rank 0 the first). Over its slice an LSM recurrence is an affine map of
the incoming state, S -> A_r S + M_r (DESIGN.md): M_r is the final state from a
zero initial state, A_r the product of the slice's transitions. One all_gather
of (A_r, M_r) in fp32 lets every rank compose the prefix of the ranks before it
into its own initial state; by linearity its outputs are then the zero-state
outputs plus a correction that reads that initial state, so the op runs once
per rank (twice for the matrix families, see `_matrix_map`, and for element-wise gates, whose correction
would be a [B, T, H, K, V] tensor: they run again from the composed state instead). A joint state (Titans' memory
and momentum, [B, H, K, 2V] in the op) is carried stacked as [B, H, 2K, V]: its map is a [2K, 2K] matrix, found
by the matrix families' route.

Gradients flow through a differentiable all_gather, so backward is exact
autograd of the same computation. Conventions for replicated inputs:

* `initial_state` is read on the group's first rank only (it is folded into
  rank 0's M), so its gradient lands there, whole.
* `u` and a per-head constant `g` [H] are used by every rank; each rank's
  gradient is its part, and the sum over the group is the full gradient (the
  sp all-reduce a trainer does for any replicated parameter).
* the final state is the state after the last rank's slice, computed on every
  rank from the gathered maps (no extra collective); its autograd graph is live
  on every rank, so a loss should read it on one rank only.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..ir.nodes import Family, Recurrence
from ..kinds import kind_of


def recurrence_of(op: Callable) -> Recurrence:
    """The `Recurrence` an emitted op was specialized on (its module's RECURRENCE)."""
    rec = getattr(sys.modules[op.__module__], "RECURRENCE", None)
    if not isinstance(rec, Recurrence):
        raise ValueError(f"lasp2: {op.__module__}.{op.__name__} is not an emitted LSM op (its module has no RECURRENCE)")
    return rec


def transition_kind(rec: Recurrence, g: Optional[torch.Tensor]) -> str:
    """How A_r is represented: 'identity', 'constant' ([H], known to all), 'scalar' [B,H], 'vector' [B,H,K], 'matrix'
    [B,H,K,K], 'elementwise' [B,H,K,V]."""
    family = rec.family
    if family is Family.ttt:
        raise ValueError("lasp2: TTT-Linear's update is not affine in its state (the inner LayerNorm): no LASP-2 map")
    if family in (Family.delta, Family.dplr, Family.titans):
        return "matrix"
    if family is Family.elementwise:
        return "elementwise"
    if family is Family.additive:
        return "identity"
    if family is Family.constant and g is not None and g.dim() == 1:
        return "constant"
    return "vector" if family is Family.vector else "scalar"


def _group_info(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGather(torch.autograd.Function):
    """all_gather whose backward always runs on every rank of the group.

    Outputs (tie, *pieces): `tie` is a zero scalar that callers add to their
    local output, so the node is on every rank's backward path even where the
    gathered pieces do not reach the loss (rank 0 reads no other rank's map).
    A backward skipped on one rank would leave the others waiting in the
    collective. Backward: each rank gets the sum over the group of the
    gradients of its piece (a reduce-scatter).
    """

    @staticmethod
    def forward(ctx, group, x):
        ctx.group = group
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x, group=group)
        return (x.new_zeros(()), *pieces)

    @staticmethod
    def backward(ctx, _tie_grad, *grads):
        group = ctx.group
        rank = dist.get_rank(group)
        stacked = torch.stack([g.contiguous() for g in grads])
        if dist.get_backend(group) == dist.Backend.NCCL:
            mine = torch.empty_like(stacked[0])
            dist.reduce_scatter_tensor(mine, stacked, group=group)
        else:  # gloo has no reduce_scatter: all_reduce everything, keep our row
            dist.all_reduce(stacked, group=group)
            mine = stacked[rank]
        return None, mine


def _gather(x: torch.Tensor, group) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(tie, pieces): all_gather with autograd; add `tie` to the local output (see _AllGather)."""
    tie, *pieces = _AllGather.apply(group, x.contiguous())
    return tie, pieces


def _apply_transition(kind: str, A: Optional[torch.Tensor], S: torch.Tensor) -> torch.Tensor:
    """A S for a state S [B, H, K, V]."""
    if kind == "identity":
        return S
    if kind == "constant":
        return A[None, :, None, None] * S
    if kind == "scalar":
        return A[..., None, None] * S
    if kind == "vector":
        return A[..., None] * S
    if kind == "elementwise":
        return A * S
    return A @ S


def _diagonal_map(kind: str, q, g, T: int, scale: float, bonus: bool, state_dtype):
    """A_r and the correction basis Qb [B,T,H,K] (o_t += Qb_t^T S_in) for the diagonal families.

    With inclusive cumulative log decay G_t, the state after t tokens from S_in is
    Diag(exp G_t) S_in + (zero-state part), so o_t gains scale * (q_t * exp G_t)^T S_in.
    A bonus op reads S_{t-1}: the exclusive cumsum. G <= 0, so exp never overflows.
    """
    qf = q.to(state_dtype) * scale
    if kind == "identity":
        return None, qf
    if kind == "constant":
        first = 0 if bonus else 1
        steps = torch.arange(first, T + first, device=q.device, dtype=state_dtype)
        G = (steps[:, None] * g.to(state_dtype)[None, :])[None, :, :, None]  # [1, T, H, 1]
        A = torch.exp(T * g.to(state_dtype))
    else:
        g_ = g.to(state_dtype)
        G = torch.cumsum(g_, dim=1)  # [B,T,H] or [B,T,H,K]
        A = torch.exp(G[:, -1])
        if bonus:
            G = G - g_
        if kind == "scalar":
            G = G[..., None]
    return A, qf * torch.exp(G)


def _elementwise_map(rec: Recurrence, g: Optional[torch.Tensor], gates: dict, state_dtype) -> torch.Tensor:
    """A_r [B,H,K,V]: exp of the slice's summed log gate, in closed form for both shapes (outer sums and outer
    products with one rate sum over time term by term)."""
    if rec.elementwise == "outer_product":
        steps = gates["dt"].to(state_dtype).sum(1)  # [B, H, V]
        return torch.exp(steps[..., None, :] * gates["A"].to(state_dtype).transpose(-1, -2))
    G = gates["gv"].to(state_dtype).sum(1)[..., None, :]
    if g is not None:
        G = G + g.to(state_dtype).sum(1)[..., :, None]
    return torch.exp(G)


def _stack(state: torch.Tensor, width: int) -> torch.Tensor:
    """An op's state [.., K, width * V] as the stacked rows [.., width * K, V] the maps act on."""
    return state if width == 1 else torch.cat(state.split(state.shape[-1] // width, dim=-1), dim=-2)


def _unstack(rows: torch.Tensor, width: int) -> torch.Tensor:
    """The stacked rows [.., width * K, V] back as an op's state [.., K, width * V]."""
    return rows if width == 1 else torch.cat(rows.split(rows.shape[-2] // width, dim=-2), dim=-1)


def _matrix_map(op, q, k, args: dict, scale: float, state_dtype, op_kwargs, width: int = 1, cu_seqlens=None):
    """A_r [N,H,R,R] (R = width * K: the stacked rows of the state) and the correction basis [B,T,H,R], by running the
    op itself on v = 0 from S_in = I (R value columns).

    The value term vanishes, so the final state is the product of the slice's
    transitions and o_t = scale * P_t^T q_t: generic and exact for every family.
    """
    B, T, H, K = q.shape
    R = width * K
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    eye = _unstack(torch.eye(R, device=q.device, dtype=state_dtype).expand(N, H, R, R), width).contiguous()
    basis, A = op(q, k, q.new_zeros(B, T, H, R), **args, scale=scale, initial_state=eye, output_final_state=True,
                  cu_seqlens=cu_seqlens, **op_kwargs)
    return _stack(A, width).to(state_dtype), basis.to(state_dtype)


def lasp2_op(
    op: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    u: Optional[torch.Tensor] = None,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    transition: str = "auto",
    **op_kwargs,
):
    """Sequence-parallel `op` over `group`: same arguments and results as the op on the whole sequence.

    q, k, v, g, beta, a, b (and element-wise gates gv, dt in op_kwargs) are this rank's slice [B, T_local, ...].
    `transition='matrix'` forces the generic K x K route (the one delta/DPLR use) for the decay families.
    With cu_seqlens, every rank holds the same number N of (packed, possibly empty) segments and
    segment i continues segment i of the rank before: each rank's local slice of N sequences (the
    (memory, batch) segments of a layer with memories, lmoec.runtime.memories).
    Extra keyword arguments (e.g. backend=, an element-wise op's gates) go to the op.
    """
    if transition not in ("auto", "matrix"):
        raise ValueError(f"lasp2: transition must be 'auto' or 'matrix', got {transition!r}")
    group = group if group is not None else dist.group.WORLD
    rank, world = _group_info(group)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    args = {name: t for name, t in (("g", g), ("beta", beta), ("u", u), ("a", a), ("b", b)) if t is not None}
    if world == 1:
        return op(q, k, v, **args, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens, **op_kwargs)
    if cu_seqlens is not None:
        return _lasp2_segments(op, q, k, v, args, scale, initial_state, output_final_state, cu_seqlens, group,
                               transition, op_kwargs)

    rec = recurrence_of(op)
    kind = transition_kind(rec, g)
    if transition == "matrix":
        if kind == "elementwise":
            raise ValueError("lasp2: transition='matrix' is for the decay families; element-wise gates map S element-wise")
        kind = "matrix"
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T % rec.minibatch:  # each rank's op starts a mini-batch at its slice's start
        raise ValueError(f"lasp2: gradient = minibatch({rec.minibatch}) needs each rank's slice to hold whole "
                         f"mini-batches, got {T} tokens per rank")
    width = kind_of(rec).state_width
    state_dtype = torch.promote_types(q.dtype, torch.float32)

    # Rank 0 starts from the user's state and needs no correction; the others start from zero.
    first_state = initial_state if rank == 0 else None
    o, M = op(q, k, v, **args, scale=scale, initial_state=first_state, output_final_state=True, **op_kwargs)
    M = _stack(M.to(state_dtype), width)

    basis = None
    if kind == "elementwise":
        A = _elementwise_map(rec, g, op_kwargs, state_dtype)
    elif kind == "matrix":
        if rank > 0:
            A, basis = _matrix_map(op, q, k, args, scale, state_dtype, op_kwargs, width)
        else:  # rank 0's A is never read (its initial state is folded into M); send zeros
            A = torch.zeros(B, H, width * K, width * K, device=q.device, dtype=state_dtype)
    else:
        A, basis = _diagonal_map(kind, q, g, T, scale, rec.bonus, state_dtype)
        if rank == 0:  # rank 0 needs no correction: free the [B, T, H, K] basis now
            basis = None

    # One all_gather of (A_r, M_r). A constant decay's A is known everywhere; the identity is not sent.
    sent_A = kind in ("scalar", "vector", "matrix", "elementwise")
    payload = torch.cat([A.reshape(-1), M.reshape(-1)]) if sent_A else M.reshape(-1)
    tie, pieces = _gather(payload, group)
    o = o + tie.to(o.dtype)
    n_A = A.numel() if sent_A else 0

    def A_of(j: int):
        return pieces[j][:n_A].view_as(A) if sent_A else A

    def M_of(j: int):
        return pieces[j][n_A:].view(B, H, width * K, V)

    S = M_of(0)
    for j in range(1, world):
        if j == rank and kind == "elementwise":  # the slice again, from its composed initial state
            o_again, _ = op(q, k, v, **args, scale=scale, initial_state=S.to(state_dtype), output_final_state=False, **op_kwargs)
            o = o_again + tie.to(o.dtype)
        elif j == rank:
            o = o + torch.einsum("bthk,bhkv->bthv", basis, S).to(o.dtype)
        S = _apply_transition(kind, A_of(j), S) + M_of(j)
    return o, (_unstack(S, width) if output_final_state else None)


def _segment_transitions(kind: str, g: Optional[torch.Tensor], cu_seqlens: torch.Tensor, state_dtype):
    """(kind, A [N, ...]): each segment's product of transitions for the diagonal families, in closed form.

    The log decays are summed per segment as differences of one float64 cumulative sum over the packed rows
    (float64: a difference of two long sums keeps its precision). A constant decay's A depends on the
    segment's length, so it travels as a scalar per (segment, head).
    """
    if kind == "identity":
        return kind, None
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.float64)
    if kind == "constant":
        return "scalar", torch.exp(lengths[:, None] * g.to(torch.float64)[None, :]).to(state_dtype)
    return kind, torch.exp(_segment_sums(g, cu_seqlens)).to(state_dtype)


def _segment_sums(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[N, ...]: x [1, T, ...] summed over each packed segment, as differences of one float64 cumulative sum."""
    total = torch.cumsum(x[0].to(torch.float64), 0)
    total = torch.cat([total.new_zeros(1, *total.shape[1:]), total])
    return total[cu_seqlens[1:]] - total[cu_seqlens[:-1]]


def _segment_elementwise_map(rec: Recurrence, g: Optional[torch.Tensor], gates: dict, cu_seqlens: torch.Tensor,
                             state_dtype) -> torch.Tensor:
    """A [N, H, K, V] of each segment for element-wise gates: _elementwise_map with sums per segment."""
    if rec.elementwise == "outer_product":
        steps = _segment_sums(gates["dt"], cu_seqlens)  # [N, H, V]
        return torch.exp(steps[..., None, :] * gates["A"].to(torch.float64).transpose(-1, -2)).to(state_dtype)
    G = _segment_sums(gates["gv"], cu_seqlens)[..., None, :]
    if g is not None:
        G = G + _segment_sums(g, cu_seqlens)[..., :, None]
    return torch.exp(G).to(state_dtype)


def _lasp2_segments(op, q, k, v, args, scale, initial_state, output_final_state, cu_seqlens, group, transition, op_kwargs):
    """lasp2_op over N segments that continue across ranks (see lasp2_op): maps per segment, then the op again.

    Each rank sends (A_i, M_i) of its N segments. A segment's rows read its entry state through a
    different per-row basis in each segment, so instead of a correction term the op runs a second time,
    from the exact entry states (one op call more than the plain path; rank 0 needs only one).
    """
    rank, world = _group_info(group)
    rec = recurrence_of(op)
    state_dtype = torch.promote_types(q.dtype, torch.float32)
    kind = transition_kind(rec, args.get("g"))
    if transition == "matrix":
        if kind == "elementwise":
            raise ValueError("lasp2: transition='matrix' is for the decay families; element-wise gates map S element-wise")
        kind = "matrix"
    if rec.minibatch > 1:  # (raised on every rank: segment lengths differ by rank, and a check on some would hang)
        raise ValueError(f"lasp2: gradient = minibatch({rec.minibatch}) over segments that continue across ranks "
                         "would start mini-batches at each rank's segment starts: not supported")
    width = kind_of(rec).state_width
    if rank == 0:  # from the caller's state: this is rank 0's output
        o, M = op(q, k, v, **args, scale=scale, initial_state=initial_state, output_final_state=True,
                  cu_seqlens=cu_seqlens, **op_kwargs)
    else:
        _, M = op(q, k, v, **args, scale=scale, output_final_state=True, cu_seqlens=cu_seqlens, **op_kwargs)
    M = _stack(M.to(state_dtype), width)
    N, H, R, V = M.shape
    if kind == "matrix":
        A = _matrix_map(op, q, k, args, scale, state_dtype, op_kwargs, width, cu_seqlens)[0]
    elif kind == "elementwise":
        A = _segment_elementwise_map(rec, args.get("g"), op_kwargs, cu_seqlens, state_dtype)
    else:
        kind, A = _segment_transitions(kind, args.get("g"), cu_seqlens, state_dtype)
    payload = M.reshape(-1) if A is None else torch.cat([A.reshape(-1), M.reshape(-1)])
    tie, pieces = _gather(payload, group)
    n_A = 0 if A is None else A.numel()
    S = pieces[0][n_A:].view(N, H, R, V)
    for j in range(1, world):
        if j == rank:
            o = op(q, k, v, **args, scale=scale, initial_state=_unstack(S, width), cu_seqlens=cu_seqlens, **op_kwargs)[0]
        S = _apply_transition(kind, None if A is None else pieces[j][:n_A].view_as(A), S) + pieces[j][n_A:].view(N, H, R, V)
    return o + tie.to(o.dtype), (_unstack(S, width) if output_final_state else None)


def lasp2h_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """LASP-2H: causal softmax attention over a sequence split across `group`.

    q [B, T_local, H, D], k and v [B, T_local, H_kv, D] (H a multiple of H_kv).
    K and V are all-gathered (backward reduce-scatters their gradients); a rank's
    queries see every key of the ranks before it and the causal keys of its own
    slice: causal attention aligned to the bottom right of the visible keys.
    """
    group = group if group is not None else dist.group.WORLD
    rank, world = _group_info(group)
    T = q.shape[1]
    if world > 1:
        # one collective for K and V; every rank reads its own piece, so the gather is on every backward path
        D_k = k.shape[-1]
        kv = torch.cat(_gather(torch.cat([k, v], dim=-1), group)[1], dim=1)[:, : (rank + 1) * T]
        k, v = kv[..., :D_k], kv[..., D_k:]
    H, H_kv = q.shape[2], k.shape[2]
    if H % H_kv:
        raise ValueError(f"lasp2h: query heads {H} are not a multiple of key/value heads {H_kv}")
    if H != H_kv:
        k = k.repeat_interleave(H // H_kv, dim=2)
        v = v.repeat_interleave(H // H_kv, dim=2)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if rank == 0 or world == 1:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    else:
        from torch.nn.attention.bias import causal_lower_right

        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=causal_lower_right(T, kt.shape[2]), scale=scale)
    return o.transpose(1, 2)
