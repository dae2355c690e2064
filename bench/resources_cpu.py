"""Registers, local memory (spills), shared memory and SASS instruction counts of every emitted Triton kernel launch, for
sm_90, without a GPU.

The launches are those tests/test_hopper_compile.py records (host code run on CPU tensors at the benchmark's
head dims, under every launch setting that test exercises, plus the overrides given here); each is compiled
by Triton for sm_90 and its cubin's resource usage read by cuobjdump. Spills show before a GPU is at hand
(the local Triton may differ from the GPU machine's, so treat them as leads); time still needs a GPU.

    python bench/resources_cpu.py gated_deltanet [gla ...] [--set KEY=JSON ...]
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def resource_usage(cubin: bytes) -> dict:
    """{registers, local (bytes of local memory per thread: spills and stack arrays), stack, instructions (SASS, per
    thread, as compiled: a loop's body once), loop (the largest loop body's), shuffles, shared (shared-memory loads,
    stores and barriers: layout conversions, mostly)} of one compiled kernel, read from its cubin by the cuobjdump that ships with Triton. Counts
    of instructions are a static lead for element-wise kernels, whose time is instruction issue, not a time."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True).stdout
        sass = subprocess.run([str(cuobjdump), "-sass", str(path)], capture_output=True, text=True).stdout
    number = lambda name: int(m.group(1)) if (m := re.search(name + r":(\d+)", text)) else -1
    lines = [(int(m.group(1), 16), m.group(2), m.group(3))
             for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", sass)]
    opcodes = [op.split(".")[0] for _, op, _ in lines]
    return {"registers": number("REG"), "local": number("LOCAL"), "stack": number("STACK"), "instructions": len(opcodes),
            "loop": _largest_loop(lines), "shuffles": opcodes.count("SHFL"),
            "shared": sum(opcodes.count(op) for op in ("LDS", "STS", "BAR"))}


def _largest_loop(lines: list) -> int:
    """Instructions of the largest loop (from a backward branch's target to the branch): the body a walk runs once
    per chunk, where the kernel's total also counts what runs once per program."""
    addresses = [addr for addr, _, _ in lines]  # ascending, as cuobjdump prints them
    spans = [i - bisect.bisect_left(addresses, int(t.group(1), 16)) + 1
             for i, (addr, op, rest) in enumerate(lines)
             if op.startswith("BRA") and (t := re.search(r"0x([0-9a-f]+)", rest)) and int(t.group(1), 16) < addr]
    return max(spans, default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--set", action="append", default=[], help="CONFIG override KEY=JSON (one launch setting more)")
    opts = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    import test_hopper_compile as thc
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import lmoec

    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in opts.set)}
    for spec in opts.specs:
        program = lmoec.compile_spec(ROOT / "specs" / "lsm" / f"{spec}.lsm")
        lsm = program.ir.lsm()
        module = getattr(program.package, f"{lsm.name}_triton")
        K, V = thc.HEAD_DIMS.get(spec, [(128, 128)])[0]  # the benchmark's head dims, as the compile test takes them
        seq, token, state_shape = thc._inputs(module, lsm.recurrence.decay, K=K, V=V)

        def run():
            import torch

            leaves = {n: t.clone().requires_grad_(t.is_floating_point()) for n, t in seq.items()}
            h0 = torch.randn(state_shape).requires_grad_()
            o, ht = module.chunk(**leaves, initial_state=h0, output_final_state=True)
            (o.float().sum() + ht.sum()).backward()

        defaults = dict(module.CONFIG)
        settings = [extra] if extra else thc.CASES.get(spec, [{}])
        seen = set()
        print(f"## {spec} (K = {K}, V = {V})\n\n| kernel | constexprs | warps | regs | local bytes | shared bytes | SASS instructions | "
              f"largest loop | SHFL | LDS + STS + BAR |\n|---|---|---|---|---|---|---|---|---|---|")
        for config in settings:
            module.CONFIG.update(defaults, **config)
            for fn, args, kwargs in thc._record_launches(module, run):
                signature, constexprs, options = thc._signature(fn, args, kwargs)
                key = f"{fn.__name__} {sorted(constexprs.items(), key=str)} {sorted(options.items())}"
                if key in seen:
                    continue
                seen.add(key)
                kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs),
                                        target=GPUTarget("cuda", 90, 32), options=options)
                rep = resource_usage(kernel.asm["cubin"])
                shown = {n: v for n, v in constexprs.items() if v is not None and n not in ("H", "C", "K", "V")}
                print(f"| {fn.__name__} | {shown} | {options.get('num_warps', 4)} | {rep['registers']} | "
                      f"{rep['local']} | {kernel.metadata.shared} | {rep['instructions']} | {rep['loop']} | "
                      f"{rep['shuffles']} | {rep['shared']} |", flush=True)
        module.CONFIG.update(defaults)
        print()


if __name__ == "__main__":
    main()
