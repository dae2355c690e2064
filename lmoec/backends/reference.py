"""The oracle: the unified recurrence, token by token, exactly as DESIGN.md writes it.

Every other backend is tested against this. It is deliberately the plainest
possible code: one loop over time, no chunking, no tricks. It runs in the
dtype of its inputs (tests call it in float64).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ir.nodes import Recurrence


def _step(rec: Recurrence, S, q, k, v, g, beta, u, a, b, scale):
    """One token for all (batch, head) pairs. S: [N,H,K,V]; q,k: [N,H,K]; v: [N,H,V]."""
    S_prev = S
    if rec.decay in ("constant", "scalar"):
        S = S * torch.exp(g)[..., None, None]
    elif rec.decay == "vector":
        S = S * torch.exp(g)[..., :, None]
    if rec.dplr:
        S = S + a[..., :, None] * torch.einsum("nhk,nhkv->nhv", b, S_prev)[..., None, :]
        S = S + k[..., :, None] * v[..., None, :]
    elif rec.delta:
        kS = torch.einsum("nhk,nhkv->nhv", k, S)
        S = S + beta[..., None, None] * k[..., :, None] * (v - kS)[..., None, :]
    else:
        S = S + k[..., :, None] * v[..., None, :]
    if rec.bonus:
        o = torch.einsum("nhk,nhkv->nhv", q, S_prev) + (q * u * k).sum(-1, keepdim=True) * v
    else:
        o = torch.einsum("nhk,nhkv->nhv", q, S)
    return S, o * scale


def recurrent_reference(
    rec: Recurrence,
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
):
    """Token-by-token recurrence; arguments as in the op contract (already checked)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    dtype = torch.promote_types(q.dtype, torch.float32)
    if g is not None and g.dim() == 1:  # constant decay given per head
        g = g.view(1, 1, H).expand(B, T, H)

    if cu_seqlens is None:
        bounds = [(i, 0, T) for i in range(B)]
    else:
        offs = cu_seqlens.tolist()
        bounds = [(0, offs[i], offs[i + 1]) for i in range(len(offs) - 1)]

    o = torch.empty(B, T, H, V, dtype=dtype, device=q.device)
    finals = []
    for n, (bi, start, end) in enumerate(bounds):
        if initial_state is not None:
            S = initial_state[n].to(dtype)
        else:
            S = torch.zeros(H, K, V, dtype=dtype, device=q.device)
        S = S.unsqueeze(0)
        for t in range(start, end):
            def at(x):
                return None if x is None else x[bi : bi + 1, t].to(dtype)

            S, o_t = _step(rec, S, at(q), at(k), at(v), at(g), at(beta), None if u is None else u.to(dtype)[None], at(a), at(b), scale)
            o[bi, t] = o_t[0]
        finals.append(S[0])
    final = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final
