"""`lmoec compile SPEC... [-o DIR]`: emit each spec's package, atomically, and say where."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compile", help="compile specs into packages",
        description="Compile .lsm specs into self-contained packages. With one SPEC, -o is the package "
                    "directory; with several, each goes to DIR/<name>/. Default: generated/<name>/ under "
                    "the current directory. All specs compile before any is written.")
    p.add_argument("specs", nargs="+", metavar="SPEC", help=".lsm spec file(s)")
    p.add_argument("-o", "--out", metavar="DIR", type=Path, help="output directory")
    return p


def run(args: argparse.Namespace) -> int:
    from .. import compile_spec

    programs = []
    for path in args.specs:
        program = compile_spec(path)
        program.files  # emit now: a spec that fails to emit stops the command before anything is written
        programs.append(program)
    for program in programs:
        if args.out is None:
            target = Path("generated") / program.ir.name
        elif len(programs) == 1:
            target = args.out
        else:
            target = args.out / program.ir.name
        program.write(target)
        print(f"{program.ir.source}: wrote {len(program.files)} files to {target}/")
    return 0
