"""Where the activation memory of an A0.3B-2B training step goes, counted on CPU (issue #6).

For each pure stack of bench/model_gpu.py (GLA, Gated DeltaNet, BLA; attention baseline) a one-layer
model at the A0.3B-2B widths runs the forward and loss of one training step (lmoec.trainer.train.lm_loss)
under bf16 autocast with CUDA's float32 ops (lmoec.memory.cuda_like_autocast), at two short lengths;
lmoec.memory.count_saved counts the bytes autograd saves per component. Bytes linear in the tokens give
the per-token column, the rest (autocast copies of weights) the fixed one; the step total scales per-layer
components to 12 layers and 16K tokens. On CPU the LSM op's saves are those the Triton Function keeps on
the GPU, from shapes (the torch backend that runs here keeps others): the output says so.

Not counted: transients that live inside one op's forward or backward (e.g. the fp32 logits and their
gradient at the loss, [tokens, vocab] each, unless the loss is chunked), and the allocator's slack.

    python bench/memory_cpu.py [--tokens 512] [--step-tokens 16384] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import time

import torch

from lmoec.bench import load_base, program_for
from lmoec.memory import count_saved, cuda_like_autocast
from lmoec.trainer.train import lm_loss

STACKS = {"GLA": "gla", "Gated DeltaNet": "gated_deltanet", "BLA": "bla", "attention baseline": None}
ROWS = ("LSM layer", "attention layer", "MoE FFN", "norms (2 per layer)", "final norm + LM head + loss", "embedding")
PER_LAYER = {"LSM layer", "attention layer", "MoE FFN", "norms (2 per layer)"}


def measure(lsm, tokens: int, device: torch.device) -> tuple[dict, dict, int, int]:
    """(bytes per token, fixed bytes) per component of a one-layer model; its layer and model parameters."""
    torch.manual_seed(0)
    program = program_for(lsm, "L" if lsm else "N")
    with device:
        model = program.model()
    vocab = program.ir.model.vocab
    autocast = cuda_like_autocast if device.type == "cpu" else lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    counts = []
    for t in (tokens // 2, tokens):
        ids = torch.randint(0, vocab, (1, t + 1), device=device)
        counts.append(count_saved(model, ids[:, :-1], ids[:, 1:], lm_loss, autocast).by_component)
    (t1, c1), (t2, c2) = zip((tokens // 2, tokens), counts)
    per_token = {k: (c2.get(k, 0) - c1.get(k, 0)) / (t2 - t1) for k in c2}
    fixed = {k: c2[k] - per_token[k] * t2 for k in c2}
    block = sum(p.numel() for p in model.blocks[0].parameters())
    return per_token, fixed, block, sum(p.numel() for p in model.parameters()) - block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512, help="tokens of the measured forward (and half of it)")
    ap.add_argument("--step-tokens", type=int, default=16384)
    ap.add_argument("--stacks", default=",".join(STACKS))
    ap.add_argument("--out", help="also write the table here (markdown)")
    ap.add_argument("--device", default="cpu", help="cuda: real CUDA autocast and the Triton op's own saves, to check the count")
    args = ap.parse_args()
    layers = load_base("models/a0.3b-2b.lsm").model.layers
    device = torch.device(args.device)
    started = time.perf_counter()
    lines = [f"Activation bytes autograd saves for one A0.3B-2B training step ({layers} layers, bf16 autocast with "
             f"CUDA's fp32 ops), counted on {device} at 1 x {args.tokens // 2} and 1 x {args.tokens} "
             f"tokens; LSM op: " + ("its own saves." if device.type == "cuda" else
                                   "what the emitted Triton Function saves, from shapes (the torch backend runs on CPU)."),
             "", "Per component: bytes per token (+ fixed bytes: autocast copies of weights), per layer where it repeats.",
             "Step total: per-layer rows x " + f"{layers} layers, {args.step_tokens} tokens.", ""]
    header = "| stack | " + " | ".join(ROWS) + f" | activations, {args.step_tokens // 1024}K x {layers} layers | params + grads + AdamW |"
    lines += [header, "|" + "---|" * (len(ROWS) + 3)]
    for name in [n for n in args.stacks.split(",") if n]:
        per_token, fixed, block, rest = measure(STACKS[name], args.tokens, device)
        cells, total = [], 0.0
        for row in ROWS:
            if row not in per_token:
                cells.append("-")
                continue
            cells.append(f"{per_token[row] / 1024:,.1f} KiB" + (f" + {fixed[row] / 2**20:,.0f} MiB" if fixed[row] > 2**20 else ""))
            total += (per_token[row] * args.step_tokens + fixed[row]) * (layers if row in PER_LAYER else 1)
        state = (block * layers + rest) * 16  # fp32 param, grad, two AdamW moments
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {total / 2**30:.2f} GiB | {state / 2**30:.2f} GiB |")
        print(lines[-1], flush=True)
    lines += ["", f"({time.perf_counter() - started:.0f} s)"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
