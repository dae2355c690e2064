"""How long `lmoec compile` takes on this CPU (issue 2's Numbers: the A0.3B-2B model under 1 s after imports).

In one process, after importing lmoec: parse, lower, passes, emission and the atomic write of the package,
for every model spec and a few LSM specs; the first compile of the process (jinja2 loads and compiles its
templates then) and the median of 5 more. Also the whole command `lmoec compile SPEC` in a fresh process,
imports included. Writes bench/results/compile_cpu.md.

    python bench/compile_cpu.py
"""
from __future__ import annotations

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
SPECS = ["specs/models/a0.3b-2b.lsm", "specs/models/a0.3b-2b-hybrid.lsm", "specs/models/a1b-7b.lsm",
         "specs/models/a1b-7b-hybrid.lsm", "specs/lsm/gla.lsm", "specs/lsm/rwkv7.lsm"]


def compile_seconds(spec: Path, out: Path) -> float:
    import lmoec

    start = time.perf_counter()
    lmoec.compile_spec(spec).write(out)
    return time.perf_counter() - start


def main() -> None:
    import lmoec
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(SPECS):
            first = compile_seconds(ROOT / spec, Path(tmp, f"first{i}"))
            again = statistics.median(compile_seconds(ROOT / spec, Path(tmp, f"{i}_{r}")) for r in range(5))
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lmoec", "compile", str(ROOT / spec), "-o", str(Path(tmp, f"cli{i}"))],
                           check=True, capture_output=True)
            cli = time.perf_counter() - start
            rows.append((spec, first, again, cli))
            print(f"{spec:40s} first {first * 1e3:7.1f} ms  median {again * 1e3:7.1f} ms  whole command {cli:5.2f} s", flush=True)
    lines = [
        "# `lmoec compile` on CPU",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- CPU: {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, lmoec {lmoec.__version__}",
        "- in-process after `import lmoec`: parse, lower, passes, emission, atomic write; the first compile of the",
        "  process (templates loaded and compiled) and the median of 5 more; the whole command in a fresh process",
        "- command: `python bench/compile_cpu.py`",
        "",
        "| spec | first compile ms | median of 5 ms | `lmoec compile` whole command s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {spec} | {first * 1e3:.1f} | {again * 1e3:.1f} | {cli:.2f} |" for spec, first, again, cli in rows]
    out = ROOT / "bench" / "results" / "compile_cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
