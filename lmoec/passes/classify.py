"""Pass: classify each LSM's transition into a family (DESIGN.md's table) as a `Recurrence`."""
from __future__ import annotations

from ..ir.nodes import LSMSpec, Recurrence, SpecIR


def recurrence_of(lsm: LSMSpec) -> Recurrence:
    return Recurrence(
        decay=lsm.decay.kind,
        delta=lsm.delta is not None or update_is_delta(lsm),
        dplr=lsm.dplr is not None,
        bonus=lsm.bonus_u,
        elementwise=_elementwise(lsm),
        **_update(lsm),
    )


def update_is_delta(lsm: LSMSpec) -> bool:
    """Whether a test-time-training update is the delta rule: a gradient step at every token on the linear memory's
    1/2 |M^T k - v|^2, M - lr k (M^T k - v)^T, is DeltaNet with beta = lr (its kernels run it)."""
    upd = lsm.update
    return (upd is not None and upd.loss == "mse" and upd.minibatch == 1 and upd.momentum is None
            and upd.weight_decay is None)


def _update(lsm: LSMSpec) -> dict:
    """The Recurrence fields of an update that is not the delta rule: momentum, weight decay, mini-batch gradients."""
    upd = lsm.update
    if upd is None or update_is_delta(lsm):
        return {}
    if upd.loss == "ln_mse":
        return dict(update="ttt", minibatch=upd.minibatch)
    return dict(update="titans", momentum=upd.momentum is not None, weight_decay=upd.weight_decay is not None,
                minibatch=upd.minibatch)


def _elementwise(lsm: LSMSpec) -> str:
    """A step (and rate) gates S by their outer product, a value-side decay by an outer sum with the key side."""
    if lsm.decay.step is not None or lsm.decay.rate is not None:
        return "outer_product"
    return "outer_sum" if lsm.decay.value is not None else "none"


def classify(ir: SpecIR) -> SpecIR:
    for lsm in ir.lsms.values():
        lsm.recurrence = recurrence_of(lsm)
    return ir
