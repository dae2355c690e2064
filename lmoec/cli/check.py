"""`lmoec check SPEC...`: all that `lmoec compile` decides, nothing rendered or written (lmoec.program.check_spec);
neither torch nor jinja2 is imported."""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check", help="validate specs: all that compile does, nothing written")
    p.add_argument("specs", nargs="+", metavar="SPEC", help=".lsm spec file(s)")
    return p


def run(args: argparse.Namespace) -> int:
    """Check every spec, each failure reported as it comes; exit 2 if any failed."""
    from ..program import check_spec
    from . import describe
    from .flags import spec_file

    failed = False
    for path in args.specs:
        try:
            ir = check_spec(spec_file(path)).ir
        except Exception as err:
            message = describe(err)
            if message is None:
                raise
            print(message, file=sys.stderr)
            failed = True
            continue
        what = [f"lsm {n} ({lsm.recurrence.family.value})" for n, lsm in ir.lsms.items()]
        if ir.model is not None:
            what.append(f"model {ir.model.name} ({ir.model.layers} layers, pattern {ir.model.pattern})")
        print(f"{ir.source}: ok: {', '.join(what) or 'nothing defined'}")
    return 2 if failed else 0
