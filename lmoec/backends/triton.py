"""The Triton backend: which recurrences it emits kernels for, and their emission.

Delta and DPLR recurrences are emitted by `triton_delta`; the decay families
(additive, constant, scalar, vector) here.
"""
from __future__ import annotations

from ..ir.nodes import Family
from . import triton_delta
from .context import LSMContext


def supports(ctx: LSMContext) -> tuple[bool, str]:
    """(ok, reason): whether Triton kernels are emitted for this recurrence, and why not."""
    if ctx.rec.family in (Family.delta, Family.dplr):
        return triton_delta.supports(ctx)
    return False, f"no Triton kernels are emitted yet for the {ctx.rec.key} recurrence"


def emit(ctx: LSMContext, header: str) -> str:
    """The source of `<lsm>_triton.py`: kernels plus `chunk(...)` (autograd) and `step(...)`."""
    if ctx.rec.family in (Family.delta, Family.dplr):
        return triton_delta.emit(ctx, header)
    raise ValueError(supports(ctx)[1])
