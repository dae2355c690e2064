"""`lmoec compile SPEC... [-o DIR] [--force]`: emit each spec's package and say where."""
from __future__ import annotations

import argparse
from pathlib import Path

from .flags import spec_file


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compile", help="compile specs into packages",
        description="Compile .lsm specs into self-contained packages. With one SPEC, -o is the package "
                    "directory; with several, each goes to DIR/<name>/. Default: generated/<name>/ under "
                    "the current directory. All specs compile before any is written. A package lmoec wrote "
                    "before is updated in place (other files in its folder are kept); a non-empty folder "
                    "lmoec did not write is refused unless --force.")
    p.add_argument("specs", nargs="+", metavar="SPEC", help=".lsm spec file(s)")
    p.add_argument("-o", "--out", metavar="DIR", type=Path, help="output directory")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty folder lmoec did not write: files of the same names are replaced, "
                        "others kept")
    return p


def run(args: argparse.Namespace) -> int:
    from .. import compile_spec
    from ..output import check_target, package_files

    programs = []
    for path in map(spec_file, args.specs):
        program = compile_spec(path)
        program.files  # emit now: a spec that fails to emit stops the command before anything is written
        programs.append(program)
    targets = []
    for program in programs:
        if args.out is None:
            target = Path("generated") / program.ir.name
        elif len(programs) == 1:
            target = args.out
        else:
            target = args.out / program.ir.name
        if target in targets:
            raise ValueError(f"two specs compile to the package {program.ir.name!r} ({target}); compile them one at a time")
        check_target(target, package_files(target), args.force)  # every refusal before anything is written
        targets.append(target)
    for program, target in zip(programs, targets):
        program.write(target, force=args.force)
        print(f"{program.ir.source}: wrote {len(program.files)} files to {target}/")
    return 0
