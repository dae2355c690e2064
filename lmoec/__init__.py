"""lmoec: a compiler for Linear-MoE models.

Pipeline: frontend (grammar/lsm.lark -> IR) -> passes -> backends (templates/)
-> runtime (the emitted package, imported). Entry point: `compile_spec`.
"""
__version__ = "0.1.0"

from .program import Program, compile_spec  # noqa: E402,F401
