"""The typed objects every template reads.

Templates see only these (as `ctx`), never the raw IR, so two templates can't
disagree about a name or a flag: each value is computed once, here.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ..ir.nodes import LSMSpec, Recurrence, SpecIR
from .literal import Name


class LSMContext(BaseModel):
    """One LSM's kernels and ops: specialized on its `Recurrence` and chunk size."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    spec_name: str  # the spec file's stem
    source: str  # the spec path as written in headers
    name: Name  # the lsm's name: pasted into code (file and module names)
    rec: Recurrence
    chunk_size: int

    @property
    def family(self) -> str:
        return self.rec.family.value

    @property
    def has_decay(self) -> bool:
        return self.rec.decay != "none"

    @property
    def args(self) -> list[str]:
        """The optional tensor arguments this op takes, in contract order."""
        out = []
        if self.has_decay:
            out.append("g")
        if self.rec.delta and not self.rec.dplr:
            out.append("beta")
        if self.rec.bonus:
            out.append("u")
        if self.rec.dplr:
            out += ["a", "b"]
        out += {"none": [], "outer_sum": ["gv"], "outer_product": ["dt", "A"]}[self.rec.elementwise]
        if self.rec.update == "titans":
            from ..kinds.titans import gates

            out += gates(self.rec)
        if self.rec.update == "ttt":
            from ..kinds.ttt import GATES

            out += GATES
        return out


def lsm_context(ir: SpecIR, lsm: LSMSpec) -> LSMContext:
    assert lsm.recurrence is not None, "passes.classify must run before emission"
    return LSMContext(
        spec_name=ir.name,
        source=ir.source,
        name=lsm.name,
        rec=lsm.recurrence,
        chunk_size=lsm.chunk_size,
    )
