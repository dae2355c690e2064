"""Pass: classify each LSM's transition into a family (DESIGN.md's table) as a `Recurrence`."""
from __future__ import annotations

from ..ir.nodes import LSMSpec, Recurrence, SpecIR


def recurrence_of(lsm: LSMSpec) -> Recurrence:
    return Recurrence(
        decay=lsm.decay.kind,
        delta=lsm.delta is not None,
        dplr=lsm.dplr is not None,
        bonus=lsm.bonus_u,
        elementwise=_elementwise(lsm),
    )


def _elementwise(lsm: LSMSpec) -> str:
    """A step (and rate) gates S by their outer product, a value-side decay by an outer sum with the key side."""
    if lsm.decay.step is not None or lsm.decay.rate is not None:
        return "outer_product"
    return "outer_sum" if lsm.decay.value is not None else "none"


def classify(ir: SpecIR) -> SpecIR:
    for lsm in ir.lsms.values():
        lsm.recurrence = recurrence_of(lsm)
    return ir
