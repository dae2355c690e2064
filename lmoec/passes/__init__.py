"""Passes over the IR, in order: validate -> classify -> plan communication."""
from __future__ import annotations

from ..ir.nodes import SpecIR
from .classify import classify
from .comm import plan
from .validate import validate

PIPELINE = (validate, classify, plan)


def run_passes(ir: SpecIR) -> SpecIR:
    for p in PIPELINE:
        ir = p(ir)
    return ir
