"""lmoec: a compiler for Linear-MoE models.

Pipeline: frontend (grammar/lsm.lark -> IR) -> passes -> backends (templates/)
-> runtime (the emitted package, imported). Entry point: `compile_spec`.

`Program` and `compile_spec` are loaded on first use: `import lmoec` (and so `lmoec --help`) stays instant.
"""
__version__ = "0.1.0"
__all__ = ["Program", "compile_spec"]


def __getattr__(name: str):
    if name in __all__:
        from . import program

        return getattr(program, name)
    raise AttributeError(f"module 'lmoec' has no attribute {name!r}")
