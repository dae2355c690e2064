"""lmoec: a compiler for Linear-MoE models.

Pipeline: frontend (grammar/lsm.lark -> IR) -> passes -> backends (templates/)
-> runtime (the emitted package, imported). Entry point: `compile_spec`.

`Program` and `compile_spec` are loaded on first use: `import lmoec` (and so `lmoec --help`) stays instant.
Hugging Face: lmoec's model_type "lmoec" is registered with transformers' AutoConfig and AutoModelForCausalLM
(lmoec.runtime.hf) as soon as both lmoec and transformers are imported, in either order, without importing
transformers here (it takes seconds).
"""
import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
__all__ = ["Program", "compile_spec"]


def __getattr__(name: str):
    if name in __all__:
        from . import program

        return getattr(program, name)
    raise AttributeError(f"module 'lmoec' has no attribute {name!r}")


def _register_with_transformers() -> None:
    """lmoec.runtime.hf registers its classes when it is imported (when it is importing transformers itself,
    it is already in sys.modules and registers at its end)."""
    importlib.import_module("lmoec.runtime.hf")


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers` is first imported, lets the other finders find it and registers
    lmoec's classes right after its module has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def run_then_register(module):
                run(module)
                _register_with_transformers()

            spec.loader.exec_module = run_then_register
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
