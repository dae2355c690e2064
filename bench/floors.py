"""Issue 22's cells against their floors: how far each measured time is from what the hardware allows (CPU only).

For every cell of bench/results/issue22_cells.csv (the newest same-process measurement of lmoec and fla), two floors
at the H100's peak rates (lmoec.backends.stats.GPUS):
- the *kernel floor*: the sum of `lmoec inspect --kernels --stats` over the kernels lmoec launches at that shape
  (each tensor a kernel reads read once, each it writes written once; intermediates such as the chunk states and
  v' count in every kernel that moves them);
- the *op floor* (lmoec.backends.stats.op_bytes): the op's own inputs read once and outputs written once, what a
  single fused kernel would move.
The goal's time is fla's time / 1.5 (3x SDPA's at 32K). Where it is below the kernel floor, no tuning of the present
kernels can meet it: only moving fewer bytes (fusing kernels, keeping intermediates on chip) can.

    python bench/floors.py [--cells bench/results/issue22_cells.csv] [--out bench/results/issue22_floors.md]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import functools
import io
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.families_gpu import SHAPES  # noqa: E402
from lmoec import compile_spec  # noqa: E402
from lmoec.backends.context import lsm_context  # noqa: E402
from lmoec.backends.stats import GPUS, kernel_costs, op_bytes  # noqa: E402

GOAL = 1.5  # issue 22: every family >= 1.5x its fla op
SDPA_GOAL = 3.0  # and >= 3x SDPA's fwd+bwd at T = 32K


@functools.cache
def context(family: str):
    program = compile_spec(os.path.join(ROOT, "specs", "lsm", f"{family}.lsm"))
    (lsm,) = program.ir.lsms.values()
    return lsm_context(program.ir, lsm)


def floors_ms(family: str, shape: str, gpu: str = "h100") -> dict[str, float]:
    B, T, H, K, V, _ = SHAPES[shape]  # packed batches: their tokens as one sequence (a few partial chunks more)
    peak, bandwidth = GPUS[gpu]
    kernel = {True: 0.0, False: 0.0}
    for _, forward, flops, nbytes in kernel_costs(context(family), B, T, H, K, V):
        kernel[forward] += max(flops / peak, nbytes / bandwidth)
    fwd_bytes, bwd_bytes = op_bytes(context(family), B, T, H, K, V)
    return {"kernel_fwd": kernel[True] * 1e3, "kernel_fwdbwd": (kernel[True] + kernel[False]) * 1e3,
            "op_fwd": fwd_bytes / bandwidth * 1e3, "op_fwdbwd": (fwd_bytes + bwd_bytes) / bandwidth * 1e3}


COLUMNS = ("family", "shape", "lmoec_fwd", "lmoec_fwdbwd", "fla_fwd", "fla_fwdbwd", "sdpa_fwdbwd", "run", "changed", "kernels")
TIMES = ("lmoec_fwd", "lmoec_fwdbwd", "fla_fwd", "fla_fwdbwd", "sdpa_fwdbwd")


class CellsError(ValueError):
    """A row of the measurements file that can't be used; the message names file:line."""


def read_cells(path: str) -> list[dict]:
    """The rows of the measurements file ('#' lines are comments), checked: known family and shape, positive times
    (empty where not measured), lmoec's forward present, `changed` one of none / forward / backward / both."""
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip() and not line.startswith("#")]
    if not lines:
        raise CellsError(f"{path}: no header and no rows")
    reader = csv.DictReader(line for _, line in lines)
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise CellsError(f"{path}:{lines[0][0]}: the header must be {','.join(COLUMNS)}")
    rows = []
    for (n, _), row in zip(lines[1:], reader):
        where = f"{path}:{n}"
        if None in row or None in row.values():
            raise CellsError(f"{where}: {len(COLUMNS)} fields expected")
        if not re.fullmatch(r"[a-z0-9_]+", row["family"]) or not os.path.exists(os.path.join(ROOT, "specs", "lsm", f"{row['family']}.lsm")):
            raise CellsError(f"{where}: unknown family {row['family']!r} (no specs/lsm/{row['family']}.lsm)")
        if row["shape"] not in SHAPES:
            raise CellsError(f"{where}: unknown shape {row['shape']!r}; one of {', '.join(SHAPES)}")
        if row["changed"] not in ("none", "forward", "backward", "both"):
            raise CellsError(f"{where}: changed must be none, forward, backward or both, got {row['changed']!r}")
        for key in TIMES:
            try:
                row[key] = float(row[key]) if row[key] else None
            except ValueError:
                raise CellsError(f"{where}: {key} is not a number: {row[key]!r}") from None
            if row[key] is not None and not (0 < row[key] < float("inf")):
                raise CellsError(f"{where}: {key} must be a positive time in ms, got {row[key]}")
        if row["lmoec_fwd"] is None:
            raise CellsError(f"{where}: lmoec_fwd is missing")
        rows.append(row)
    return rows


NEAR_FLOOR = 1.25  # a memory-bound kernel rarely sustains more than ~80% of the peak rate


def verdict(ours: float, goal: float, kernel_floor: float) -> str:
    if ours <= goal:
        return "met"
    if goal < kernel_floor:
        return "below the kernel floor: needs fewer bytes (fusion)"
    if goal < NEAR_FLOOR * kernel_floor:
        return f"within {NEAR_FLOOR}x the kernel floor: needs fewer bytes, realistically"
    return f"tuning: {ours / goal:.2f}x the goal's time"


def report(cells: list[dict], gpu: str) -> str:
    out = io.StringIO()
    peak, bandwidth = GPUS[gpu]
    out.write(f"# Issue 22: every cell against its floors ({datetime.date.today()})\n\n")
    out.write(f"`python bench/floors.py` (CPU). Measurements: `bench/results/issue22_cells.csv` (newest same-process run "
              f"per cell, H100 80GB HBM3, torch 2.11, Triton 3.6, fla 0.6.0; the run is cited per row). Floors at "
              f"{peak / 1e12:.0f} TFLOP/s and {bandwidth / 1e12:.1f} TB/s ({gpu}): kernel floor = `lmoec inspect --kernels --stats` "
              f"summed over the kernels lmoec launches; op floor = the op's inputs read once and outputs written once. "
              f"Goal = fla / {GOAL}, or SDPA / {SDPA_GOAL} for fwd+bwd at 32K where that is less. ms; lmoec x, fla x: multiples "
              f"of the kernel floor. Verdict: met; below the kernel floor (no tuning of these kernels can meet it); within "
              f"{NEAR_FLOOR}x of it (only a kernel at over {1 / NEAR_FLOOR:.0%} of the peak rate would); else tuning, with "
              f"how far the time is from the goal's.\n\n")
    for part, label in (("fwd", "Forward"), ("fwdbwd", "Forward + backward")):
        out.write(f"## {label}\n\n| family | shape | run | lmoec | fla | ratio | goal | kernel floor | op floor | "
                  f"lmoec x | fla x | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        for row in cells:
            ours, peer = row[f"lmoec_{part}"], row[f"fla_{part}"]
            if ours is None:
                continue
            floor = floors_ms(row["family"], row["shape"], gpu)
            kfloor, ofloor = floor[f"kernel_{part}"], floor[f"op_{part}"]
            goals = [(g, mark) for g, mark in ((peer and peer / GOAL, ""),
                                               (part == "fwdbwd" and row["sdpa_fwdbwd"] and row["sdpa_fwdbwd"] / SDPA_GOAL, " (SDPA)")) if g]
            goal, mark = min(goals) if goals else (None, "")
            stale = row["changed"] == "both" or (part == "fwdbwd" and row["changed"] != "none")
            run = row["run"] + ("*" if stale else "")
            cells_text = [row["family"], row["shape"], run, f"{ours:.3f}", f"{peer:.3f}" if peer else "-",
                          f"{peer / ours:.2f}x" if peer else "-", f"{goal:.3f}{mark}" if goal else "-", f"{kfloor:.3f}",
                          f"{ofloor:.3f}", f"{ours / kfloor:.1f}", f"{peer / kfloor:.1f}" if peer else "-",
                          verdict(ours, goal, kfloor) if goal else "no peer measured"]
            out.write("| " + " | ".join(cells_text) + " |\n")
        out.write("\n")
    changed = dict(sorted((r["family"], r["kernels"]) for r in cells if r["changed"] != "none"))
    out.write("\\*: the row timed kernels that changed since, so its lmoec time is an upper bound of today's: "
              + "; ".join(f"{family}: {what}" for family, what in changed.items()) + ".\n")
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=os.path.join(ROOT, "bench", "results", "issue22_cells.csv"))
    parser.add_argument("--out", help="write the markdown here (default: print it)")
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    args = parser.parse_args()
    try:
        text = report(read_cells(args.cells), args.gpu)
    except UnicodeDecodeError:
        print(f"floors.py: {args.cells}: not UTF-8 text", file=sys.stderr)
        return 2
    except (OSError, CellsError) as err:
        print(f"floors.py: {err}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
