"""Pass: semantic checks the grammar can't express; each failure names the spec location."""
from __future__ import annotations

from ..errors import SpecError
from ..ir.nodes import SpecIR


def validate(ir: SpecIR) -> SpecIR:
    model = ir.model
    if model is not None:
        if model.lsm is not None and model.lsm not in ir.lsms:
            raise SpecError(f"model {model.name!r} uses lsm {model.lsm!r}, which is not defined or imported", model.loc)
        if "L" in model.pattern and model.lsm is None:
            raise SpecError(f"model {model.name!r} has L layers but names no lsm", model.loc)
        if len(model.pattern) != model.layers:
            raise SpecError(f"pattern has {len(model.pattern)} layers but the model declares layers = {model.layers}", model.loc)
        if model.moe is not None and not 0 < model.moe.top_k <= model.moe.experts:
            raise SpecError(f"top_k = {model.moe.top_k} must be between 1 and experts = {model.moe.experts}", model.loc)
    par = ir.parallel
    for name in ("dp", "sp", "ep", "tp"):
        if getattr(par, name) < 1:
            raise SpecError(f"parallel degree {name} must be >= 1, got {getattr(par, name)}", par.loc)
    if model is not None and model.moe is not None and model.moe.experts % par.ep:
        raise SpecError(f"ep = {par.ep} does not divide experts = {model.moe.experts}", par.loc)
    return ir
