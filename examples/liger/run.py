"""Liger end to end on a CPU: train a small Llama teacher on bytes, linearize it, LoRA-finetune, compare held-out loss.

    python examples/liger/run.py --work /tmp/liger-work      # writes results.md, results.json, loss.png here

1. A Llama-style softmax teacher (byte vocabulary, hidden 128, 4 layers, 4 heads with 2 KV heads) trained from
   scratch on the default corpus (the Python standard library's sources, lmoec.trainer.data).
2. `lmoec linearize` to GLA alone and to Liger Attention (window 64, mix 0.5).
3. `lmoec finetune` with LoRA (r 8 on q, k, v, o) on a fixed token budget, the rest frozen.
4. Held-out loss of each (the same windows), the fraction of the teacher's gain over a uniform guess that is
   recovered, and decode time per token and cache memory against context length, teacher vs linearized.

Checkpoints go under --work (not committed); the results beside this script.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from lmoec.finetune import FinetuneConfig, LoraSettings, finetune, held_out_loss  # noqa: E402
from lmoec.linearize import linearize  # noqa: E402
from lmoec.trainer.data import load_tokens, sample_batch  # noqa: E402
from lmoec.trainer.generate import cache_nbytes  # noqa: E402

TEACHER = dict(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0)


def train_teacher(out: Path, steps: int, seq_len: int, batch: int, lr: float, say) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    data = load_tokens(None, seq_len)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TEACHER))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        window, _ = sample_batch(data.train, batch, seq_len + 1, 0, step)
        loss = model(window, labels=window).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0:
            say(f"teacher step {step + 1}/{steps} loss {float(loss.detach()):.3f} ({time.time() - start:.0f} s)")
    model.save_pretrained(out)
    return {"steps": steps, "tokens": steps * batch * seq_len, "seconds": time.time() - start}


@torch.no_grad()
def decode_profile(model, contexts: list[int], new_tokens: int = 16) -> list[dict]:
    """Per-token decode time after a prefill of each context length, and the cache's bytes then (greedy, batch 1)."""
    rows = []
    for n in contexts:
        ids = torch.randint(1, 256, (1, n), generator=torch.Generator().manual_seed(n))
        out = model(ids, use_cache=True)
        cache = out.cache  # transformers >= 5.2x names the cache `cache`, for its models as for lmoec's
        token = out.logits[:, -1:].argmax(-1)
        out = model(token, cache=cache, use_cache=True)  # one step untimed: first calls pay for lazy setup
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        per_token = (time.perf_counter() - start) / new_tokens
        held = cache.layers if hasattr(cache, "seen") else [(layer.keys, layer.values) for layer in cache.layers]
        rows.append({"context": n, "ms_per_token": 1000 * per_token, "cache_bytes": cache_nbytes(held)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="a folder for the checkpoints (created; not committed)")
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--finetune-steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--decode-only", action="store_true",
                    help="time decoding again from the checkpoints in --work (results.json's losses are kept)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    say = print
    from transformers import AutoModelForCausalLM

    if args.decode_only:
        results = json.loads((HERE / "results.json").read_text())
        decode_all(results, work)
        write_report(results, args)
        return 0

    teacher_dir = work / "teacher"
    teacher = train_teacher(teacher_dir, args.teacher_steps, args.seq_len, args.batch, 3e-3, say)
    cfg = FinetuneConfig(lora=LoraSettings(r=8), steps=args.finetune_steps, seq_len=args.seq_len, batch=args.batch // 2,
                         lr=2e-3, eval_batches=16)
    held_out = load_tokens(None, args.seq_len).eval
    results = {"teacher": {**teacher, "held_out": held_out_loss(AutoModelForCausalLM.from_pretrained(teacher_dir), held_out, cfg)},
               "uniform": math.log(256), "variants": {}}
    say(f"teacher held-out loss {results['teacher']['held_out']:.4f}")
    for name, attention in (("gla", None), ("liger-w64", {"window": 64, "mix": 0.5})):
        lin = linearize(teacher_dir, work / name, attention=attention)
        ft = finetune(lin, work / f"{name}-ft", FinetuneConfig(**{**cfg.__dict__, "merge": True}), say=say)
        results["variants"][name] = {"before": ft["held_out_before"], "after": ft["held_out_after"],
                                     "finetune_tokens": ft["steps"] * cfg.batch * (cfg.seq_len + 1),
                                     "trainable": ft["trainable"], "train_loss": ft["train_loss"]}
    decode_all(results, work)
    write_report(results, args)
    return 0


def decode_all(results: dict, work: Path) -> None:
    """Decode timings of the teacher and the fine-tuned variants into results (and results.json)."""
    from transformers import AutoModelForCausalLM

    contexts = [256, 1024, 4096]
    results["decode"] = {"teacher": decode_profile(AutoModelForCausalLM.from_pretrained(work / "teacher").eval(), contexts)}
    for name in results["variants"]:
        results["decode"][name] = decode_profile(AutoModelForCausalLM.from_pretrained(work / f"{name}-ft").eval(), contexts)
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def write_report(results: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    uniform, teacher = results["uniform"], results["teacher"]["held_out"]

    def recovered(loss):
        return (uniform - loss) / (uniform - teacher)

    lines = [
        "# Liger on a CPU: a byte-level Llama teacher, linearized and LoRA-finetuned",
        "",
        f"Made by `python examples/liger/run.py --work DIR` (teacher {args.teacher_steps} steps, finetune "
        f"{args.finetune_steps} steps, seq_len {args.seq_len}), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.",
        "Held-out loss in nats per byte on the same 16 windows of the default corpus' held-out tail. *Recovered* is the",
        "fraction of the teacher's gain over a uniform guess (ln 256) that the model keeps.",
        "",
        "| model | held-out loss | recovered | fine-tuning tokens (share of the teacher's) |",
        "|---|---|---|---|",
        f"| teacher (softmax attention) | {teacher:.4f} | 100% | - |",
    ]
    for name, v in results["variants"].items():
        share = v["finetune_tokens"] / results["teacher"]["tokens"]
        lines.append(f"| {name}, linearized | {v['before']:.4f} | {recovered(v['before']):.0%} | 0 |")
        lines.append(f"| {name}, + LoRA r=8 | {v['after']:.4f} | {recovered(v['after']):.0%} | {v['finetune_tokens']:,} ({share:.0%}) |")
    lines += ["", f"Decode, batch 1, greedy, fp32 on this machine's CPU ({os.cpu_count()} cores; wall-clock time per token "
              "over 16 tokens after one untimed step, so other jobs on the machine would count: `--decode-only` "
              "re-times it; `bench/hf_gpu.py` times decoding on a GPU). The cache is what a model holds "
              "at that context: it grows with the context for the teacher, not for the linearized models (GLA: the state; "
              "Liger: the state and 64 keys).", "",
              "| model | " + " | ".join(f"ms/token @ {r['context']}" for r in results["decode"]["teacher"]) + " | "
              + " | ".join(f"cache @ {r['context']}" for r in results["decode"]["teacher"]) + " |",
              "|---|" + "---|" * (2 * len(results["decode"]["teacher"]))]
    for name, rows in results["decode"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['ms_per_token']:.2f}" for r in rows) + " | "
                     + " | ".join(f"{r['cache_bytes'] / 1024:.0f} KiB" for r in rows) + " |")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, v in results["variants"].items():
        ax.plot(range(1, len(v["train_loss"]) + 1), v["train_loss"], label=f"{name} (LoRA, train)")
        ax.axhline(v["before"], ls=":", lw=1, color=ax.lines[-1].get_color())
    ax.axhline(teacher, color="black", ls="--", label="teacher (held-out)")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title("Linearized teacher: LoRA fine-tuning (dotted: held-out before)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "loss.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
