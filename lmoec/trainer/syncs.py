"""Find host syncs on any device: the calls that would make the CPU wait for the GPU.

A decode step that reads a value back (`.item()`, `.tolist()`, a data-dependent output size) cannot be
captured in a CUDA graph and stalls the launch queue every token. On CUDA, `torch.cuda.set_sync_debug_mode`
catches them; on CPU nothing waits, so `HostSyncs` records the calls that would: the aten ops whose output
needs a value from the device, and `Tensor.tolist` (which reads memory without dispatching an op).
"""
from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# ops whose result (a Python scalar, or a shape) depends on tensor values
_SYNCING = {
    _aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.equal.default,
    _aten.is_nonzero.default,
}


class HostSyncs(TorchDispatchMode):
    """`with HostSyncs() as syncs: step()`; then `syncs.calls` lists what would have synced, with where."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self._tolist = None

    def _record(self, what: str) -> None:
        here = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename]
        where = f"{here[-1].filename}:{here[-1].lineno}" if here else "?"
        self.calls.append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNCING:
            self._record(str(func))
        elif func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._record(f"{func} without output_size")
        elif func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        ):
            self._record(f"{func} with a boolean mask")
        return func(*args, **kwargs)

    def __enter__(self):
        original = self._tolist = torch.Tensor.tolist

        def tolist(tensor):
            self._record("Tensor.tolist")
            return original(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


__all__ = ["HostSyncs"]
