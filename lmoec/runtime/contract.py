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

import functools
import math
import numbers
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


class _Checker:
    """The checks the op and the decode step share; each failure is one ValueError prefixed with `name`."""

    def __init__(self, name: str):
        self.name = name

    def fail(self, msg: str) -> None:
        raise ValueError(f"{self.name}: {msg}")

    def qkv(self, q, k, v, layout: str) -> tuple:
        """(leading dims of q, K, V) after checking q, k, v: tensors of `layout` ("[B, T, H, D]" or "[B, H, D]"),
        k shaped as q, v as q but its last dim, head dims at least 1, one device, one real floating dtype."""
        rank = layout.count(",") + 1
        for arg, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                self.fail(f"{arg} must be a tensor, got {type(t).__name__}")
            if t.dim() != rank:
                self.fail(f"{arg} must be {layout}, got shape {_shape(t)}")
        if k.shape != q.shape:
            self.fail(f"k must have q's shape {_shape(q)}, got {_shape(k)}")
        if v.shape[:-1] != q.shape[:-1]:
            self.fail(f"v must be {layout[:-2]}V] = [{', '.join(map(str, q.shape[:-1]))}, V], got {_shape(v)}")
        K, V = q.shape[-1], v.shape[-1]
        if K == 0 or V == 0:
            self.fail(f"the head dims must be at least 1, got K={K}, V={V}")
        if k.device != q.device or v.device != q.device:
            self.fail(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
        if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
            # no silent cast here: the caller picks the compute dtype (the emitted layers cast q and k to v's)
            hint = ""
            if q.dtype.is_floating_point and torch.is_autocast_enabled(q.device.type):
                hint = (" (autocast is on: a feature map or gate that ran in float32 must be cast back to the"
                        " autocast dtype before the op)")
            self.fail(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}{hint}")
        return tuple(q.shape[:-2]), K, V

    def scale(self, scale) -> None:
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale)):
            self.fail(f"scale must be a finite real number (or None for the default), got {scale!r}")

    def real_tensor(self, arg: str, t, device: torch.device) -> None:
        """A tensor of real floating dtype on q's device: an integer, boolean or complex gate or state would be
        cast silently by one backend and rejected deep inside another."""
        if not isinstance(t, torch.Tensor):
            self.fail(f"{arg} must be a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            self.fail(f"{arg} must have a real floating dtype, got {t.dtype}")
        if t.device != device:
            self.fail(f"{arg} is on {t.device}, q on {device}: every tensor argument but cu_seqlens must be on q's device")

    def arguments(self, rec: Recurrence, given: dict, tokens: tuple, H: int, K: int, V: int, device) -> None:
        """Each argument of `given` (name -> tensor or None) that the recurrence takes is there, shaped as
        `_argument_table` says with `tokens` the per-token leading dims; each it does not take is absent."""
        for arg, wanted, why, shapes in _argument_table(rec, tokens, H, K, V):
            t = given.get(arg)
            if t is None:
                if wanted:
                    self.fail(f"{arg} is required: {why}")
                continue
            if not wanted:
                self.fail(f"{arg} is not accepted: {why}")
            self.real_tensor(arg, t, device)
            if tuple(t.shape) not in shapes:
                want = " or ".join("[" + ", ".join(map(str, s)) + "]" for s in shapes)
                self.fail(f"{arg} must have shape {want}, got {_shape(t)}")
        if rec.update == "ttt" and K != V:
            self.fail(f"TTT-Linear's inner model k + LN(k W + b) needs K = V, got K={K}, V={V}")

    def state(self, arg: str, rec: Recurrence, t, n: int, H: int, K: int, V: int, device, n_dim: str = "N") -> None:
        """A state of `n` sequences (n_dim names that dim: N sequences for the op, B for the step)."""
        self.real_tensor(arg, t, device)
        if rec.update == "titans":
            want, what = (n, H, K, 2 * V), "[{}, H, K, 2V] = [{}, {}, {}, {}] (the memory, then its momentum)"
        elif rec.update == "ttt":
            want, what = (n, H, K + 1, V), "[{}, H, K + 1, V] = [{}, {}, {}, {}] (W, then the inner bias b)"
        else:
            want, what = (n, H, K, V), "[{}, H, K, V] = [{}, {}, {}, {}]"
        if tuple(t.shape) != want:
            self.fail(f"{arg} must have shape {what.format(n_dim, *want)}, got {_shape(t)}")


def _argument_table(rec: Recurrence, tokens: tuple, H: int, K: int, V: int) -> tuple:
    """(argument, taken by this recurrence, why, allowed shapes) of every argument beyond q, k, v; `tokens` is
    (B, T) for the op and (B,) for the decode step. Cached for plain int dims (a layer calls the op with the same
    shapes every step; torch.compile's symbolic sizes do not hash, and under tracing the cache only adds a
    warning: a traced graph checks the shapes once)."""
    if all(type(d) is int for d in (*tokens, H, K, V)) and not torch.compiler.is_compiling():
        return _cached_table(rec, tokens, H, K, V)
    return _table(rec, tokens, H, K, V)


def _table(rec: Recurrence, tokens: tuple, H: int, K: int, V: int) -> tuple:
    family = rec.family.value
    if rec.decay == "none":
        g = (False, f"this {family} recurrence has no decay", [])
    elif rec.decay == "vector":
        g = (True, "the spec declares a vector decay (log decay per key)", [(*tokens, H, K)])
    elif rec.decay == "constant":
        g = (True, "the spec declares a constant decay (log decay per head)", [(H,), (*tokens, H)])
    else:
        g = (True, "the spec declares a scalar decay (log decay per head and token)", [(*tokens, H)])
    why_ab = "a and b are the DPLR rank-one terms" if rec.dplr else "the spec declares no DPLR terms"
    outer_sum, outer_product = rec.elementwise == "outer_sum", rec.elementwise == "outer_product"
    why_dt = ("dt (step) and A (rate) make the outer-product gate exp(dt A)" if outer_product
              else "the spec declares no step and rate (Mamba's outer-product gate)")
    titans, ttt = rec.update == "titans", rec.update == "ttt"
    why_ln = "ln_weight and ln_bias are TTT-Linear's inner LayerNorm" if ttt else "the spec's update has no inner LayerNorm"
    return (
        ("g", *g),
        ("beta", rec.delta and not rec.dplr, "beta belongs to the delta rule" if rec.delta
         else f"the {family} recurrence has no delta rule", [(*tokens, H)]),
        ("u", rec.bonus, "u is RWKV6's bonus" if rec.bonus else "the spec declares no bonus term u", [(H, K)]),
        ("a", rec.dplr, why_ab, [(*tokens, H, K)]),
        ("b", rec.dplr, why_ab, [(*tokens, H, K)]),
        ("gv", outer_sum, "gv is the value-side log gate of the outer-sum gate g 1^T + 1 gv^T" if outer_sum
         else "the spec declares no value-side decay", [(*tokens, H, V)]),
        ("dt", outer_product, why_dt, [(*tokens, H, V)]),
        ("A", outer_product, why_dt, [(H, V, K)]),
        ("theta", titans or ttt, "theta is the inner learning rate of the update" if titans or ttt
         else "the spec declares no test-time-training update (beyond the delta rule)", [(*tokens, H)]),
        ("ln_weight", ttt, why_ln, [(H, V)]),
        ("ln_bias", ttt, why_ln, [(H, V)]),
        ("eta", titans and rec.momentum, "eta is the momentum gate of the update" if rec.momentum
         else "the spec's update has no momentum", [(*tokens, H)]),
        ("alpha", titans and rec.weight_decay, "alpha is the weight decay of the update" if rec.weight_decay
         else "the spec's update has no weight decay", [(*tokens, H)]),
    )


_cached_table = functools.lru_cache(maxsize=256)(_table)


def gate_shapes(rec: Recurrence, B: int, T: int, H: int, K: int, V: int) -> dict[str, tuple]:
    """The shape of every argument beyond q, k, v that the op takes for `rec` (its first allowed shape)."""
    return {name: shapes[0] for name, taken, _, shapes in _table(rec, (B, T), H, K, V) if taken}


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
    scale=None,
    **gates: Optional[torch.Tensor],
) -> None:
    """Raise ValueError naming the first argument that breaks the op's contract; `gates` are the element-wise
    and test-time-training arguments (gv, dt, A, theta, eta, alpha, ln_weight, ln_bias)."""
    check = _Checker(name)
    (B, T), K, V = check.qkv(q, k, v, "[B, T, H, D]")
    H = q.shape[2]
    check.scale(scale)
    check.arguments(rec, dict(g=g, beta=beta, u=u, a=a, b=b, **gates), (B, T), H, K, V, q.device)
    n_seq = B
    if cu_seqlens is not None:
        if B != 1:
            check.fail(f"with cu_seqlens, sequences are packed along T and B must be 1, got B={B}")
        if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2
                or cu_seqlens.dtype not in (torch.int32, torch.int64)):
            check.fail("cu_seqlens must be a 1-D int32/int64 tensor [N+1] of sequence offsets")
        if not torch.compiler.is_compiling():  # traced: the registered op checks the values when it runs
            sequence_offsets(cu_seqlens, T, name)
        n_seq = cu_seqlens.numel() - 1
    if initial_state is not None:
        check.state("initial_state", rec, initial_state, n_seq, H, K, V, q.device)


def check_step_args(rec: Recurrence, name: str, q, k, v, gates: dict, state, scale=None) -> None:
    """Raise ValueError naming the first argument that breaks the decode step's contract: q, k [B, H, K],
    v [B, H, V], the per-token arguments of `gates` without the T dim, state as the op's initial state."""
    check = _Checker(f"{name}.step")
    (B,), K, V = check.qkv(q, k, v, "[B, H, D]")
    H = q.shape[1]
    check.scale(scale)
    check.arguments(rec, gates, (B,), H, K, V, q.device)
    check.state("state", rec, state, B, H, K, V, q.device, n_dim="B")
