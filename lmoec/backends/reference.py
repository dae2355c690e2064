"""The oracle: the unified recurrence, token by token, exactly as DESIGN.md writes it.

Every other backend is tested against this. It is deliberately the plainest
possible code: one loop over time, no chunking, no tricks; each token is the
step of the recurrence's kind (lmoec.kinds). It runs in the dtype of its
inputs (tests call it in float64).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ir.nodes import Recurrence
from ..kinds import kind_of


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
    gv: Optional[torch.Tensor] = None,
    dt: Optional[torch.Tensor] = None,
    A: Optional[torch.Tensor] = None,
    theta: Optional[torch.Tensor] = None,
    eta: Optional[torch.Tensor] = None,
    alpha: Optional[torch.Tensor] = None,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
):
    """Token-by-token recurrence; arguments as in the op contract (already checked)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    dtype = torch.promote_types(q.dtype, torch.float32)
    def whole(x):  # a per-head argument, the same at every token
        return None if x is None else x.to(dtype)[None]

    if g is not None and g.dim() == 1:  # constant decay given per head
        g = g.view(1, 1, H).expand(B, T, H)

    if cu_seqlens is None:
        bounds = [(i, 0, T) for i in range(B)]
    else:
        offs = cu_seqlens.tolist()
        bounds = [(0, offs[i], offs[i + 1]) for i in range(len(offs) - 1)]

    kind = kind_of(rec)
    step = kind.oracle_step
    o = torch.empty(B, T, H, V, dtype=dtype, device=q.device)
    finals = []
    for n, (bi, start, end) in enumerate(bounds):
        if initial_state is not None:
            S = initial_state[n].to(dtype)
        else:
            S = torch.zeros(H, K + kind.state_rows, kind.state_width * V, dtype=dtype, device=q.device)
        S = kind.oracle_state_in(rec, S.unsqueeze(0))
        for t in range(start, end):
            def at(x):
                return None if x is None else x[bi : bi + 1, t].to(dtype)

            inputs = {"g": at(g), "beta": at(beta), "u": None if u is None else u.to(dtype)[None], "a": at(a), "b": at(b),
                      "gv": at(gv), "dt": at(dt), "A": None if A is None else A.to(dtype)[None],
                      "theta": at(theta), "eta": at(eta), "alpha": at(alpha), "ln_weight": whole(ln_weight),
                      "ln_bias": whole(ln_bias), "position": t - start}
            S, o_t = step(rec, S, at(q), at(k), at(v), inputs, scale)
            o[bi, t] = o_t[0]
        finals.append(kind.oracle_state_out(rec, S)[0])
    final = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final
