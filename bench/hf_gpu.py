"""Hugging Face models and Liger on a GPU: correctness checks, then decode speed and memory against the teacher.

    python bench/hf_gpu.py            # results in $OUT/hf_gpu.json (or ./hf_gpu.json), a summary on stdout

Checks (fp32, TF32 off, exit status 1 if one fails):
- a linearized Llama with all weight on a full window computes the source's logits (SDPA's CUDA kernels);
- the linearized GLA layer on the Triton op equals it on the torch chunkwise path;
- generate() of an lmoec hybrid model equals lmoec's own CUDA-graph decoding token for token, and a left-padded
  batch equals the rows run alone.
Timing (bf16, one process, same GPU): decode ms/token and cache bytes at growing context for a random Llama
teacher (hidden 1024, 8 layers, GQA 16/4) and its linearizations (GLA; Liger Attention window 64).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lmoec  # noqa: E402,F401  (registers the HF classes)
from lmoec.linearize import linearize  # noqa: E402
from lmoec.trainer.generate import cache_nbytes, generate_ids  # noqa: E402

DEV = "cuda"


def llama(folder: Path, **sizes):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**sizes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def checks(tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    sizes = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, max_position_embeddings=4096)
    source = llama(tmp / "src", **sizes).to(DEV)
    ids = torch.randint(0, 512, (2, 300), device=DEV)
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(linearize(tmp / "src", tmp / "mix1", attention={"window": 512, "mix": 1.0})).to(DEV).eval()
        err = (full(ids).logits - source(ids).logits).abs().max().item()
        out["liger_mix1_vs_source_max_abs"] = err
        out["liger_mix1_ok"] = err < 1e-4
        gla = AutoModelForCausalLM.from_pretrained(linearize(tmp / "src", tmp / "gla")).to(DEV).eval()
        layer = gla.model.blocks[0].mixer
        x = torch.randn(2, 300, 256, device=DEV)
        a, b = layer(x, backend="triton"), layer(x, backend="torch")
        rel = ((a - b).norm() / b.norm()).item()
        out["gla_layer_triton_vs_torch_rel"] = rel
        out["gla_layer_ok"] = rel < 2e-3

    program = lmoec.compile_spec(Path(__file__).resolve().parents[1] / "specs" / "models" / "tiny.lsm")
    torch.manual_seed(1)
    base = program.model().to(DEV).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf = program.hf_model(base).to(DEV).eval()
    prompt = torch.randint(1, 256, (1, 17), device=DEV)
    mine = torch.stack(list(generate_ids(base, prompt, 24, temperature=0, static=True)), 1)
    theirs = hf.generate(prompt, max_new_tokens=24, do_sample=False)[:, 17:]
    out["generate_equals_cuda_graph_decoding"] = bool(torch.equal(mine, theirs))
    rows = [torch.randint(1, 256, (n,), device=DEV) for n in (17, 5, 11)]
    batch = torch.zeros(3, 17, dtype=torch.long, device=DEV)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, 17 - len(r):], mask[i, 17 - len(r):] = r, 1
    padded = hf.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False)[:, 17:]
    out["left_padding_equals_single_rows"] = all(
        torch.equal(padded[i], hf.generate(r[None], max_new_tokens=12, do_sample=False)[0, len(r):]) for i, r in enumerate(rows))
    return out


def cache_of(out):
    """The cache of a model output: `cache` since transformers 5.2x, `past_key_values` before (5.17 on the GPU
    machine); passing it back as `past_key_values` works in both."""
    return out.get("cache") if out.get("cache") is not None else out.get("past_key_values")


@torch.no_grad()
def decode(model, context: int, steps: int = 32) -> dict:
    ids = torch.randint(1, 1000, (1, context), device=DEV)
    torch.cuda.reset_peak_memory_stats()
    out = model(ids, use_cache=True)
    cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
    for _ in range(3):  # warm-up steps
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    held = cache.layers if hasattr(cache, "seen") else [(layer.keys, layer.values) for layer in cache.layers]
    return {"context": context, "ms_per_token": 1000 * (time.perf_counter() - start) / steps,
            "cache_bytes": cache_nbytes(held), "peak_bytes": torch.cuda.max_memory_allocated()}


def timing(tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM

    sizes = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, max_position_embeddings=65536)
    llama(tmp / "teacher", **sizes)
    models = {"teacher": tmp / "teacher",
              "gla": linearize(tmp / "teacher", tmp / "t-gla"),
              "liger-w64": linearize(tmp / "teacher", tmp / "t-liger", attention={"window": 64, "mix": 0.5})}
    result = {}
    for name, folder in models.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEV).eval()
        result[name] = [decode(model, n) for n in (1024, 4096, 16384)]
        del model
        torch.cuda.empty_cache()
    return result


def main() -> int:
    import transformers

    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
              "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        report["checks"] = checks(Path(tmp))
        report["decode"] = timing(Path(tmp))
    target = Path(os.environ.get("OUT", ".")) / "hf_gpu.json"
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["checks"], indent=2))
    for name, rows in report["decode"].items():
        print(name, " ".join(f"{r['context']}: {r['ms_per_token']:.2f} ms/token, cache {r['cache_bytes'] / 2**20:.1f} MiB" for r in rows))
    failed = [k for k, v in report["checks"].items() if v is False]
    if failed:
        print("FAILED:", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
