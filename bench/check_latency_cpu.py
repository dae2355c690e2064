"""How long `lmoec check SPEC` takes as a command, and whether it imports torch (issue 16: < 0.3 s, no torch).

Each spec is checked in a fresh process, `--runs` rounds; the table gives the minimum (on shared cores, the
cost of the work itself) and the median. Beside it, the floor every check pays: the interpreter starting and
importing sympy, pydantic and lark. The parser tables are cached in lmoec's cache folder after the first
check; one run with an empty cache shows that first check. `--before DIR` times another checkout of lmoec
(e.g. an export of the commit before a change) with the same interpreter. Every round runs each command once,
in turn, so that all of them see the same load on a shared machine. Writes bench/results/check_latency_cpu.md.

    python bench/check_latency_cpu.py [--before DIR [--before-name NAME]] [--runs 15]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = ["specs/lsm/gla.lsm", "specs/lsm/rwkv7.lsm", "specs/models/tiny.lsm", "specs/models/a1b-7b-hybrid.lsm"]
IMPORTS_TORCH = "import sys; from lmoec.cli import main; main(['check', sys.argv[1]]); print('torch' in sys.modules)"


def seconds(argv: list[str], root: Path, cache: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(root), LMOEC_CACHE=cache)
    start = time.perf_counter()
    subprocess.run(argv, cwd=root, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def imports_torch(spec: str, root: Path, cache: str) -> bool:
    env = dict(os.environ, PYTHONPATH=str(root), LMOEC_CACHE=cache)
    out = subprocess.run([sys.executable, "-c", IMPORTS_TORCH, spec], cwd=root, env=env, check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="another checkout of lmoec to time the same way")
    parser.add_argument("--before-name", default="before", help="the column of --before, e.g. its commit")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    roots = {"this checkout": ROOT} | ({args.before_name: args.before.resolve()} if args.before else {})
    check = [sys.executable, "-m", "lmoec", "check"]
    floor = {"python -c pass": "pass", "import sympy, pydantic, lark": "import sympy, pydantic, lark"}
    probes = {(spec, name): (check + [spec], root) for spec in SPECS for name, root in roots.items()}
    probes |= {(what, None): ([sys.executable, "-c", code], ROOT) for what, code in floor.items()}
    with tempfile.TemporaryDirectory() as warm:
        first, torch = {}, {}
        for (spec, name), (argv, root) in probes.items():
            if name is not None:
                with tempfile.TemporaryDirectory() as cold:
                    first[spec, name] = seconds(argv, root, cold)  # builds the parser tables
                    torch[spec, name] = imports_torch(spec, root, cold)
                seconds(argv, root, warm)  # fills the warm cache
        times = {key: [] for key in probes}
        for _ in range(args.runs):
            for key, (argv, root) in probes.items():
                times[key].append(seconds(argv, root, warm))
    for key, t in times.items():
        print(f"{key[0]:36s} {key[1] or '':>14s}: min {min(t):.3f} s, median {statistics.median(t):.3f} s")
    rows = []
    for spec in SPECS:
        row = [f"`lmoec check {spec}`"]
        for name in roots:
            t = times[spec, name]
            row += [f"{min(t):.3f} / {statistics.median(t):.3f}", f"{first[spec, name]:.3f}",
                    "yes" if torch[spec, name] else "no"]
        rows.append(row)
    import lmoec

    head = "".join(f" {name}: min / median s | empty cache s | imports torch |" for name in roots)
    lines = [
        "# `lmoec check` latency on CPU",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}); Python {platform.python_version()}, "
        f"lmoec {lmoec.__version__}; load average at the end {os.getloadavg()[0]:.1f}",
        f"- each a fresh process, {args.runs} rounds of every command in turn: the minimum and the median; \"empty "
        "cache\": one run with an empty lmoec cache folder (the parser tables are built then, and cached)",
        "- command: `python bench/check_latency_cpu.py" + (f" --before DIR --before-name '{args.before_name}'`"
                                                           if args.before else "`"),
        "",
        "| command |" + head,
        "|---|" + "---|---|---|" * len(roots),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "The floor every `check` pays (this interpreter, same session):", "", "| command | min s | median s |",
              "|---|---|---|"]
    lines += [f"| `{what}` | {min(times[what, None]):.3f} | {statistics.median(times[what, None]):.3f} |" for what in floor]
    out = ROOT / "bench" / "results" / "check_latency_cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
