"""The `lmoec` command line: one module per subcommand, each with `add_parser(subparsers)` and `run(args) -> int`.

To add a subcommand, write lmoec/cli/<name>.py and add its module name to COMMANDS.
Errors in user input or the environment (a missing file, a folder that can't be written) exit with status 2 and
one message, never a traceback; Ctrl-C exits with 130 and one line. Parsing the command line imports no heavy
module (torch, sympy): each subcommand imports what it needs when it runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

COMMANDS = [
    "compile",
    "inspect",
    "check",
    "train",
    "generate",
    "variants",
    "sweep",
    "bench",
    "export",
    "linearize",
    "finetune",
]


# optional dependencies, by the extra that installs them (export, linearize and finetune need [hf])
OPTIONAL_MODULES = {"transformers": "hf", "safetensors": "hf", "peft": "hf", "tokenizers": "hf", "lm_eval": "eval"}


class Parser(argparse.ArgumentParser):
    """argparse, with a bad command line reported in one line (the flag and what is wrong) instead of the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="lmoec", description="A compiler for Linear-MoE models.")
    parser.add_argument("--version", action="version", version=f"lmoec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        sp = module.add_parser(sub)
        sp.set_defaults(_run=module.run)
    return parser


def describe(err: Exception) -> Optional[str]:
    """The message for an error in what the user gave (a spec, a path, a value), or None for a bug in lmoec."""
    from ..errors import SpecError
    from ..output import shown

    if isinstance(err, SpecError):
        return str(err)
    if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] in OPTIONAL_MODULES:
        extra = OPTIONAL_MODULES[err.name.split(".")[0]]
        return f"error: this command needs the [{extra}] extra (pip install 'lmoec[{extra}]'): no module named {err.name!r}"
    if isinstance(err, FileNotFoundError):
        return f"{shown(err.filename or err)}: error: no such file"
    if isinstance(err, IsADirectoryError):
        return f"{shown(err.filename or err)}: error: is a directory, not a file"
    if isinstance(err, OSError):  # unreadable, unwritable, a name too long, a full disk
        where = f"{shown(err.filename)}: " if err.filename else ""
        return f"{where}error: {err.strerror or err}"
    if isinstance(err, ValueError):
        return "error: " + " ".join(str(err).split())
    return None


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args)
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print(f"lmoec {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = describe(err)
        if message is None:
            raise
        print(message, file=sys.stderr)
    return 2
