"""Triton kernels for the delta-rule and DPLR families (WY / UT representation)."""
from __future__ import annotations

from .context import LSMContext


def supports(ctx: LSMContext) -> tuple[bool, str]:
    return False, f"no Triton kernels are emitted yet for the {ctx.rec.key} recurrence"


def emit(ctx: LSMContext, header: str) -> str:
    raise ValueError(supports(ctx)[1])
