"""Activation memory of a training step, counted from what autograd saves: `python bench/memory_cpu.py`.

Every tensor autograd keeps for the backward passes through a saved-tensors hook; counting each
storage once (by its data pointer) and charging it to the module that saved it first gives the bytes
a step holds between forward and backward, per component, on any device. Parameters are left out
(they are counted as params + grads + AdamW state); their autocast copies are not (they are per-step).

On CPU the LSM op runs its portable torch backend, whose intermediates are not what the GPU keeps:
there the op's own saves are replaced by what the emitted Triton autograd Function saves
(templates/triton/chunk.py.j2, delta.py.j2), its inputs as the Function receives them (contiguous
copies where the layer hands over strided views) and its internal tensors from their shapes.

`cuda_like_autocast` is CPU bf16 autocast with CUDA's float32 ops (tests/test_autocast_dtypes.py
emulates four of them; this adds the reductions, softmaxes and norms CUDA autocast also runs in float32),
so that the dtypes, and hence the bytes, are the ones of a CUDA step.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# CUDA autocast's float32 ops (and those it runs with dtype=float32) that the layers here call.
_FP32_OPS = {
    torch.rsqrt, torch.Tensor.rsqrt, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, F.softplus,
    torch.sum, torch.Tensor.sum, torch.softmax, torch.Tensor.softmax, F.softmax, F.log_softmax, torch.logsumexp,
    torch.Tensor.logsumexp, torch.cumsum, torch.Tensor.cumsum, torch.pow, torch.Tensor.pow, F.cross_entropy,
    F.layer_norm, F.group_norm,
}  # not rms_norm: CUDA autocast hands it bf16 inputs as they are (torch 2.11, seen on an H100)


class _CudaFp32Ops(TorchFunctionMode):
    """Under CPU autocast, runs the ops CUDA autocast runs in float32 on float32 inputs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FP32_OPS and torch.is_autocast_enabled("cpu"):
            up = lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16) else t
            args, kwargs = [up(a) for a in args], {k: up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_like_autocast(dtype=torch.bfloat16):
    """CPU autocast in `dtype` whose float32 ops are CUDA autocast's (see the module docstring)."""
    with torch.autocast("cpu", dtype=dtype), _CudaFp32Ops():
        yield


def triton_saves(family: dict, q, k, v, g=None, beta=None, chunk: int = 64) -> tuple[list[torch.Tensor], int]:
    """(input tensors, bytes of internal tensors) the emitted Triton Function saves for this call.

    family: the op's Recurrence fields (decay, delta). Mirrors the save_for_backward calls of
    templates/triton/chunk.py.j2 (inputs made contiguous; chunk states recomputed in the backward)
    and delta.py.j2 (inputs, g in float32, and the WY factor w, chunk states h, v_new).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if family["delta"]:
        n_chunks = B * -(-T // chunk)
        inputs = [q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()]
        if g is not None:
            inputs.append(g.float().contiguous())
        internal = (k.numel() * k.element_size() + n_chunks * H * K * V * q.element_size()
                    + v.numel() * v.element_size())
        return inputs, internal
    inputs = [x.reshape(1, B * T, H, x.shape[-1]).contiguous() for x in (q, k, v)]
    if g is not None:
        inputs.append(g.reshape(1, B * T, *g.shape[2:]).contiguous() if g.dim() > 1 else g)
    return inputs, 0


@dataclass
class SavedBytes:
    """Bytes autograd saved, per component; `fixed` marks components counted once per model."""

    by_component: dict[str, int] = field(default_factory=dict)
    seen: set = field(default_factory=set)
    keep: list = field(default_factory=list)  # storages stay alive, so their pointers are not reused

    def add(self, component: str, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.seen or storage.nbytes() == 0:
            return
        self.seen.add(storage.data_ptr())
        self.keep.append(tensor)
        self.add_bytes(component, storage.nbytes())

    def add_bytes(self, component: str, nbytes: int) -> None:
        self.by_component[component] = self.by_component.get(component, 0) + nbytes


def component_of(name: str, block_kind: str) -> str:
    """The row a module (by qualified name) is charged to; "" is the loss, outside the model."""
    parts = name.split(".")
    if not name or parts[0] in ("head", "norm"):
        return "final norm + LM head + loss"
    if parts[0] == "embed":
        return "embedding"
    if parts[0] == "blocks" and len(parts) > 2:
        if parts[2] == "mixer":
            return "LSM layer" if block_kind == "L" else "attention layer"
        if parts[2] == "ffn":
            return "MoE FFN"
        return "norms (2 per layer)"
    return "other"


def count_saved(model, inputs: torch.Tensor, targets: torch.Tensor, loss_fn, autocast=cuda_like_autocast) -> SavedBytes:
    """Run the forward (and loss) of one step and count what autograd saves for its backward, per component.

    Modules are tracked with forward hooks; on CPU the LSM op's saves are those of the Triton Function
    (triton_saves), since the torch backend that runs there keeps other intermediates.
    """
    counts = SavedBytes()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack: list[str] = []
    in_op = [False]
    kinds = {f"blocks.{i}": b.kind for i, b in enumerate(getattr(model, "blocks", []))}

    def where() -> str:
        name = stack[-1] if stack else ""
        block = ".".join(name.split(".")[:2])
        return component_of(name, kinds.get(block, ""))

    def pack(t):
        if not in_op[0] and t.untyped_storage().data_ptr() not in params:
            counts.add(where(), t)
        return t

    def leave(module, args, output):
        stack.pop()  # a forward hook that returns something replaces the output

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
        handles.append(module.register_forward_hook(leave))
    patched = []
    if inputs.device.type != "cuda":
        for module in {sys.modules[type(m).__module__] for m in model.modules() if type(m).__name__ == "Layer"}:
            op = module.op
            family = module.op.__globals__["RECURRENCE"].model_dump()

            def wrapped(q, k, v, *args, _op=op, _family=family, **kwargs):
                in_op[0] = True
                try:
                    out = _op(q, k, v, *args, **kwargs)
                finally:
                    in_op[0] = False
                saved, internal = triton_saves(_family, q, k, v, kwargs.get("g"), kwargs.get("beta"))
                for t in saved:
                    counts.add(where(), t)
                counts.add_bytes(where(), internal)
                return out

            module.op = wrapped
            patched.append((module, op))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
            loss = loss_fn(model, inputs, targets)
    finally:
        for h in handles:
            h.remove()
        for module, op in patched:
            module.op = op
    del loss
    return counts
