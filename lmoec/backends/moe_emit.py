"""Emit the MoE layer of a spec's model: `moe.py`, a module with `build(hidden) -> nn.Module`.

The layer's code lives in lmoec.runtime.moe (routing, grouped GEMMs, expert parallel); the
emitted module pins the spec's constants, so a reader of generated/ sees the layer's settings
in one place and `Program.moe()` builds exactly that.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict

from ..ir.nodes import SpecIR
from .literal import Name


class MoEContext(BaseModel):
    """Everything templates/model/moe.py.j2 reads: the spec's MoE constants (finite: they are pasted as code)."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    model: Name
    hidden: int
    experts: int
    top_k: int
    expert_ffn: int
    shared_experts: int
    score: Literal["softmax", "sigmoid"]
    order: Literal["softmax_topk", "topk_softmax"]
    bias_balancing: bool
    bias_update_rate: float
    aux_loss: float
    z_loss: float
    capacity_factor: Optional[float]
    normalize_topk: bool
    init_std: float
    ep: int


def moe_context(ir: SpecIR) -> MoEContext:
    model = ir.model
    moe = model.moe
    return MoEContext(model=model.name, hidden=model.hidden, init_std=model.init_std, ep=ir.parallel.ep, **moe.model_dump())


def emit_moe(ir: SpecIR) -> dict[str, str]:
    """{"moe.py": text} for a model with a moe block; nothing otherwise."""
    from .render import header, render  # jinja2 only when rendering: `lmoec check` imports this module

    if ir.model is None or ir.model.moe is None:
        return {}
    ctx = moe_context(ir)
    return {"moe.py": render("model/moe.py.j2", ctx=ctx, header=header(ir, f"model {ctx.model}, MoE layer"))}
