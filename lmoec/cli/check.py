"""`lmoec check SPEC...`: parse and validate only; nothing is emitted or written."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check", help="validate specs without emitting anything")
    p.add_argument("specs", nargs="+", metavar="SPEC", help=".lsm spec file(s)")
    return p


def run(args: argparse.Namespace) -> int:
    from ..frontend import load_spec
    from ..passes import run_passes

    for path in args.specs:
        ir = run_passes(load_spec(path))
        what = [f"lsm {n} ({lsm.recurrence.family.value})" for n, lsm in ir.lsms.items()]
        if ir.model is not None:
            what.append(f"model {ir.model.name} ({ir.model.layers} layers, pattern {ir.model.pattern})")
        print(f"{ir.source}: ok: {', '.join(what) or 'nothing defined'}")
    return 0
