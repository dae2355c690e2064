"""The Triton backend: whether a recurrence gets Triton kernels, and their emission by its kind (lmoec.kinds)."""
from __future__ import annotations

from ..kinds import kind_of
from .context import LSMContext

MIN_TILE = 16  # the smallest tl.dot operand: every kind tiles its chunk with it


def supports(ctx: LSMContext) -> tuple[bool, str]:
    """(ok, reason): whether Triton kernels are emitted for this recurrence, and why not."""
    C = ctx.chunk_size
    if C < MIN_TILE or C & (C - 1):
        return False, f"chunk size {C} must be a power of two >= {MIN_TILE} for the Triton kernels"
    return kind_of(ctx.rec).supports(ctx)


def emit(ctx: LSMContext, header: str) -> str:
    """The source of `<lsm>_triton.py`: kernels plus `chunk(...)` (autograd) and `step(...)`."""
    ok, reason = supports(ctx)
    if not ok:
        raise ValueError(reason)
    return kind_of(ctx.rec).emit_triton(ctx, header)
