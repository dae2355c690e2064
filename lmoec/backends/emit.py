"""Render a compiled spec into the files of its package.

Each emitter turns the IR into some of the files (name -> text). The set of
files is the package `lmoec compile` writes and the code `Program` imports:
what runs is exactly what users read in `generated/`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..ir.nodes import SpecIR
from ..kinds import decay_reason, kind_of
from . import triton as triton_backend
from .context import lsm_context
from .model_emit import emit_model
from .moe_emit import emit_moe
from .modules import emit_layers
from .render import header, render


def emit_ir(ir: SpecIR) -> dict[str, str]:
    return {"ir.json": ir.dump() + "\n"}


def emit_lsm_ops(ir: SpecIR) -> dict[str, str]:
    """Per LSM: the portable chunkwise path, the Triton kernels (where emitted) and the op glue."""
    files = {}
    for lsm in ir.lsms.values():
        ctx = lsm_context(ir, lsm)
        files[f"{lsm.name}_torch.py"] = render(kind_of(ctx.rec).torch_template, ctx=ctx, header=header(ir, f"lsm {lsm.name}, torch chunkwise"))
        triton_ok, _ = triton_backend.supports(ctx)
        if triton_ok:
            files[f"{lsm.name}_triton.py"] = triton_backend.emit(ctx, header(ir, f"lsm {lsm.name}, triton kernels"))
        kind = kind_of(ctx.rec)
        auto_torch_reason = kind.auto_torch_reason(ctx.rec) or decay_reason(kind, ctx.rec, lsm.decay.expr, ctx.chunk_size)
        files[f"{lsm.name}_ops.py"] = render(
            "package/ops.py.j2", ctx=ctx, triton_reason=triton_backend.supports(ctx)[1], auto_torch_reason=auto_torch_reason,
            max_head_dim=kind.triton_max_head_dim, state_width=kind.state_width, state_rows=kind.state_rows,
            header=header(ir, f"lsm {lsm.name}, op"))
    return files


EMITTERS: list[Callable[[SpecIR], dict[str, str]]] = [emit_ir, emit_lsm_ops, emit_model]
EMITTERS.append(emit_moe)
EMITTERS.append(emit_layers)


def emit_package(ir: SpecIR) -> dict[str, str]:
    files: dict[str, str] = {}
    for emitter in EMITTERS:
        files.update(emitter(ir))
    modules = sorted(Path(f).stem for f in files if f.endswith(".py"))
    if ir.model is not None:  # imported on demand only (it imports transformers), so not in __init__'s modules
        files["hf.py"] = render("package/hf.py.j2", header=header(ir, f"model {ir.model.name}, Hugging Face classes"), ir=ir,
                                modules=modules)
    files["__init__.py"] = render("package/__init__.py.j2", header=header(ir, "package"), ir=ir, modules=modules)
    return files
