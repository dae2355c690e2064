"""Triton kernels for the delta-rule family (WY / UT representation), rendered from templates/triton/delta.py.j2.

One template covers DeltaNet (no decay), Gated DeltaNet (scalar or constant decay) and the delta
rule with a vector decay; the template branches on the decay at generation time, so each emitted
file holds only its spec's kernels. DPLR (RWKV7) is emitted by `triton_dplr`.
"""
from __future__ import annotations

from .context import LSMContext
from .emit import render

BLOCK = 16  # rows of the UT transform's tiles (the smallest tl.dot tile); the chunk is a multiple of it


def supports(ctx: LSMContext) -> tuple[bool, str]:
    """(ok, reason): whether this module emits kernels for the recurrence, and why not (the chunk size is
    checked for every family by lmoec.backends.triton.supports)."""
    rec = ctx.rec
    if rec.dplr:
        return False, "DPLR recurrences are emitted by lmoec.backends.triton_dplr"
    if not rec.delta:
        return False, f"the {rec.key} recurrence is no delta rule"
    if rec.bonus:
        return False, "the delta rule with a bonus term u has no Triton kernels"
    return True, ""


def fuses_output(ctx: LSMContext) -> bool:
    """Whether the emitted forward walk computes the output by default (CONFIG fuse_output). Measured on an H100
    (bench/results/triton_delta.md): faster without a decay; with one, the decayed scores make the fused walk
    spill and the output's own, chunk-parallel kernel wins."""
    return ctx.rec.decay == "none"


def emit(ctx: LSMContext, header: str) -> str:
    """The source of `<lsm>_triton.py` for a delta-rule recurrence."""
    ok, reason = supports(ctx)
    if not ok:
        raise ValueError(reason)
    decay = "scalar" if ctx.rec.decay == "constant" else ctx.rec.decay
    return render("triton/delta.py.j2", ctx=ctx, header=header, decay=decay, block=BLOCK, fuse_output=fuses_output(ctx))
