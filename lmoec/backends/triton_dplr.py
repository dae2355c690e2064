"""Triton kernels for the DPLR family (RWKV7's generalized delta rule), rendered from templates/triton/dplr.py.j2.

The chunkwise UT form of templates/triton/delta.py.j2 with its two rank-one vectors made independent:
the removal a and the read b are inputs of their own, there is no beta, and the value key is k itself.
The kernels take a vector log decay; a scalar or constant one is broadcast over K by the emitted wrappers.
Everything but the state recursion runs chunk-parallel; the recursion applies each chunk's affine map
S -> Gam_C * S + P S + M, one matrix product per chunk (the template's docstring has the kernels and grids).
"""
from __future__ import annotations

from .context import LSMContext
from .emit import render


def supports(ctx: LSMContext) -> tuple[bool, str]:
    """(ok, reason): whether this module emits kernels for the recurrence, and why not (the chunk size is
    checked for every family by lmoec.backends.triton.supports)."""
    rec = ctx.rec
    if not rec.dplr:
        return False, f"the {rec.key} recurrence is no DPLR recurrence"
    if rec.decay == "none":
        return False, "the DPLR recurrence without decay has no Triton kernels: use the torch backend"
    return True, ""


def emit(ctx: LSMContext, header: str) -> str:
    """The source of `<lsm>_triton.py` for a DPLR recurrence."""
    ok, reason = supports(ctx)
    if not ok:
        raise ValueError(reason)
    return render("triton/dplr.py.j2", ctx=ctx, header=header)
