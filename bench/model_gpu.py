"""A0.3B-2B end to end on one GPU: training eager vs torch.compile, decoding eager vs a CUDA graph (issue 21).

    python bench/model_gpu.py --part train     # ~12 min on one H100: training, every variant, every mode
    python bench/model_gpu.py --part train --modes compiled,compiled+recompute   # some modes
    python bench/model_gpu.py --part decode    # ~3 min: decoding
    python bench/model_gpu.py --part train --variants "GLA,Qwen2-MoE (transformers)"   # some variants
    python bench/model_gpu.py --smoke          # tiny shapes on CPU: checks the script, measures nothing

training   GLA, Gated DeltaNet, the hybrid GLA LLLN stack and the attention baseline at A0.3B-2B (hidden 1024,
           12 layers, 64 experts of 896, top-8), 16K tokens per step at T = 2K x 8, 8K x 2, 16K x 1. One full
           `lmoec train` step (bf16 autocast, fp32 master weights, cross-entropy + MoE aux losses, backward,
           clipping, the fused AdamW), eager, with `lmoec train --compile` (each block through torch.compile,
           inductor) and with `--compile --recompute` (activation checkpointing per block). The comparison row: transformers' Qwen2MoeForCausalLM at the same shape (random init, eager,
           the same step). Cells: tokens/s, model TFLOP/s, MFU against the bf16 matmul ceiling measured in this
           process (8192^3), allocator peak. The FLOP count per token is written out in the results, and one step
           at 8K is profiled (kernel time vs wall time, top kernels). Checked in the same process: the compiled
           step's first loss equals the eager one (same init, same batch) to bf16 rounding.
decoding   GLA, Gated DeltaNet, the hybrid and the Qwen2-MoE row, batch 1 and 16, one token after a context of 1K
           and 32K: the eager step, the StaticDecoder step replayed as a CUDA graph, and the same step compiled
           (inductor, fullgraph) before the capture; Qwen2-MoE's eager step with transformers' DynamicCache.
           The floor is the bytes one step must read (every weight it touches: the dense ones, the experts the
           batch routes to on average, the LM head; the recurrent states read and written; the KV caches) over
           the copy bandwidth measured in this process. Prefill tokens/s where batch x context <= 64K tokens (the
           forward that fills the cache, the LM head on the last position). Checked: the uncompiled graph's logits
           equal the eager step's, the compiled step is as close to a float32 step of the same weights as eager
           bf16 is (<= 1.25x), and one static step runs under torch.cuda.set_sync_debug_mode("error") (no host sync).

Writes markdown and JSON to $OUT (model_gpu_<part>[-<variants>].md / .json); prints the markdown. The budget is
checked before each variant and training mode; what is left when it runs out is skipped and said.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from lmoec.bench import device_name, fmt_gib, load_base, long_cache, model_variants, program_for, versions
from lmoec.runtime.attention import Attention, KVCache
from lmoec.runtime.moe import MoE
from lmoec.trainer import train as trainer
from lmoec.trainer.generate import StaticDecoder
from lmoec.trainer.train import TrainConfig, autocast_for, clipped_step, loss_function, make_optimizer

TRAIN_VARIANTS = ["GLA", "Gated DeltaNet", "hybrid GLA LLLN", "attention baseline", "Qwen2-MoE (transformers)"]
OPT_IN_VARIANTS = {"Mamba": "mamba"}  # run when named (--variants): issue 17 asks for A0.3B-2B with lsm = mamba
DECODE_VARIANTS = ["GLA", "Gated DeltaNet", "hybrid GLA LLLN", "Qwen2-MoE (transformers)"]
PAPER = dict(base="models/a0.3b-2b.lsm", shapes=[(2048, 8), (8192, 2), (16384, 1)], profile_seq=8192,
             batches=[1, 16], contexts=[1024, 32768], model={}, moe={}, warmup=2, iters=3, decode_iters=20,
             prefill_tokens=65536)
SMOKE = dict(base="models/a0.3b-2b.lsm", shapes=[(64, 2), (128, 1)], profile_seq=64, batches=[1, 2],
             contexts=[32, 96], model=dict(hidden=64, heads=2, layers=4, vocab=256),
             moe=dict(experts=4, top_k=2, expert_ffn=64), warmup=1, iters=1, decode_iters=2,
             prefill_tokens=256)


# ---- ceilings, FLOPs, bytes ------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_ceiling(device) -> float:
    """bf16 FLOP/s of an 8192^3 matmul (the denominator of MFU)."""
    n = 8192 if device.type == "cuda" else 256
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, device, 3, 10)


def copy_bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    n = 2**29 if device.type == "cuda" else 2**22
    src = torch.empty(n, device=device, dtype=torch.int16)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / median_seconds(lambda: dst.copy_(src), device, 3, 10)


def flops_per_token(model, program, seq: int) -> tuple[float, str]:
    """Model FLOPs of one training token (forward + backward = 3 x forward; recomputation not counted), and how.

    matmuls: 2 FLOPs per active parameter forward (experts: top_k of E; the LM head counts, the embedding lookup
    does not). Mixing, forward per token and head: a chunkwise LSM layer 2C(K+V) (the C x C intra-chunk scores
    and their product with v) + 4KV (reading and updating the state), a delta layer another 2C(K+V) + 2KV (the
    WY factors); causal attention 2 T d (QK^T and PV over T/2 keys on average)."""
    config = model.config
    matmul = model.num_params(active=True, embeddings=False) + config["vocab"] * config["hidden"]
    mixing = 0.0
    for block in model.blocks:
        mixer = block.mixer
        if isinstance(mixer, Attention):
            mixing += 2 * mixer.heads * mixer.head_dim * seq
            continue
        lsm = program.ir.lsms[config["lsm"]]
        C, H, K, V = lsm.chunk_size, mixer.heads, mixer.head_k, mixer.head_v
        mixing += H * (2 * C * (K + V) + 4 * K * V)
        if lsm.recurrence.delta:
            mixing += H * (2 * C * (K + V) + 2 * K * V)
    total = 6 * matmul + 3 * mixing
    how = (f"6 x {matmul / 1e6:.1f}M active matmul parameters (incl. LM head {config['vocab']} x {config['hidden']}) "
           f"+ 3 x {mixing / 1e6:.1f}M mixing FLOPs (forward) = {total / 1e9:.3f} GFLOP per token at T = {seq}")
    return total, how


def decode_floor_bytes(model, cache, batch: int) -> tuple[int, str]:
    """Bytes one decode step must move: weights touched, states read and written, KV caches read."""
    experts, dense = 0, 0
    routed = set()
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = sum(w[0].numel() * w.element_size() for w in (m.w_gate, m.w_up, m.w_down))
            touched = m.experts * (1 - (1 - m.top_k / m.experts) ** batch)  # distinct experts, on average
            experts += int(touched * per_expert)
            routed |= {id(m.w_gate), id(m.w_up), id(m.w_down)}
    seen = set()
    for p in model.parameters():
        if id(p) not in routed and id(p) not in seen:
            seen.add(id(p))
            dense += p.numel() * p.element_size()
    states, kv = 0, 0
    for entry in cache:
        if isinstance(entry, KVCache):
            kv += sum(t[:, :, : entry.length].numel() * t.element_size() for t in (entry.k, entry.v))
        else:
            states += 2 * sum(t.numel() * t.element_size() for t in entry.values())
    total = dense + experts + states + kv
    how = (f"dense weights {dense / 2**20:.0f} MiB + experts touched {experts / 2**20:.0f} MiB + states r/w "
           f"{states / 2**20:.1f} MiB + KV read {kv / 2**20:.1f} MiB")
    return total, how


# ---- training ----------------------------------------------------------------------------------------------


TRAIN_MODES = ("eager", "compiled", "compiled+recompute", "compiled+clip-pass")


def lmoec_trainee(program, device, mode):
    """(model, loss(inputs, targets), flops(seq)) of an lmoec model; compiled: each block through torch.compile;
    compiled+recompute: also activation checkpointing per block (`lmoec train --compile --recompute`)."""
    with torch.device(device):
        model = program.model()
    step_loss = loss_function(model, compile=mode.startswith("compiled"), recompute=mode.endswith("+recompute"))
    return model, lambda inputs, targets: step_loss(inputs, targets)[1], lambda seq: flops_per_token(model, program, seq)


def bench_training(name, trainee, device, cfg, ceiling, rows, log, over_budget, modes=("eager", "compiled")):
    """trainee(mode) -> (model, loss(inputs, targets), flops(seq)); one step: bf16 autocast, fp32 master weights,
    backward, clipping folded into the fused AdamW of `lmoec train` (make_optimizer, clipped_step); a mode ending in
    "+clip-pass" clips in a pass of its own first (clip_grad_norm_, as before clipped_step: the A/B in one process)."""
    for mode in modes:
        if over_budget():
            log(f"skipped train {name} {mode}: over the budget")
            continue
        torch.manual_seed(0)
        torch._dynamo.reset()
        model, step_loss, flops_of = trainee(mode)
        optimizer = make_optimizer(model, TrainConfig())

        def step(inputs, targets):
            with autocast_for(device):
                loss = step_loss(inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if mode.endswith("+clip-pass"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            else:
                clipped_step(optimizer, 1.0)
            return loss.detach()

        for seq, batch in cfg["shapes"]:
            gen = torch.Generator(device=device).manual_seed(seq)
            vocab = model.config["vocab"] if isinstance(model.config, dict) else model.config.vocab_size
            inputs, targets = (torch.randint(0, vocab, (batch, seq), device=device, generator=gen) for _ in range(2))
            flops, how = flops_of(seq)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            first_loss = float(step(inputs, targets))  # includes compilation in compiled mode
            first = time.perf_counter() - t0
            seconds = median_seconds(lambda: step(inputs, targets), device, cfg["warmup"] - 1, cfg["iters"])
            tok_s = batch * seq / seconds
            row = dict(part="train", model=name, mode=mode, seq=seq, batch=batch, tok_s=tok_s, step_ms=seconds * 1e3,
                       first_step_s=first, first_loss=first_loss, gflop_per_token=flops / 1e9, flop_count=how,
                       tflops=tok_s * flops / 1e12, mfu=tok_s * flops / ceiling,
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
            if device.type == "cuda" and seq == cfg["profile_seq"]:
                row["profile"] = profile_step(lambda: step(inputs, targets), seconds)
            rows.append(row)
            log(f"train  {name:16s} {mode:18s} T {seq:6d} x {batch:2d}: {tok_s:9,.0f} tok/s, {row['tflops']:6.1f} TFLOP/s, "
                f"MFU {row['mfu']:.1%}, peak {fmt_gib(row['peak_gib'])}, first step {first:.1f} s, loss {first_loss:.4f}")
        del model, optimizer, step_loss


# ---- the comparison row: the same shape as a transformers Qwen2-MoE ---------------------------------------

HF_VARIANT = "Qwen2-MoE (transformers)"


def hf_qwen2_moe(program, device):
    """transformers' Qwen2MoeForCausalLM at the lmoec model's shape (hidden, layers, heads, KV heads, vocab,
    experts, top-k, expert width, RoPE theta, aux-loss weight), random init, fp32 (the caller casts it for
    decoding): what a user would pick instead of lmoec. Qwen2-MoE always builds a gated shared expert; its width
    is 0 here (the lmoec model has none), which leaves one [hidden -> 1] gate per layer."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    with torch.device("meta"):
        ref = program.model()
    c, moe = ref.config, next(m for m in ref.modules() if isinstance(m, MoE))
    config = Qwen2MoeConfig(
        vocab_size=c["vocab"], hidden_size=c["hidden"], num_hidden_layers=c["layers"], num_attention_heads=c["attn_heads"],
        num_key_value_heads=c["attn_kv_heads"],
        num_experts=moe.experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.w_gate.shape[-1],
        shared_expert_intermediate_size=0, intermediate_size=moe.w_gate.shape[-1], decoder_sparse_step=1,
        mlp_only_layers=[], norm_topk_prob=False, output_router_logits=True, router_aux_loss_coef=0.01,
        rope_theta=c["rope_theta"], max_position_embeddings=1 << 18, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.device(device):
        return Qwen2MoeForCausalLM(config)


def hf_trainee(program, device, mode):
    """eager: transformers' default; eager+checkpointing: with its gradient checkpointing, what a user turns on
    when the default runs out of memory (run 15: it does at 16K tokens a step on an 80 GB card)."""
    model = hf_qwen2_moe(program, device)
    if mode == "eager+checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss = lambda inputs, targets: model(input_ids=inputs, labels=inputs).loss  # noqa: E731 - HF shifts labels itself
    return model, loss, lambda seq: hf_flops_per_token(model, seq)


def hf_flops_per_token(model, seq: int) -> tuple[float, str]:
    """As flops_per_token: 6 x active matmul parameters (top_k of the experts, the LM head, not the embedding) +
    3 x causal attention's 2 T d per layer."""
    c = model.config
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    dense = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." not in n and "embed_tokens" not in n)
    matmul = dense + experts * c.num_experts_per_tok / c.num_experts
    mixing = c.num_hidden_layers * 2 * c.num_attention_heads * (c.hidden_size // c.num_attention_heads) * seq
    total = 6 * matmul + 3 * mixing
    return total, (f"6 x {matmul / 1e6:.1f}M active matmul parameters (incl. LM head {c.vocab_size} x {c.hidden_size}) "
                   f"+ 3 x {mixing / 1e6:.1f}M attention FLOPs (forward) = {total / 1e9:.3f} GFLOP per token at T = {seq}")


@torch.no_grad()
def bench_decoding_hf(name, program, device, cfg, bandwidth, rows, log):
    """The eager step with transformers' default DynamicCache (what generate() uses unless told otherwise), the
    cache filled with `context` random positions and cropped back after every step; floor as decode_floor_bytes."""
    from transformers import DynamicCache

    model = hf_qwen2_moe(program, device).to(torch.bfloat16).eval()
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    weights = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    experts = sum(b for n, b in weights.items() if ".mlp.experts." in n)
    dense = sum(b for n, b in weights.items() if ".mlp.experts." not in n and "embed_tokens" not in n)
    for batch in cfg["batches"]:
        token = torch.randint(0, c.vocab_size, (batch, 1), device=device)
        for context in cfg["contexts"]:
            cache = DynamicCache(config=c)
            for layer in range(c.num_hidden_layers):
                kv = [torch.randn(batch, c.num_key_value_heads, context, head_dim, device=device, dtype=torch.bfloat16)
                      for _ in range(2)]
                cache.update(*kv, layer)
            kv_bytes = 2 * c.num_hidden_layers * batch * c.num_key_value_heads * context * head_dim * 2

            def step():
                model(input_ids=token, past_key_values=cache, use_cache=True)
                cache.crop(-1)  # the step's own position: every step sees `context` cached ones

            touched = c.num_experts * (1 - (1 - c.num_experts_per_tok / c.num_experts) ** batch)
            floor_bytes = dense + int(experts * touched / c.num_experts) + kv_bytes
            how = (f"dense weights {dense / 2**20:.0f} MiB + experts touched {experts * touched / c.num_experts / 2**20:.0f} "
                   f"MiB + KV read {kv_bytes / 2**20:.1f} MiB")
            eager = median_seconds(step, device, 3, cfg["decode_iters"])
            rows.append(dict(part="decode", model=name, batch=batch, context=context, eager_ms=eager * 1e3,
                             graph_ms=None, floor_ms=floor_bytes / bandwidth * 1e3, floor_bytes=floor_bytes,
                             floor_count=how, no_graph="transformers' eager step (DynamicCache)"))
            log(f"decode {name:16s} batch {batch:2d} context {context:6d}: eager {eager * 1e3:.2f} ms, floor "
                f"{floor_bytes / bandwidth * 1e3:.3f} ms ({how})")
            del cache
    del model


def profile_step(step, seconds: float) -> dict:
    """One step under torch.profiler: GPU busy time (kernels and copies) against the step's wall time, and the
    kernels that take most of it. Busy well below wall means the host (launches, Python) sets the pace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    # kernels and copies only: a CPU op's device time repeats its kernels', so does a user annotation's span
    # (Optimizer.step#AdamW.step), and CUPTI's "Command Buffer Full" (the host waiting for room in the launch
    # queue) is not GPU work; counted, run 14 read 4.8 s busy in a 0.28 s step
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0
              and e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
              and "Command Buffer Full" not in e.key and "#" not in e.key]
    busy_ms = sum(e.self_device_time_total for e in events) / 1e3
    ranked = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)
    kernels = [(e.key[:90], e.self_device_time_total / 1e3, e.count) for e in ranked]
    # the results file shows the top 8; the JSON keeps the top 60 (where the rest of the step goes)
    return dict(wall_ms=seconds * 1e3, busy_ms=busy_ms, launches=sum(e.count for e in events), top=kernels[:8],
                kernels=kernels[:60])


def check_training(rows, cfg) -> list[str]:
    """The compiled (and compiled+recompute) and eager first losses agree to bf16 rounding at each model's first shape, the one step both
    modes take from the same weights (same init, same batch); later shapes start from weights the two modes have
    trained apart for several steps, so their losses are not compared."""
    out = []
    first_seq = cfg["shapes"][0][0]
    eager = {(r["model"], r["seq"]): r["first_loss"] for r in rows if r["mode"] == "eager" and r["seq"] == first_seq}
    for r in rows:
        want = eager.get((r["model"], r["seq"]))
        if r["mode"] != "eager" and want is not None:
            ok = abs(r["first_loss"] - want) <= 1e-2 * abs(want)
            out.append(f"{'ok' if ok else 'MISMATCH'}: {r['model']} T {r['seq']} {r['mode']} first loss {r['first_loss']:.5f}"
                       f" vs eager {want:.5f}")
    return out


# ---- decoding ----------------------------------------------------------------------------------------------


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def cache_in(cache: list, dtype: torch.dtype) -> list:
    """A copy of a prefill's cache in `dtype` (KV caches and recurrent states), for the float32 reference step: its
    own storage always (the states are float32 already, and a step may write its cache in place)."""
    out = []
    for entry in cache:
        if isinstance(entry, KVCache):
            out.append(KVCache(entry.k.to(dtype, copy=True), entry.v.to(dtype, copy=True), entry.next_pos, entry.length,
                               window=entry.window))
        elif isinstance(entry, dict):
            out.append({k: t.to(dtype, copy=True) if t.is_floating_point() else t.clone() for k, t in entry.items()})
        else:
            out.append(entry)
    return out


def prefill_seconds(model, batch: int, context: int, device) -> float:
    """Median seconds of a prefill of [batch, context] random tokens: the chunked forward that fills the cache,
    and the LM head on the last position only (what generation needs of it)."""
    ids = torch.randint(0, model.config["vocab"], (batch, context), device=device)

    def prefill():
        hidden, _ = model.hidden_states(ids, use_cache=True)
        return model.head(hidden[:, -1])

    return median_seconds(prefill, device, 1, 3)


@torch.no_grad()
def bench_decoding(name, program, device, cfg, bandwidth, rows, checks, log):
    torch.manual_seed(0)
    with torch.device(device):
        model = program.model().to(torch.bfloat16).eval()
        # the reference of the checks: the same (bf16-rounded) weights in float32
        reference = program.model().eval()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    if device.type != "cuda":  # the smoke run: the grouped experts CUDA takes in bf16 (the float loop syncs)
        for m in model.modules():
            if isinstance(m, MoE):
                m.grouped_backend = "grouped"
    vocab = model.config["vocab"]
    for batch in cfg["batches"]:
        _, short = model(torch.randint(0, vocab, (batch, 16), device=device), use_cache=True)
        token = torch.randint(0, vocab, (batch,), device=device)
        for context in cfg["contexts"]:
            cache = long_cache(short, context)
            floor_bytes, how = decode_floor_bytes(model, cache, batch)
            eager = median_seconds(lambda: model(token[:, None], cache=cache, use_cache=True), device, 3,
                                   cfg["decode_iters"])
            want = model(token[:, None], cache=cache, use_cache=True)[0][:, -1].float()
            exact = reference(token[:, None], cache=cache_in(cache, torch.float32), use_cache=True)[0][:, -1]
            eager_error = relative_error(want, exact)
            row = dict(part="decode", model=name, batch=batch, context=context, eager_ms=eager * 1e3, graph_ms=None,
                       floor_ms=floor_bytes / bandwidth * 1e3, floor_bytes=floor_bytes, floor_count=how)
            if batch * context <= cfg["prefill_tokens"]:
                row["prefill_tok_s"] = batch * context / prefill_seconds(model, batch, context, device)
            try:
                # room for the checked step, then consecutive steps: 3 warm-up and the timed ones
                decoder = StaticDecoder(model, cache, position=context, steps=1 + 3 + cfg["decode_iters"])
                error = relative_error(decoder.step(token), want)
                checks.append(f"{'ok' if error < 1e-2 else 'MISMATCH'}: {name} batch {batch} context {context}: static "
                              f"step logits vs eager, relative error {error:.2e} ({'CUDA graph' if decoder.graph else 'eager'})")
                row["graph_ms"] = median_seconds(lambda: decoder.step(token), device, 3, cfg["decode_iters"]) * 1e3
                row["graph"] = decoder.graph is not None
                del decoder
                # the same step compiled (fused kernels) before the capture
                compiled = StaticDecoder(model, cache, position=context, steps=1 + 3 + cfg["decode_iters"],
                                         compile_backend=trainer.COMPILE_BACKEND)
                # inductor rounds to bf16 at other places than eager's op-by-op bf16 does, so it is held to eager's own
                # distance from the float32 step, not to eager's logits
                error = relative_error(compiled.step(token).float(), exact)
                ok = error <= 1.25 * eager_error + 1e-3
                checks.append(f"{'ok' if ok else 'MISMATCH'}: {name} batch {batch} context {context}: compiled static "
                              f"step logits vs float32, relative error {error:.2e} (eager bf16 {eager_error:.2e})")
                row["compiled_graph_ms"] = median_seconds(lambda: compiled.step(token), device, 3, cfg["decode_iters"]) * 1e3
                del compiled
                if device.type == "cuda":
                    probe = StaticDecoder(model, cache, position=context, steps=1, cuda_graph=False)
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        probe.step(token)
                        checks.append(f"ok: {name} batch {batch} context {context}: static step without host sync")
                    except RuntimeError as err:
                        checks.append(f"SYNC: {name} batch {batch} context {context}: {str(err).splitlines()[0]}")
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                    del probe
            except Exception as err:  # noqa: BLE001 - a failed capture is a result, the other cases still run
                checks.append(f"FAILED: {name} batch {batch} context {context}: static step: "
                              f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
            rows.append(row)
            graph = "-" if row["graph_ms"] is None else f"{row['graph_ms']:.2f} ms"
            compiled_graph = f"{row['compiled_graph_ms']:.2f} ms" if row.get("compiled_graph_ms") else "-"
            prefill = f", prefill {row['prefill_tok_s']:,.0f} tok/s" if row.get("prefill_tok_s") else ""
            log(f"decode {name:16s} batch {batch:2d} context {context:6d}: eager {row['eager_ms']:.2f} ms, static/graph "
                f"{graph}, compiled {compiled_graph}, floor {row['floor_ms']:.3f} ms ({how}){prefill}")
            del cache
    del model, reference


# ---- output ------------------------------------------------------------------------------------------------


def markdown(rows, checks, header: list[str]) -> str:
    lines = ["# A0.3B-2B on one GPU: compiled training and CUDA-graph decoding (issue 21)", "", *header, ""]
    train = [r for r in rows if r["part"] == "train"]
    if train:
        shapes = list(dict.fromkeys((r["seq"], r["batch"]) for r in train))
        lines += ["## Training: tokens/s, model TFLOP/s, MFU, peak memory", "",
                  "| model | mode | " + " | ".join(f"{s} x {b}" for s, b in shapes) + " |", "|---|---|" + "---|" * len(shapes)]
        for (model, mode) in dict.fromkeys((r["model"], r["mode"]) for r in train):
            cells = []
            for s, b in shapes:
                r = next((r for r in train if (r["model"], r["mode"], r["seq"], r["batch"]) == (model, mode, s, b)), None)
                cells.append("-" if r is None else f"{r['tok_s']:,.0f} tok/s, {r['tflops']:.0f} TFLOP/s, MFU {r['mfu']:.1%}, "
                             f"{fmt_gib(r['peak_gib'])}")
            lines.append(f"| {model} | {mode} | " + " | ".join(cells) + " |")
        lines += ["", "FLOPs per token (model FLOPs, recomputation not counted):", ""]
        lines += [f"- {m}: {how}" for m, how in dict.fromkeys((r["model"], r["flop_count"]) for r in train)]
        profiled = [r for r in train if r.get("profile")]
        if profiled:
            lines += ["", "### Profile of one step (torch.profiler): GPU busy time vs wall time, top kernels", ""]
            for r in profiled:
                p = r["profile"]
                lines.append(f"- {r['model']} {r['mode']} T {r['seq']} x {r['batch']}: GPU busy {p['busy_ms']:.1f} ms of "
                             f"{p['wall_ms']:.1f} ms wall ({p['busy_ms'] / p['wall_ms']:.0%}), {p['launches']} kernel launches; "
                             "top: " + "; ".join(f"`{k}` {ms:.1f} ms ({n}x)" for k, ms, n in p["top"]))
        lines += ["", "First step (compilation included in compiled mode): " + "; ".join(
            f"{r['model']} {r['mode']} T {r['seq']}: {r['first_step_s']:.1f} s" for r in train), ""]
    decode = [r for r in rows if r["part"] == "decode"]
    if decode:
        lines += ["## Decoding: ms per token, eager vs static step (CUDA graph), and the floor", "",
                  "| model | batch | context | eager | CUDA graph | compiled + CUDA graph | floor | best / floor | prefill |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in decode:
            missing = "-" if r.get("no_graph") else "failed"
            graph = missing if r["graph_ms"] is None else f"{r['graph_ms']:.2f} ms"
            compiled = missing if r.get("compiled_graph_ms") is None else f"{r['compiled_graph_ms']:.2f} ms"
            timed = [t for t in (r["graph_ms"], r.get("compiled_graph_ms")) if t is not None]
            if r.get("no_graph"):
                timed = [r["eager_ms"]]
            ratio = f"{min(timed) / r['floor_ms']:.1f}x" if timed else "-"
            prefill = f"{r['prefill_tok_s']:,.0f} tok/s" if r.get("prefill_tok_s") else "-"
            lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['eager_ms']:.2f} ms | {graph} | {compiled} | "
                         f"{r['floor_ms']:.3f} ms | {ratio} | {prefill} |")
        lines += ["", "Floor bytes: " + "; ".join(f"{r['model']} b{r['batch']} c{r['context']}: {r['floor_count']}"
                                                  for r in decode), ""]
    if checks:
        lines += ["## Checks (same process)", "", *[f"- {c}" for c in checks], ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("train", "decode", "all"), default="all")
    ap.add_argument("--variants", help=f"comma-separated, from {', '.join(TRAIN_VARIANTS + list(OPT_IN_VARIANTS))}")
    ap.add_argument("--modes", default="eager,compiled,compiled+recompute",
                    help="lmoec training modes to run (the HF row runs eager)")
    ap.add_argument("--budget", type=float, default=520, help="seconds; cases left when it runs out are skipped (logged)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (aot_eager instead of inductor)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    modes = tuple(args.modes.split(","))
    if set(modes) - set(TRAIN_MODES):
        print(f"model_gpu.py: unknown mode in {args.modes!r}: choose from {', '.join(TRAIN_MODES)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    cfg = SMOKE if args.smoke else PAPER
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("model_gpu.py: no CUDA device (use --smoke on CPU)", file=sys.stderr)
        return 2
    if args.smoke:
        trainer.COMPILE_BACKEND = "aot_eager"
    base = load_base(cfg["base"])
    layers = cfg["model"].get("layers", base.model.layers)
    variants = model_variants(base, layers)
    variants.update({name: (lsm, "L" * layers) for name, lsm in OPT_IN_VARIANTS.items()})
    overrides = {k: v for k, v in cfg["model"].items() if k != "layers"}
    wanted = args.variants.split(",") if args.variants else None
    unknown = [v for v in wanted or [] if v not in variants and v != HF_VARIANT]
    if unknown:
        print(f"model_gpu.py: unknown variant {unknown[0]!r}: choose from {', '.join(variants)}", file=sys.stderr)
        return 2

    def build(name):  # the HF row takes the shape of the attention baseline (the same attention and MoE)
        lsm, pattern = variants["attention baseline" if name == HF_VARIANT else name]
        return program_for(lsm, pattern, base=base, moe=cfg["moe"], **overrides)

    log_lines = []

    def log(message):
        print(message, flush=True)
        log_lines.append(message)

    ceiling, bandwidth = matmul_ceiling(device), copy_bandwidth(device)
    header = [f"{device_name(device)}; {versions()}; {datetime.date.today().isoformat()}.",
              f"Measured here: bf16 matmul 8192^3 {ceiling / 1e12:.0f} TFLOP/s (MFU denominator), device copy "
              f"{bandwidth / 1e12:.2f} TB/s (decode floor).",
              f"Median of {cfg['iters']} training steps after {cfg['warmup']} (the first, compiling, timed apart); "
              f"decode: median of {cfg['decode_iters']} steps after 3."]
    log(" ".join(header))
    rows, checks = [], []
    parts = ["train", "decode"] if args.part == "all" else [args.part]

    def over_budget():
        return time.perf_counter() - started > args.budget

    for part in parts:
        for name in wanted or (TRAIN_VARIANTS if part == "train" else DECODE_VARIANTS):
            if over_budget():
                log(f"skipped {part} {name}: over the {args.budget:.0f} s budget")
                continue
            try:
                program = build(name)
                if part == "train" and name == HF_VARIANT:  # eager: what transformers users run by default
                    for mode in ("eager", "eager+checkpointing"):  # each its own try: the first may run out of memory
                        try:
                            bench_training(name, lambda mode: hf_trainee(program, device, mode), device, cfg, ceiling,
                                           rows, log, over_budget, modes=(mode,))
                        except torch.OutOfMemoryError as err:
                            log(f"train {name} {mode}: out of memory: {str(err).splitlines()[0]}")
                        gc.collect()
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                elif part == "train":
                    bench_training(name, lambda mode: lmoec_trainee(program, device, mode), device, cfg, ceiling,
                                   rows, log, over_budget, modes=modes)
                elif name == HF_VARIANT:
                    bench_decoding_hf(name, program, device, cfg, bandwidth, rows, log)
                else:
                    bench_decoding(name, program, device, cfg, bandwidth, rows, checks, log)
            except Exception as err:  # noqa: BLE001 - one variant's failure is logged, the others run
                log(f"{part} {name}: FAILED: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
            gc.collect()  # a failed variant's traceback holds its model and activations in a reference cycle
            if device.type == "cuda":
                torch.cuda.empty_cache()
    checks = check_training([r for r in rows if r["part"] == "train"], cfg) + checks
    header.append(f"Run time {time.perf_counter() - started:.0f} s (part {args.part}).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, checks, header)
    # letters, digits, "_" and "-" only: the device tool does not bring back files with other characters (run 15)
    tag = re.sub(r"[^A-Za-z0-9_-]+", "_", args.part + ("-" + "-".join(wanted) if wanted else ""))
    (out / f"model_gpu_{tag}.md").write_text(text)
    (out / f"model_gpu_{tag}.json").write_text(json.dumps({"rows": rows, "checks": checks, "log": log_lines}, indent=1))
    print(text)
    return 1 if any(not c.startswith("ok") for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
