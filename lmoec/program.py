"""The Python API: `compile_spec(path) -> Program`, and what a Program hands out.

The emitters (jinja2) and the loader are imported when a Program first needs them: checking a spec
(`lmoec check`, `inspect --ir`) loads neither, nor torch.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

from .ir.nodes import SpecIR
from .passes import run_passes


class Program:
    """A compiled spec: its IR, its emitted files, and the objects built from them."""

    def __init__(self, ir: SpecIR):
        self.ir = ir
        self._files: Optional[dict[str, str]] = None
        self._package: Optional[ModuleType] = None

    @property
    def files(self) -> dict[str, str]:
        """The emitted package, file name -> text (what `lmoec compile` writes)."""
        if self._files is None:
            from .backends.emit import emit_package

            self._files = emit_package(self.ir)
        return self._files

    @property
    def package(self) -> ModuleType:
        """The emitted package, imported."""
        if self._package is None:
            from .runtime.loader import load_package

            self._package = load_package(self.ir.name, self.files)
        return self._package

    def op(self, name: Optional[str] = None) -> Callable:
        """The kernel-level op of the spec's LSM (or the named one); see lmoec.runtime.contract."""
        lsm = self.ir.lsm(name)
        return getattr(self.package, f"{lsm.name}_ops").op

    def moe(self, name: Optional[str] = None):
        """A fresh MoE layer of the spec's model (or the model named `name`): `<package>.moe.build`."""
        model = self.ir.model
        if model is None or name not in (None, model.name):
            raise ValueError(f"{self.ir.source}: no model named {name!r} (has {[model.name] if model else []})")
        if model.moe is None:
            raise ValueError(f"{self.ir.source}: model {model.name!r} has no moe block (a dense ffn)")
        return self.package.moe.build(model.hidden)

    def model(self, **overrides):
        """A freshly initialized causal LM of the spec's model (`<package>.model.build`); overrides replace config entries."""
        if self.ir.model is None:
            raise ValueError(f"{self.ir.source}: the spec defines no model (only lsms {sorted(self.ir.lsms)})")
        return self.package.model.build(**overrides)

    def hf_model(self, model=None, **overrides):
        """The spec's model as a Hugging Face causal LM (`<package>.hf.ForCausalLM`, needs transformers): the
        weights of `model` (a CausalLM of this package) or of a fresh `self.model(**overrides)`."""
        import json

        from .runtime.hf import NUL, hf_module

        model = self.model(**overrides) if model is None else model
        hf = hf_module(self.package)
        config = hf.Config(lmoec_model=model.config, lmoec_ir=json.loads(self.files["ir.json"]),
                           eos_token_id=NUL, bos_token_id=NUL, pad_token_id=NUL)
        wrapped = hf.ForCausalLM(config)
        wrapped.model.load_state_dict(model.state_dict())
        return wrapped.eval() if not model.training else wrapped

    def layer(
        self,
        name: Optional[str] = None,
        hidden: Optional[int] = None,
        heads: Optional[int] = None,
        layer_idx: int = 0,
        layers: Optional[int] = None,
    ):
        """A fresh LSM layer (`<package>.<lsm>_layer.Layer`) of the spec's LSM or the named one.

        hidden, heads and layers default to the spec's model; heads first to the lsm's own `heads`.
        """
        lsm = self.ir.lsm(name)
        model = self.ir.model
        if hidden is None:
            if model is None:
                raise ValueError(f"{self.ir.source}: the spec has no model block; pass hidden= to layer()")
            hidden = model.hidden
        if heads is None:
            heads = lsm.heads if lsm.heads is not None else (model.heads if model is not None else None)
            if heads is None:
                raise ValueError(f"{self.ir.source}: lsm {lsm.name!r} sets no heads and the spec has no model; pass heads= to layer()")
        if layers is None and model is not None:
            layers = model.layers
        module = getattr(self.package, f"{lsm.name}_layer")
        return module.Layer(hidden, heads, layer_idx=layer_idx, layers=layers)

    def write(self, out_dir: Path, force: bool = False) -> Path:
        """Write the package into `out_dir` by lmoec.output's rules: a new folder appears whole, an earlier
        package is updated in place, other files are never deleted; a folder lmoec did not write is refused
        (OutputError) unless force."""
        from .output import package_files, write_files

        out_dir = Path(out_dir)
        write_files(out_dir, self.files, package_files(out_dir), force)
        return out_dir


def compile_ir(ir: SpecIR) -> Program:
    return Program(run_passes(ir))


def compile_spec(path) -> Program:
    """Parse, lower and check a spec file; raises lmoec.errors.SpecError with file:line:col."""
    from .frontend import load_spec

    return compile_ir(load_spec(Path(path)))


def check_spec(path) -> Program:
    """What `lmoec check` runs: compile_spec and every decision an emitter makes that can refuse a spec (the
    contexts the templates read: each layer's printed expressions, the model's, the MoE's), without rendering or
    writing. So check and compile accept the same specs (tests/test_fuzz.py holds them to it), and check needs
    neither jinja2 nor torch."""
    from .backends.model_emit import model_context
    from .backends.modules import layer_context
    from .backends.moe_emit import moe_context

    program = compile_spec(path)
    ir = program.ir
    for lsm in ir.lsms.values():
        layer_context(ir, lsm, header="")
    if ir.model is not None:
        model_context(ir)
        if ir.model.moe is not None:
            moe_context(ir)
    return program
