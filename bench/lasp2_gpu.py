"""LASP-2 / LASP-2H on several GPUs (NCCL): scaling vs 1 GPU, time in communication, bytes vs the plan.

    torchrun --nproc-per-node 2 bench/lasp2_gpu.py --out $OUT/lasp2.md
    torchrun --nproc-per-node 2 bench/lasp2_gpu.py --smoke          # CPU, gloo, tiny shapes: checks the script

For each per-GPU length T (32K, 64K, 128K tokens, batch 1), forward + backward of
  op     the spec's LSM op (GLA of A0.3B-2B: H 8, K 64, V 128, bf16) and causal attention (H 8, D 128):
         1 GPU on T tokens vs LASP-2 / LASP-2H over the group on W*T tokens;
  model  the A0.3B-2B hybrid (GLA, LLLN * 3, 64 experts top-8, bf16 weights), cross-entropy:
         1 GPU on T tokens vs `apply_sequence_parallel` on W*T tokens.
Scaling efficiency = (W*T / t_sp) / (W * T / t_1) = t_1 / t_sp (t_sp: the slowest rank). Every
collective LASP-2 issues is counted (bytes per rank, and its stream time, which includes waiting for
the peer) and compared with the comm plan the compiler printed (`lmoec inspect --plan`). On one GPU
per rank the 1-GPU baselines run on every rank at once (same work, no communication).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import sympy
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmoec import compile_spec
from lmoec.program import compile_ir
from lmoec.trainer.distributed import shutdown_process_group
from lmoec.trainer.lasp2 import lasp2_op, lasp2h_attention
from lmoec.trainer.parallelize import apply_sequence_parallel, shard_sequence

SPEC = "specs/models/a0.3b-2b-hybrid.lsm"


class CommMeter:
    """Wraps the torch.distributed collectives LASP-2 calls: bytes per rank and stream time of each."""

    def __init__(self, device: torch.device):
        self.device, self.active, self.calls = device, False, []
        for name in ("all_gather", "reduce_scatter_tensor", "all_reduce"):
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, collective):
        def counted(*args, **kwargs):
            if not self.active:
                return collective(*args, **kwargs)
            world = dist.get_world_size(kwargs.get("group"))
            t = args[1] if name == "all_gather" else args[0]  # the piece this rank owns, or the result
            nbytes = t.numel() * t.element_size() // (world if name == "all_reduce" else 1)
            start = stamp(self.device)
            out = collective(*args, **kwargs)
            self.calls.append((name, nbytes, start, stamp(self.device)))
            return out

        return counted

    def measure(self, fn):
        """(bytes gathered forward, bytes reduce-scattered backward, ms in collectives) of one call of fn."""
        self.calls, self.active = [], True
        try:
            fn()
        finally:
            self.active = False
        sync(self.device)
        gathered = sum(b for n, b, _, _ in self.calls if n == "all_gather")
        scattered = sum(b for n, b, _, _ in self.calls if n != "all_gather")
        return gathered, scattered, sum(elapsed_ms(s, e) for _, _, s, e in self.calls)


def stamp(device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def elapsed_ms(start, end) -> float:
    return start.elapsed_time(end) if isinstance(start, torch.cuda.Event) else (end - start) * 1e3


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, iters: int) -> float:
    """Median ms of fn over iters, after warmup; the slowest rank's."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        sync(device)
        start = stamp(device)
        fn()
        end = stamp(device)
        sync(device)
        times.append(elapsed_ms(start, end))
    worst = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def fwd_bwd(fn, leaves):
    def step():
        for x in leaves:
            x.grad = None
        out = fn()
        out.float().square().mean().backward()

    return step


def plan_bytes(program, kind: str, T: int, act_bytes: int) -> tuple[int, int]:
    """(forward, backward) bytes per rank per layer of `kind` that the comm plan predicts."""
    sub = {sympy.Symbol("B"): 1, sympy.Symbol("T"): T, sympy.Symbol("act_bytes"): act_bytes}
    fwd = bwd = None
    for step in program.ir.comm.steps:
        if step.kind == kind:
            value = int(sympy.sympify(step.bytes_per_rank).subs(sub))
            if step.direction == "forward":
                fwd = value
            else:
                bwd = value
    return fwd, bwd


def guarded(fn):
    """fn(), or the reason it could not run (out of memory) as a string."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def bench_op(program, T, device, dtype, meter, world, args, rows):
    model = program.ir.model
    lsm = program.ir.lsm()
    H = lsm.heads or model.heads
    K, V = int(lsm.expand_k * model.hidden) // H, int(lsm.expand_v * model.hidden) // H
    op = program.op()

    def lsm_inputs(T_):
        x = [torch.randn(1, T_, H, D, device=device, dtype=dtype).requires_grad_() for D in (K, K, V)]
        g = F.logsigmoid(torch.randn(1, T_, H, K, device=device, dtype=torch.float32) + 3).div(16).requires_grad_()
        return x + [g]

    q, k, v, g = lsm_inputs(T)
    single = timed(fwd_bwd(lambda: op(q, k, v, g=g)[0], [q, k, v, g]), device, args.warmup, args.iters)
    sp = fwd_bwd(lambda: lasp2_op(op, q, k, v, g=g)[0], [q, k, v, g])
    parallel = timed(sp, device, args.warmup, args.iters)
    gathered, scattered, comm_ms = meter.measure(sp)
    rows.append(("op", f"LSM op {lsm.name} (H {H}, K {K}, V {V})", T, single, parallel, comm_ms, gathered, scattered,
                 plan_bytes(program, "lsm", T, dtype.itemsize)))

    Ha, D = model.attention.heads or model.heads, model.hidden // model.heads
    Hkv = model.attention.kv_heads or Ha
    qa = torch.randn(1, T, Ha, D, device=device, dtype=dtype).requires_grad_()
    ka, va = (torch.randn(1, T, Hkv, D, device=device, dtype=dtype).requires_grad_() for _ in range(2))

    def local_attention():
        return F.scaled_dot_product_attention(qa.transpose(1, 2), ka.transpose(1, 2), va.transpose(1, 2), is_causal=True,
                                              enable_gqa=Ha != Hkv)

    single = timed(fwd_bwd(local_attention, [qa, ka, va]), device, args.warmup, args.iters)
    sp = fwd_bwd(lambda: lasp2h_attention(qa, ka, va), [qa, ka, va])
    parallel = timed(sp, device, args.warmup, args.iters)
    gathered, scattered, comm_ms = meter.measure(sp)
    rows.append(("op", f"LASP-2H attention (H {Ha}, H_kv {Hkv}, D {D})", T, single, parallel, comm_ms, gathered, scattered,
                 plan_bytes(program, "attention", T, dtype.itemsize)))


def bench_model(program, T, device, dtype, meter, world, args, rows):
    torch.manual_seed(0)
    model = program.model().to(device=device, dtype=dtype)
    vocab = model.config["vocab"]
    ids = torch.randint(0, vocab, (1, T * world), device=device)
    local_ids = shard_sequence(ids)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(local_ids)
        F.cross_entropy(logits.flatten(0, 1), local_ids.flatten()).backward()

    single = timed(step, device, args.warmup, args.iters)  # before sp: every rank trains alone on T tokens
    apply_sequence_parallel(model)
    parallel = timed(step, device, args.warmup, args.iters)
    gathered, scattered, comm_ms = meter.measure(step)
    pattern = model.config["pattern"]
    n_lsm, n_attn = pattern.count("L"), pattern.count("N")
    lsm_f, lsm_b = plan_bytes(program, "lsm", T, dtype.itemsize)
    att_f, att_b = plan_bytes(program, "attention", T, dtype.itemsize)
    plan = (n_lsm * lsm_f + n_attn * att_f, n_lsm * lsm_b + n_attn * att_b)
    rows.append(("model", f"{model.config['name']} {pattern} fwd+bwd", T, single, parallel, comm_ms, gathered, scattered, plan))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def markdown(rows, device, dtype, world, seconds) -> str:
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU, gloo (smoke run: not a measurement)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "n/a"
    lines = [
        "# LASP-2 / LASP-2H sequence parallelism",
        "",
        f"{world} x {gpu}, {'NCCL' if device.type == 'cuda' else 'gloo'}; torch {torch.__version__}, Triton {triton_version}; "
        f"{datetime.date.today().isoformat()}; {seconds:.0f} s. Produced by `torchrun --nproc-per-node {world} bench/lasp2_gpu.py`.",
        "",
        f"Forward + backward, batch 1, {dtype}. `1 GPU`: one GPU on T tokens; `sp`: LASP-2 over "
        f"{world} GPUs on {world}*T tokens (slowest rank). Efficiency = t_1GPU / t_sp (same tokens per GPU). "
        "Comm ms: stream time of the collectives, waits for the peer included. Bytes are per rank per step "
        "(forward all_gather / backward reduce-scatter), the plan's from `lmoec inspect --plan` at B = 1 and the run's activation dtype.",
        "",
        "| level | what | T per GPU | 1 GPU ms | sp ms | efficiency | comm ms | gathered B fwd | scattered B bwd | plan B fwd / bwd | match |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level, what, T, single, parallel, comm, gathered, scattered, plan in rows:
        if isinstance(single, str) or isinstance(parallel, str):
            lines.append(f"| {level} | {what} | {T} | {single if isinstance(single, str) else f'{single:.2f}'} | "
                         f"{parallel if isinstance(parallel, str) else f'{parallel:.2f}'} | | | | | | |")
            continue
        match = "yes" if (gathered, scattered) == tuple(plan) else "NO"
        lines.append(f"| {level} | {what} | {T} | {single:.2f} | {parallel:.2f} | {single / parallel:.1%} | {comm:.2f} | "
                     f"{gathered} | {scattered} | {plan[0]} / {plan[1]} | {match} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--levels", nargs="+", default=["op", "model"], choices=["op", "model"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "lasp2.md"))
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shapes")
    args = parser.parse_args()

    started = time.time()
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        dist.init_process_group("gloo")
        args.lengths, args.warmup, args.iters = [64], 1, 1
        overrides = {"hidden": 64, "vocab": 256}  # in the IR, so the comm plan has the same dims
    else:
        device, dtype = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), torch.bfloat16
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        overrides = {}
    world, rank = dist.get_world_size(), dist.get_rank()
    program = compile_spec(SPEC)
    if overrides:
        ir = program.ir.model_copy(update={"model": program.ir.model.model_copy(update=overrides), "comm": None})
        program = compile_ir(ir)
    meter = CommMeter(device)
    rows = []

    def say(message):
        if rank == 0:
            print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    for T in args.lengths:
        if "op" in args.levels:
            say(f"op level, T per GPU {T}")
            got = guarded(lambda: bench_op(program, T, device, dtype, meter, world, args, rows))
            if got == "OOM":
                rows.append(("op", "LSM op / attention", T, "OOM", "OOM", 0, 0, 0, (0, 0)))
        if "model" in args.levels:
            say(f"model level, T per GPU {T}")
            got = guarded(lambda: bench_model(program, T, device, dtype, meter, world, args, rows))
            if got == "OOM":
                rows.append(("model", "A0.3B-2B hybrid", T, "OOM", "OOM", 0, 0, 0, (0, 0)))
    if rank == 0:
        text = markdown(rows, device, dtype, world, time.time() - started)
        with open(args.out, "w") as f:
            f.write(text)
        print(text)
    shutdown_process_group()


if __name__ == "__main__":
    main()
