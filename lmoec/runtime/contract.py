"""The kernel-level op contract, checked once in front of every backend.

`op(q, k, v, g=None, beta=None, u=None, a=None, b=None, scale=None,
initial_state=None, output_final_state=False, cu_seqlens=None)`, plus `gv`, or `dt` and
`A`, for element-wise gates (lmoec.kinds.elementwise), or `theta` [, `eta`, `alpha`] for a Titans update
(lmoec.kinds.titans, whose states are [N, H, K, 2V]: the memory, then its momentum), or `theta`, `ln_weight`,
`ln_bias` for TTT-Linear (lmoec.kinds.ttt, K = V, states [N, H, K + 1, V]: W, then the inner bias), layout
[B, T, H, D] (the flash-linear-attention convention). An argument the spec
does not declare, or a tensor of the wrong shape, is a ValueError that says
which argument and why, before any kernel runs.

The checks read shapes and dtypes only, never tensor values, except the offsets in `cu_seqlens`: those are
read back (a host sync on GPU) once per tensor by `sequence_offsets`, which the backends share for the host
copy they need anyway to lay out the sequences. Under torch.compile they are checked where the registered op
runs, not while tracing.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from ..ir.nodes import Recurrence


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


# (cu_seqlens tensor, its version counter, its offsets) of the last few tensors read: one read-back per tensor,
# not one per layer and call (a tensor is matched by identity: tensors compare by value)
_OFFSETS: list[tuple[weakref.ref, int, list[int]]] = []
_OFFSETS_KEPT = 8


def sequence_offsets(cu_seqlens: torch.Tensor, T: Optional[int] = None, name: str = "op") -> list[int]:
    """cu_seqlens as a host list, read back once per tensor (again only after it is changed in place);
    with T, checked to rise from 0 to T (ValueError naming `name`)."""
    version = cu_seqlens._version
    offsets = next((o for ref, v, o in _OFFSETS if ref() is cu_seqlens and v == version), None)
    if offsets is None:
        offsets = cu_seqlens.tolist()
        _OFFSETS[:] = [(weakref.ref(cu_seqlens), version, offsets)] + _OFFSETS[: _OFFSETS_KEPT - 1]
    if T is not None and (offsets[0] != 0 or offsets[-1] != T or any(b < a for a, b in zip(offsets, offsets[1:]))):
        raise ValueError(f"{name}: cu_seqlens must rise from 0 to T={T}, got {offsets}")
    return list(offsets)


def check_op_args(
    rec: Recurrence,
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    u: Optional[torch.Tensor] = None,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    gv: Optional[torch.Tensor] = None,
    dt: Optional[torch.Tensor] = None,
    A: Optional[torch.Tensor] = None,
    theta: Optional[torch.Tensor] = None,
    eta: Optional[torch.Tensor] = None,
    alpha: Optional[torch.Tensor] = None,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
) -> None:
    """Raise ValueError naming the first argument that breaks the contract."""

    def fail(msg: str) -> None:
        raise ValueError(f"{name}: {msg}")

    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            fail(f"{arg} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            fail(f"{arg} must be [B, T, H, D], got shape {_shape(t)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        fail(f"k must have q's shape {_shape(q)}, got {_shape(k)}")
    if v.shape[:3] != q.shape[:3]:
        fail(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {_shape(v)}")
    V = v.shape[-1]
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        # no silent cast here: the caller picks the compute dtype (the emitted layers cast q and k to v's)
        hint = ""
        if q.dtype.is_floating_point and torch.is_autocast_enabled(q.device.type):
            hint = (" (autocast is on: a feature map or gate that ran in float32 must be cast back to the"
                    " autocast dtype before the op)")
        fail(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}{hint}")

    def expect(arg: str, t: Optional[torch.Tensor], wanted: bool, why: str, shapes: list[tuple]) -> None:
        if t is None:
            if wanted:
                fail(f"{arg} is required: {why}")
            return
        if not wanted:
            fail(f"{arg} is not accepted: {why}")
        if not isinstance(t, torch.Tensor):
            fail(f"{arg} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) not in shapes:
            want = " or ".join("[" + ", ".join(map(str, s)) + "]" for s in shapes)
            fail(f"{arg} must have shape {want}, got {_shape(t)}")

    family = rec.family.value
    if rec.decay == "none":
        expect("g", g, False, f"this {family} recurrence has no decay", [])
    elif rec.decay == "vector":
        expect("g", g, True, "the spec declares a vector decay (log decay per key)", [(B, T, H, K)])
    elif rec.decay == "constant":
        expect("g", g, True, "the spec declares a constant decay (log decay per head)", [(H,), (B, T, H)])
    else:
        expect("g", g, True, "the spec declares a scalar decay (log decay per head and token)", [(B, T, H)])
    expect("beta", beta, rec.delta and not rec.dplr, "beta belongs to the delta rule" if rec.delta else f"the {family} recurrence has no delta rule", [(B, T, H)])
    expect("u", u, rec.bonus, "u is RWKV6's bonus" if rec.bonus else "the spec declares no bonus term u", [(H, K)])
    why_ab = "a and b are the DPLR rank-one terms" if rec.dplr else "the spec declares no DPLR terms"
    expect("a", a, rec.dplr, why_ab, [(B, T, H, K)])
    expect("b", b, rec.dplr, why_ab, [(B, T, H, K)])
    outer_sum, outer_product = rec.elementwise == "outer_sum", rec.elementwise == "outer_product"
    expect("gv", gv, outer_sum, "gv is the value-side log gate of the outer-sum gate g 1^T + 1 gv^T" if outer_sum
           else "the spec declares no value-side decay", [(B, T, H, V)])
    why_dt = ("dt (step) and A (rate) make the outer-product gate exp(dt A)" if outer_product
              else "the spec declares no step and rate (Mamba's outer-product gate)")
    expect("dt", dt, outer_product, why_dt, [(B, T, H, V)])
    expect("A", A, outer_product, why_dt, [(H, V, K)])
    titans, ttt = rec.update == "titans", rec.update == "ttt"
    expect("theta", theta, titans or ttt, "theta is the inner learning rate of the update" if titans or ttt
           else "the spec declares no test-time-training update (beyond the delta rule)", [(B, T, H)])
    why_ln = "ln_weight and ln_bias are TTT-Linear's inner LayerNorm" if ttt else "the spec's update has no inner LayerNorm"
    expect("ln_weight", ln_weight, ttt, why_ln, [(H, V)])
    expect("ln_bias", ln_bias, ttt, why_ln, [(H, V)])
    if ttt and K != V:
        fail(f"TTT-Linear's inner model k + LN(k W + b) needs K = V, got K={K}, V={V}")
    expect("eta", eta, titans and rec.momentum, "eta is the momentum gate of the update" if rec.momentum
           else "the spec's update has no momentum", [(B, T, H)])
    expect("alpha", alpha, titans and rec.weight_decay, "alpha is the weight decay of the update" if rec.weight_decay
           else "the spec's update has no weight decay", [(B, T, H)])

    n_seq = B
    if cu_seqlens is not None:
        if B != 1:
            fail(f"with cu_seqlens, sequences are packed along T and B must be 1, got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            fail("cu_seqlens must be a 1-D int32/int64 tensor [N+1] of sequence offsets")
        if not torch.compiler.is_compiling():  # traced: the registered op checks the values when it runs
            sequence_offsets(cu_seqlens, T, name)
        n_seq = cu_seqlens.numel() - 1
    if initial_state is not None:
        if titans and tuple(initial_state.shape) != (n_seq, H, K, 2 * V):
            fail(f"initial_state must be [N, H, K, 2V] = [{n_seq}, {H}, {K}, {2 * V}] (the memory, then its "
                 f"momentum), got {_shape(initial_state)}")
        if ttt and tuple(initial_state.shape) != (n_seq, H, K + 1, V):
            fail(f"initial_state must be [N, H, K + 1, V] = [{n_seq}, {H}, {K + 1}, {V}] (W, then the inner bias b), "
                 f"got {_shape(initial_state)}")
        if not (titans or ttt) and tuple(initial_state.shape) != (n_seq, H, K, V):
            fail(f"initial_state must be [N, H, K, V] = [{n_seq}, {H}, {K}, {V}], got {_shape(initial_state)}")
