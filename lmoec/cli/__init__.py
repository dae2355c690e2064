"""The `lmoec` command line: one module per subcommand, each with `add_parser(subparsers)` and `run(args) -> int`.

To add a subcommand, write lmoec/cli/<name>.py and add its module name to COMMANDS.
Errors in user input exit with status 2 and one message, never a traceback.
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
]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="lmoec", description="A compiler for Linear-MoE models.")
    parser.add_argument("--version", action="version", version=f"lmoec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        sp = module.add_parser(sub)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    from ..errors import SpecError

    args = build_parser().parse_args(argv)
    try:
        return args._run(args)
    except SpecError as err:
        print(str(err), file=sys.stderr)
    except FileNotFoundError as err:
        print(f"{err.filename or err}: error: no such file", file=sys.stderr)
    except ValueError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    return 2
