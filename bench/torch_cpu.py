"""The torch chunkwise backend vs the token-by-token reference on CPU, for every family (issue 2's Numbers).

Both run in the same process, at the same thread count, on the same fp32 inputs (B=1, T=4096, H=4, K=V=64 by
default), forward only, after a warm-up; each repeat times the two back to back and the table reports medians
(the machine is shared: back-to-back ratios are steadier than either time). The torch path also
forward+backward. Writes bench/results/torch_cpu.md.

    python bench/torch_cpu.py [--T 4096] [--repeats 5] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import RECURRENCES, _program, random_inputs  # noqa: E402


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_ratio(fast, slow, repeats):
    """(median fast s, median slow s, median of the per-repeat ratios slow / fast), timed back to back after a warm-up each."""
    fast(), slow()
    pairs = [(seconds(fast), seconds(slow)) for _ in range(repeats)]
    return statistics.median(f for f, _ in pairs), statistics.median(s for _, s in pairs), statistics.median(s / f for f, s in pairs)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--D", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "torch_cpu.md")
    args = parser.parse_args()
    B, T, H, D = 1, args.T, args.H, args.D
    lines = [
        "# torch chunkwise backend vs the reference recurrence (CPU)",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- CPU: {cpu_name()} ({os.cpu_count()} cores, shared with other jobs)",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- shape: B={B}, T={T}, H={H}, K=V={D}, fp32 inputs, chunk 64, no autograd for the forward columns;",
        f"  after a warm-up, {args.repeats} repeats each timing torch and the reference back to back: medians",
        "  (speed-up: median of the per-repeat ratios)",
        "- command: `python bench/torch_cpu.py`",
    ]
    measured = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        measured[threads] = measure(B, T, H, D, args.repeats)
        lines += ["", f"## torch.set_num_threads({threads})", ""] + table(measured[threads])
    if len(measured) > 1:
        lines += ["", "## Best against best", ""] + best_against_best(measured)
    lines += ["", "## Reading these numbers", "", *NOTES]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def measure(B, T, H, D, repeats):
    """One row per family: (family, key, reference s, torch s, speed-up, torch fwd+bwd s, max rel err)."""
    rows = []
    for family, rec in RECURRENCES.items():
        op = _program(rec, 64).op()
        torch.manual_seed(0)
        inputs = random_inputs(rec, B=B, T=T, H=H, K=D, V=D, dtype=torch.float32)

        def run(backend):
            with torch.no_grad():
                return op(**inputs, output_final_state=True, backend=backend)

        t_torch, t_ref, ratio = median_ratio(lambda: run("torch"), lambda: run("reference"), repeats)
        (o, _), (o_ref, _) = run("torch"), run("reference")
        err = ((o - o_ref).abs().max() / o_ref.abs().max()).item()

        leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}

        def fwd_bwd():
            o, S = op(**leaves, output_final_state=True, backend="torch")
            (o.sum() + S.sum()).backward()

        fwd_bwd()
        t_train = statistics.median(seconds(fwd_bwd) for _ in range(repeats))
        rows.append((family, rec.key, t_ref, t_torch, ratio, t_train, err))
        print(f"{family:15s} reference {t_ref * 1e3:9.1f} ms  torch {t_torch * 1e3:7.1f} ms  "
              f"x{ratio:6.1f}  torch fwd+bwd {t_train * 1e3:7.1f} ms  max rel err (fp32) {err:.1e}", flush=True)

    return rows


NOTES = [
    "- The reference is a loop of tiny ops per token, which extra threads only slow; the chunkwise path is",
    "  batched 64x64 matmuls, which they speed up. Each table above runs both at the same thread count;",
    "  the best-against-best table pairs each side's fastest thread count.",
    "- DPLR is the slowest family: per chunk it needs about 14 batched 64x64x64 matmuls (four score matrices,",
    "  the triangular inverse and its two right-hand sides, the state chain, the outputs) against 4 for the",
    "  families without a rank-one term.",
]


def best_against_best(measured):
    """Per family: the reference at its fastest thread count against the torch path at its fastest."""
    lines = ["| family | reference fwd ms (threads) | torch fwd ms (threads) | speed-up |", "|---|---|---|---|"]
    for i, (family, *_) in enumerate(next(iter(measured.values()))):
        ref_threads = min(measured, key=lambda t: measured[t][i][2])
        torch_threads = min(measured, key=lambda t: measured[t][i][3])
        t_ref, t_torch = measured[ref_threads][i][2], measured[torch_threads][i][3]
        lines.append(f"| {family} | {t_ref * 1e3:.1f} ({ref_threads}) | {t_torch * 1e3:.1f} ({torch_threads}) | {t_ref / t_torch:.1f}x |")
    return lines


def table(rows):
    lines = [
        "| family | recurrence | reference fwd ms | torch fwd ms | speed-up | torch fwd+bwd ms | max rel err vs reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, key, t_ref, t_torch, ratio, t_train, err in rows:
        lines.append(f"| {family} | {key} | {t_ref * 1e3:.1f} | {t_torch * 1e3:.1f} | {ratio:.1f}x | {t_train * 1e3:.1f} | {err:.1e} |")
    worst = min(rows, key=lambda r: r[4])
    lines += ["", f"Smallest speed-up: {worst[4]:.1f}x ({worst[0]}); the issue asks for at least 10x."]
    return lines


if __name__ == "__main__":
    main()
