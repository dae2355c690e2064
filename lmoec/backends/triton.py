"""The Triton backend: which recurrences it emits kernels for, and their emission.

Delta recurrences are emitted by `triton_delta`, DPLR (RWKV7) by `triton_dplr`; the decay families
(additive, constant, scalar, vector, with RWKV6's bonus) here, from
templates/triton/chunk.py.j2. Constant decay runs the scalar-decay kernels on
g broadcast per token: one kernel set less to keep right, and the broadcast is
H floats per token.
"""
from __future__ import annotations

from ..ir.nodes import Family
from . import triton_delta, triton_dplr
from .context import LSMContext

SUB_CHUNK = 16  # rows of the vector-decay sub-chunks (and the smallest tl.dot tile)

_KERNEL_DECAY = {"none": "none", "constant": "scalar", "scalar": "scalar", "vector": "vector"}


def supports(ctx: LSMContext) -> tuple[bool, str]:
    """(ok, reason): whether Triton kernels are emitted for this recurrence, and why not."""
    C = ctx.chunk_size
    if C < SUB_CHUNK or C & (C - 1):  # every family's chunk is tiled by tl.dot blocks of >= 16
        return False, f"chunk size {C} must be a power of two >= {SUB_CHUNK} for the Triton kernels"
    if ctx.rec.family == Family.dplr:
        return triton_dplr.supports(ctx)
    if ctx.rec.family == Family.delta:
        return triton_delta.supports(ctx)
    if ctx.rec.bonus and ctx.rec.decay != "vector":
        return False, f"the bonus term u is emitted for vector decay (RWKV6) only, not for {ctx.rec.key}"
    return True, ""


def fuses_walks(ctx: LSMContext) -> bool:
    """Whether the decay family's walks compute the output (forward) and dv (backward) by default (CONFIG fuse_output,
    fuse_dv). Measured on an H100 (bench/results/issue22.md): fused is faster without a decay or with a scalar one;
    a vector decay's exp() tiles make the fused walks slower than the chunk-parallel kernels they replace."""
    return ctx.rec.decay != "vector"


def emit(ctx: LSMContext, header: str) -> str:
    """The source of `<lsm>_triton.py`: kernels plus `chunk(...)` (autograd) and `step(...)`."""
    ok, reason = supports(ctx)
    if not ok:
        raise ValueError(reason)
    if ctx.rec.family == Family.dplr:
        return triton_dplr.emit(ctx, header)
    if ctx.rec.family == Family.delta:
        return triton_delta.emit(ctx, header)
    from .emit import render

    return render(
        "triton/chunk.py.j2",
        ctx=ctx,
        header=header,
        decay=_KERNEL_DECAY[ctx.rec.decay],
        bonus=ctx.rec.bonus,
        sub=SUB_CHUNK,
        fuse_walks=fuses_walks(ctx),
    )
