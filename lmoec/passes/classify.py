"""Pass: classify each LSM's transition into a family (DESIGN.md's table) as a `Recurrence`."""
from __future__ import annotations

from ..ir.nodes import LSMSpec, Recurrence, SpecIR


def recurrence_of(lsm: LSMSpec) -> Recurrence:
    return Recurrence(
        decay=lsm.decay.kind,
        delta=lsm.delta is not None,
        dplr=lsm.dplr is not None,
        bonus=lsm.bonus_u,
    )


def classify(ir: SpecIR) -> SpecIR:
    for lsm in ir.lsms.values():
        lsm.recurrence = recurrence_of(lsm)
    return ir
