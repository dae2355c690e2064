"""A0.3B-2B on one GPU: training tokens/s and peak memory per sequence length, and decoding cost per context.

The shape of Linear-MoE's Table 3 and Fig. 5 (Sun et al., 2025), all variants in one process:

    training   (seq 2K, batch 8), (4K, 4), (8K, 2), (16K, 1): 16K tokens per step at every length.
               One full `lmoec train` step: bf16 autocast forward, cross-entropy + MoE aux losses,
               backward, grad clipping, AdamW (fp32 master weights).
    variants   pure Linear-MoE with BLA, GLA and Gated DeltaNet (L * 12), the hybrid GLA stack
               LLLN * 3, and the all-attention MoE baseline (N * 12, SDPA flash attention).
    decoding   batch 16, one new token after a context of 1K .. 128K: latency and memory per token.
               LSM layers carry a fixed-size state; attention a KV cache of the whole context
               (filled with random keys and values: the cost of a step does not depend on them).

Every model is the emitted package of specs/models/a0.3b-2b.lsm with its LSM or pattern swapped;
backend "auto" (the emitted Triton kernels on CUDA where the LSM has them). Writes markdown to --out
(default $OUT/model.md). `--smoke` runs tiny shapes on CPU to check the script itself.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch

from lmoec import compile_spec
from lmoec.ir.nodes import SpecIR
from lmoec.program import compile_ir
from lmoec.runtime.attention import KVCache
from lmoec.runtime.generate import cache_nbytes
from lmoec.runtime.train import TrainConfig, autocast_for, lm_loss, make_optimizer

VARIANTS = {  # name -> (lsm spec under specs/lsm, or None; pattern). Run in this order, until --budget.
    "GLA": ("gla", "L" * 12),
    "attention baseline": (None, "N" * 12),
    "hybrid GLA LLLN": ("gla", "LLLN" * 3),
    "Gated DeltaNet": ("gated_deltanet", "L" * 12),
    "BLA": ("bla", "L" * 12),
}
TRAIN_SHAPES = [(2048, 8), (4096, 4), (8192, 2), (16384, 1)]
DECODE_CONTEXTS = [1024, 4096, 16384, 65536, 131072]
DECODE_VARIANTS = ["GLA", "attention baseline", "hybrid GLA LLLN"]


def program_for(lsm: str | None, pattern: str, base: str = "specs/models/a0.3b-2b.lsm", **model_overrides):
    """The base model spec with its L layers' LSM and its pattern replaced, compiled."""
    base_ir = compile_spec(base).ir
    lsms = compile_spec(f"specs/lsm/{lsm}.lsm").ir.lsms if lsm else {}
    name = f"bench_{lsm or 'attention'}_{pattern[:4].lower()}"
    update = {"name": name, "lsm": lsm, "pattern": pattern, "layers": len(pattern), **model_overrides}
    if "heads" in model_overrides:  # a smoke run: few heads (plain multi-head attention), few small experts
        update["attention"] = base_ir.model.attention.model_copy(update={"kv_heads": None})
        update["moe"] = base_ir.model.moe.model_copy(update={"experts": 4, "top_k": 2, "expert_ffn": 32})
    model = base_ir.model.model_copy(update=update)
    return compile_ir(SpecIR(source=f"{base} ({lsm or 'attention'}, {pattern})", name=name, lsms=lsms, model=model,
                             parallel=base_ir.parallel))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, iters: int) -> float:
    """Median seconds of fn()."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def backend_note(program, device) -> str:
    lsm = program.ir.model.lsm
    if lsm is None or "L" not in program.ir.model.pattern:
        return "SDPA"
    ops = getattr(program.package, f"{lsm}_ops")
    name, reason = ops.backend_for("auto", torch.empty(1, device=device))
    return f"{name} ({reason})"


def bench_training(name, program, device, shapes, warmup, iters, vocab, rows, say):
    torch.manual_seed(0)
    with torch.device(device):
        model = program.model()
    optimizer = make_optimizer(model, TrainConfig())
    note = backend_note(program, device)

    def step(inputs, targets):
        with autocast_for(device):
            _, loss = lm_loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for seq, batch in shapes:
        inputs = torch.randint(0, vocab, (batch, seq), device=device)
        targets = torch.randint(0, vocab, (batch, seq), device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds = timed(lambda: step(inputs, targets), device, warmup, iters)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            rows.append((name, seq, batch, batch * seq / seconds, peak, note))
            say(f"train {name:20s} seq {seq:6d} batch {batch}: {batch * seq / seconds:10,.0f} tok/s, peak {peak:6.1f} GiB")
        except torch.cuda.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            rows.append((name, seq, batch, None, None, note))
            say(f"train {name:20s} seq {seq:6d} batch {batch}: out of memory")
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()


def long_cache(cache, context: int):
    """The cache of a short prefill with every KV cache stretched to `context` random positions."""
    out = []
    for layer in cache:
        if isinstance(layer, KVCache):
            B, H, _, D = layer.k.shape
            out.append(KVCache(torch.randn(B, H, context, D, dtype=layer.k.dtype, device=layer.k.device),
                               torch.randn(B, H, context, D, dtype=layer.v.dtype, device=layer.v.device), context))
        else:
            out.append(layer)  # LSM state: the same size at any context
    return out


@torch.no_grad()
def bench_decoding(name, program, device, contexts, batch, warmup, iters, vocab, rows, say):
    torch.manual_seed(0)
    with torch.device(device):
        model = program.model().to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    _, short = model(torch.randint(0, vocab, (batch, 16), device=device), use_cache=True)
    token = torch.randint(0, vocab, (batch, 1), device=device)
    for context in contexts:
        cache = None
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            cache = long_cache(short, context)
            seconds = timed(lambda: model(token, cache=cache, use_cache=True), device, warmup, iters)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            rows.append((name, context, seconds * 1e3, cache_nbytes(cache) / 2**30, peak))
            say(f"decode {name:20s} context {context:7d}: {seconds * 1e3:8.2f} ms/token, cache {cache_nbytes(cache) / 2**30:7.2f} GiB, peak {peak:6.1f} GiB")
        except torch.cuda.OutOfMemoryError:
            rows.append((name, context, None, None, None))
            say(f"decode {name:20s} context {context:7d}: out of memory")
        del cache
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def markdown(train_rows, decode_rows, device, seconds) -> str:
    import triton

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"
    lines = [
        "# A0.3B-2B on one GPU: training throughput and decoding cost",
        "",
        f"{gpu}; torch {torch.__version__}, Triton {triton.__version__}; {datetime.date.today()}; "
        f"script bench/model_gpu.py ({seconds:.0f} s).",
        "",
        "## Training: tokens/s and peak memory, 16K tokens per step",
        "",
        "One full training step (bf16 autocast, fp32 AdamW, grad clip, MoE aux losses).",
        "",
        "| model | 2K x 8 | 4K x 4 | 8K x 2 | 16K x 1 | change 2K -> 16K | LSM backend |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r[0] for r in train_rows):
        rows = [r for r in train_rows if r[0] == name]
        cells = [f"{r[3]:,.0f} tok/s, {r[4]:.1f} GiB" if r[3] else "OOM" for r in rows]
        first, last = rows[0][3], rows[-1][3]
        change = f"{100 * (last / first - 1):+.0f}%" if first and last else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {change} | {rows[0][5]} |")
    lines += ["", "## Decoding: batch 16, one token after the context", "",
              "| model | " + " | ".join(f"{c // 1024}K" for c in DECODE_CONTEXTS) + " |",
              "|---|" + "---|" * len(DECODE_CONTEXTS)]
    for name in dict.fromkeys(r[0] for r in decode_rows):
        rows = [r for r in decode_rows if r[0] == name]
        cells = [f"{r[2]:.2f} ms, cache {r[3]:.2f} GiB, peak {r[4]:.1f} GiB" if r[2] else "OOM" for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "model.md"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    ap.add_argument("--budget", type=float, default=330, help="seconds; variants left when it runs out are skipped")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    started = time.perf_counter()
    device = torch.device("cpu" if args.smoke else "cuda")
    overrides = dict(hidden=64, heads=2, vocab=512) if args.smoke else {}
    shapes = [(64, 2), (128, 1)] if args.smoke else TRAIN_SHAPES
    contexts = [64, 256] if args.smoke else DECODE_CONTEXTS
    warmup, iters = (1, 1) if args.smoke else (2, 3)
    log = []

    def say(message):
        print(message, flush=True)
        log.append(message)

    train_rows, decode_rows = [], []
    names = [n for n in args.variants.split(",") if n]
    for name in names:
        if time.perf_counter() - started > 0.65 * args.budget:  # leave a third for decoding
            say(f"skipped {name}: over the training share of the {args.budget:.0f} s budget")
            continue
        lsm, pattern = VARIANTS[name]
        try:  # one variant's failure (a kernel that doesn't compile, say) is reported, the others still run
            program = program_for(lsm, pattern, **overrides)
            bench_training(name, program, device, shapes, warmup, iters, program.ir.model.vocab, train_rows, say)
        except Exception as e:
            say(f"train {name}: FAILED: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    for name in [n for n in DECODE_VARIANTS if n in names]:
        if time.perf_counter() - started > args.budget:
            say(f"skipped decoding {name}: over the {args.budget:.0f} s budget")
            continue
        lsm, pattern = VARIANTS[name]
        try:
            program = program_for(lsm, pattern, **overrides)
            bench_decoding(name, program, device, contexts, 2 if args.smoke else 16, warmup, iters,
                           program.ir.model.vocab, decode_rows, say)
        except Exception as e:
            say(f"decode {name}: FAILED: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    text = markdown(train_rows, decode_rows, device, time.perf_counter() - started)
    text += "\n## Log\n\n```\n" + "\n".join(log) + "\n```\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
