"""How long `lmoec check SPEC` takes as a command, and whether it imports torch (issue 16: < 0.3 s, no torch).

Each spec is checked in a fresh process, `--runs` times; the table gives the minimum (on shared cores, the
cost of the work itself) and the median. Beside it, the floor every check pays: the interpreter starting and
importing sympy, pydantic and lark. The parser tables are cached in lmoec's cache folder after the first
check; one run with an empty cache shows that first check. `--before DIR` times another checkout of lmoec
(e.g. a worktree of the commit before a change) with the same interpreter, in the same session, so the two
columns are comparable. Writes bench/results/check_latency_cpu.md.

    python bench/check_latency_cpu.py [--before DIR] [--runs 15]
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


def seconds(argv: list[str], root: Path, runs: int, cache: str) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(root), LMOEC_CACHE=cache)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, cwd=root, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def imports_torch(spec: str, root: Path, cache: str) -> bool:
    env = dict(os.environ, PYTHONPATH=str(root), LMOEC_CACHE=cache)
    out = subprocess.run([sys.executable, "-c", IMPORTS_TORCH, spec], cwd=root, env=env, check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="another checkout of lmoec to time the same way")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    roots = {"this checkout": ROOT} | ({f"before ({args.before})": args.before.resolve()} if args.before else {})
    check = [sys.executable, "-m", "lmoec", "check"]
    with tempfile.TemporaryDirectory() as warm:
        floor = {what: seconds([sys.executable, "-c", code], ROOT, args.runs, warm)
                 for what, code in (("python -c pass", "pass"), ("import sympy, pydantic, lark", "import sympy, pydantic, lark"))}
        rows = []
        for spec in SPECS:
            row = [f"`lmoec check {spec}`"]
            for root in roots.values():
                seconds(check + [spec], root, 1, warm)  # fills the parser cache
                times = seconds(check + [spec], root, args.runs, warm)
                with tempfile.TemporaryDirectory() as cold:
                    first = seconds(check + [spec], root, 1, cold)[0]
                    torch = imports_torch(spec, root, cold)
                row += [f"{min(times):.3f} / {statistics.median(times):.3f}", f"{first:.3f}", "yes" if torch else "no"]
                print(f"{spec:36s} {root}: min {min(times):.3f} s, median {statistics.median(times):.3f} s, "
                      f"empty cache {first:.3f} s, imports torch: {torch}", flush=True)
            rows.append(row)
    for what, times in floor.items():
        print(f"{what:36s} min {min(times):.3f} s, median {statistics.median(times):.3f} s")
    import lmoec

    head = "".join(f" {name}: min / median s | empty cache s | imports torch |" for name in roots)
    lines = [
        "# `lmoec check` latency on CPU",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}); Python {platform.python_version()}, "
        f"lmoec {lmoec.__version__}; load average at the end {os.getloadavg()[0]:.1f}",
        f"- each a fresh process, {args.runs} runs: the minimum and the median; \"empty cache\": one run with an empty "
        "lmoec cache folder (the parser tables are built then, and cached)",
        "- command: `python bench/check_latency_cpu.py" + (" --before DIR`" if args.before else "`"),
        "",
        "| command |" + head,
        "|---|" + "---|---|---|" * len(roots),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "The floor every `check` pays (this interpreter, same session):", "", "| command | min s | median s |",
              "|---|---|---|"]
    lines += [f"| `{what}` | {min(t):.3f} | {statistics.median(t):.3f} |" for what, t in floor.items()]
    out = ROOT / "bench" / "results" / "check_latency_cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
