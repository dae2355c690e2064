"""Count the aten ops of one decode step: on a GPU each is (at least) a kernel launch from Python.

At batch 16 a decode step of A0.3B-2B does little arithmetic, so its latency on a GPU is set by how many ops
the host issues. This counts them on CPU, with the MoE's grouped-GEMM path (the one CUDA takes in bf16)
forced on, so the count is the GPU's.

    python bench/decode_ops_cpu.py [SPEC]   (default specs/models/a0.3b-2b.lsm)
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lmoec.runtime.moe as moe  # noqa: E402
from lmoec import compile_spec  # noqa: E402


class CountOps(TorchDispatchMode):
    """Counts every aten op dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    spec = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1] / "specs/models/a0.3b-2b.lsm")
    moe._resolve = lambda backend, rows: "grouped"  # CUDA's path in bf16: one grouped GEMM, no per-expert loop
    program = compile_spec(spec)
    torch.manual_seed(0)
    model = program.model().to(torch.bfloat16).eval()
    vocab = program.ir.model.vocab
    with torch.no_grad():
        _, cache = model(torch.randint(0, vocab, (2, 16)), use_cache=True)
        counter = CountOps()
        with counter:
            model(torch.randint(0, vocab, (2, 1)), cache=cache, use_cache=True)
    layers = program.ir.model.layers
    total = sum(counter.counts.values())
    print(f"{spec}: {total} aten ops per decode step, {total / layers:.0f} per layer ({layers} layers)")
    print("most frequent: " + ", ".join(f"{name} {n}" for name, n in counter.counts.most_common(12)))


if __name__ == "__main__":
    main()
