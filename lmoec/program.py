"""The Python API: `compile_spec(path) -> Program`, and what a Program hands out."""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

from .backends.emit import emit_package
from .ir.nodes import SpecIR
from .passes import run_passes
from .runtime.loader import load_package, write_package


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
            self._files = emit_package(self.ir)
        return self._files

    @property
    def package(self) -> ModuleType:
        """The emitted package, imported."""
        if self._package is None:
            self._package = load_package(self.ir.name, self.files)
        return self._package

    def op(self, name: Optional[str] = None) -> Callable:
        """The kernel-level op of the spec's LSM (or the named one); see lmoec.runtime.contract."""
        lsm = self.ir.lsm(name)
        return getattr(self.package, f"{lsm.name}_ops").op

    def write(self, out_dir: Path) -> Path:
        """Write the package atomically: a failed write leaves nothing behind."""
        out_dir = Path(out_dir)
        write_package(self.files, out_dir)
        return out_dir


def compile_ir(ir: SpecIR) -> Program:
    return Program(run_passes(ir))


def compile_spec(path) -> Program:
    """Parse, lower and check a spec file; raises lmoec.errors.SpecError with file:line:col."""
    from .frontend import load_spec

    return compile_ir(load_spec(Path(path)))
