"""`lmoec variants SPEC --vary AXIS=v1,v2 ...`: one derived spec per grid point, plus a manifest."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("variants", help="write one spec per point of an ablation grid (overrides of a base model spec)")
    p.add_argument("spec", metavar="SPEC", help="the base model spec")
    p.add_argument("--vary", action="append", default=[], metavar="AXIS=v1,v2",
                   help="an axis of the grid: lsm, decay, delta, pattern, lsm.KEY, model.KEY, lsm.BLOCK.KEY or model.BLOCK.KEY (repeatable)")
    p.add_argument("-o", "--out", default=None,
                   help="output folder (default: variants/<spec name>/); an earlier variants folder is updated in place, "
                        "keeping what lmoec did not write there (sweep results, notes)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty folder lmoec did not write: files of the same names are replaced, "
                        "others kept")
    return p


def run(args: argparse.Namespace) -> int:
    from ..variants import default_out_dir, make_variants, parse_axes
    from .flags import spec_file

    axes = parse_axes(args.vary)
    base = spec_file(args.spec)
    out = default_out_dir(base, args.out)
    written, rejected = make_variants(base, axes, out, force=args.force)
    for v in written:
        point = ", ".join(f"{a}={x}" for a, x in v["point"].items())
        print(f"  {v['spec']:<60} {v['family']:<18} {v['params_total'] / 1e6:8.2f}M params  ({point})")
    for r in rejected:
        point = ", ".join(f"{a}={x}" for a, x in r.point.items())
        print(f"  rejected ({point}): {r.reason}")
    print(f"wrote {len(written)} variant(s) and manifest.json to {out}/" + (f"; {len(rejected)} rejected" if rejected else ""))
    return 0 if written else 2
