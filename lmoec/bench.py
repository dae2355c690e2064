"""The efficiency figures of Linear-MoE (Sun et al., 2025) on the hardware at hand: `lmoec bench`.

    train    training tokens/s and peak memory vs sequence length at constant tokens per step
             (the paper's Fig. 4 / Table 3): pure Linear-MoE stacks, a hybrid LLLN stack and the
             all-attention baseline, each a full training step (forward, CE + MoE aux losses,
             backward, grad clipping, AdamW; bf16 autocast on CUDA).
    decode   latency of one token and cache bytes vs context length (Fig. 5): an LSM layer carries a
             fixed-size state, an attention layer a KV cache of the whole context.
    kernels  each LSM op (Program.op, backend "auto") vs SDPA causal attention at the same B, T, H, D,
             forward and forward+backward (and fla's kernels when fla is importable).

Every model is the base spec's model with its L layers' LSM and its pattern swapped (the paper trains
one model per LSM). Sizes: "tiny" shrinks the model and the shapes to run in a couple of minutes on a
small CPU; "paper" keeps the base model (A0.3B-2B by default) at the shapes of the paper, for a GPU.
Peak memory is torch.cuda.max_memory_allocated on CUDA; on CPU there is no allocator peak to read, so
it is reported as n/a, while decode cache bytes (counted from the cache tensors) are exact anywhere.
Timing on CPU assumes shared cores: one torch thread, the minimum of a few runs, and the best of several
rounds over all variants, so that a change of load does not single out the variant it happens to hit.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import compile_spec
from .ir.nodes import SpecIR
from .paths import SPECS
from .program import Program, compile_ir
from .runtime.attention import KVCache
from .trainer.generate import cache_nbytes
from .trainer.train import TrainConfig, autocast_for, clipped_step, lm_loss, make_optimizer, pick_device

FIGURES = ("train", "decode", "kernels")
PRETTY = {"bla": "BLA", "gla": "GLA", "gated_deltanet": "Gated DeltaNet", "retnet": "RetNet", "deltanet": "DeltaNet",
          "simple_gla": "Simple GLA", "rwkv6": "RWKV6", "rwkv7": "RWKV7", "mamba2": "Mamba2", "hgrn2": "HGRN2"}
PURE_LSMS = ("gla", "gated_deltanet", "bla")  # the pure Linear-MoE stacks of the training and decoding figures
KERNEL_LSMS = ("bla", "retnet", "gla", "deltanet", "gated_deltanet")


@dataclass(frozen=True)
class Size:
    """The shapes of one --size: training (constant tokens per step), decoding, kernels."""

    name: str
    base: str  # default base model spec
    train_lengths: tuple[int, ...]
    train_tokens: int  # tokens per training step: batch = train_tokens // length
    decode_contexts: tuple[int, ...]
    decode_batch: int
    kernel_lengths: tuple[int, ...]
    kernel_tokens: int  # B * T of the kernel figure
    kernel_heads: int
    kernel_dim: int
    warmup: int
    iters: int
    model: dict = field(default_factory=dict)  # model overrides (tiny: a small stack)
    moe: dict = field(default_factory=dict)  # MoE overrides

    def describe(self) -> str:
        m = ", ".join(f"{k} {v}" for k, v in {**self.model, **self.moe}.items()) or "as in the spec"
        return f"size {self.name} (model: {m})"


SIZES = {
    "tiny": Size("tiny", "models/tiny.lsm", train_lengths=(128, 256, 512, 1024, 2048), train_tokens=2048,
                 decode_contexts=(256, 1024, 4096, 16384, 32768), decode_batch=4,
                 kernel_lengths=(256, 1024, 4096), kernel_tokens=4096, kernel_heads=2, kernel_dim=32,
                 warmup=1, iters=2, model=dict(hidden=64, heads=2, layers=4, vocab=256),
                 moe=dict(experts=4, top_k=2, expert_ffn=64)),
    "paper": Size("paper", "models/a0.3b-2b.lsm", train_lengths=(2048, 4096, 8192, 16384), train_tokens=16384,
                  decode_contexts=(1024, 4096, 16384, 65536, 131072), decode_batch=16,
                  kernel_lengths=(2048, 8192, 32768), kernel_tokens=32768, kernel_heads=16, kernel_dim=128,
                  warmup=2, iters=3),
}


@dataclass
class BenchConfig:
    spec: Optional[str] = None  # base model spec (None: the size's default); an LSM-only spec: kernels only
    what: tuple[str, ...] = FIGURES
    size: Optional[str] = None  # None: tiny on CPU, paper on CUDA
    lengths: Optional[list[int]] = None  # training sequence lengths and kernel T
    contexts: Optional[list[int]] = None  # decode context lengths
    tokens: Optional[int] = None  # tokens per training step (None: the size's)
    device: str = "auto"
    variants: Optional[list[str]] = None  # training (and decoding) variants by name; None: all
    decode_variants: Optional[list[str]] = None  # None: the training variants
    budget: Optional[float] = None  # seconds: variants left when the training share runs out are skipped
    iters: Optional[int] = None  # timed runs per point and round (None: the size's)
    rounds: Optional[int] = None  # passes over all variants, best of each point kept (None: 3 on CPU, 1 on CUDA)
    threads: Optional[int] = None  # CPU intra-op threads (None: 1, see run_bench)
    note: str = ""  # free text for the settings line


@dataclass
class BenchResult:
    device: str
    settings: str
    train: list[dict] = field(default_factory=list)
    decode: list[dict] = field(default_factory=list)
    kernels: list[dict] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    seconds: float = 0.0


def parse_lengths(text: str) -> list[int]:
    """'2K,4096,8k' -> [2048, 4096, 8192]; anything else is a ValueError naming the bad item."""
    out = []
    for item in text.split(","):
        item = item.strip()
        scale = 1024 if item[-1:] in ("k", "K") else 1
        digits = item[:-1] if scale > 1 else item
        if not digits.isdigit() or int(digits) * scale < 1:
            raise ValueError(f"bad length {item!r} in {text!r}: expected positive integers like 512 or 2K, comma-separated")
        out.append(int(digits) * scale)
    return out


def parse_what(text: str) -> tuple[str, ...]:
    what = tuple(w.strip() for w in text.split(",") if w.strip())
    unknown = [w for w in what if w not in FIGURES]
    if unknown or not what:
        raise ValueError(f"unknown --what {','.join(unknown) or repr(text)}: choose from {','.join(FIGURES)}")
    return what


# ---- models -------------------------------------------------------------------------------------


def load_base(spec) -> SpecIR:
    """The IR of a spec path, or of a path under specs/ (e.g. 'models/tiny.lsm')."""
    path = Path(spec)
    if not path.exists() and (SPECS / path).exists():
        path = SPECS / path
    return compile_spec(path).ir


def lsms_of(lsm: str, base_ir: SpecIR) -> dict:
    """The LSM named `lsm`: the base spec's own, or specs/lsm/<lsm>.lsm."""
    if lsm in base_ir.lsms:
        return {lsm: base_ir.lsms[lsm]}
    path = SPECS / "lsm" / f"{lsm}.lsm"
    if not path.exists():
        raise ValueError(f"no lsm {lsm!r}: not in {base_ir.source} and no {path}")
    return compile_spec(path).ir.lsms


def program_for(lsm: Optional[str], pattern: str, base="models/a0.3b-2b.lsm", moe: Optional[dict] = None,
                **model_overrides) -> Program:
    """The base model spec with its L layers' LSM and its pattern replaced (and sizes overridden), compiled."""
    base_ir = base if isinstance(base, SpecIR) else load_base(base)
    if base_ir.model is None:
        raise ValueError(f"{base_ir.source}: the spec defines no model (only lsms {sorted(base_ir.lsms)}); "
                         "training and decoding need a model spec")
    lsms = lsms_of(lsm, base_ir) if lsm else {}
    name = f"bench_{lsm or 'attention'}_{pattern[:4].lower()}"
    update = {"name": name, "lsm": lsm, "pattern": pattern, "layers": len(pattern), **model_overrides}
    if "heads" in model_overrides:  # fewer heads: plain multi-head attention
        update["attention"] = base_ir.model.attention.model_copy(update={"kv_heads": None, "heads": None})
    if moe and base_ir.model.moe is not None:
        update["moe"] = base_ir.model.moe.model_copy(update=moe)
    model = base_ir.model.model_copy(update=update)
    return compile_ir(SpecIR(source=f"{base_ir.source} ({lsm or 'attention'}, {pattern})", name=name, lsms=lsms,
                             model=model, parallel=base_ir.parallel))


def model_variants(base_ir: SpecIR, layers: int) -> dict[str, tuple[Optional[str], str]]:
    """name -> (lsm, pattern): the base LSM pure, hybrid LLLN and all-attention, then the other pure stacks."""
    base_lsm = base_ir.model.lsm or "gla"
    pretty = PRETTY.get(base_lsm, base_lsm)
    hybrid = ("LLLN" * layers)[:layers]
    variants = {pretty: (base_lsm, "L" * layers), "attention baseline": (None, "N" * layers),
                f"hybrid {pretty} LLLN": (base_lsm, hybrid)}
    for lsm in PURE_LSMS:
        variants.setdefault(PRETTY.get(lsm, lsm), (lsm, "L" * layers))
    return variants


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds of fn() after `warmup` calls: the median on CUDA; the minimum on CPU, whose cores are often
    shared, so that the least disturbed run stands for the cost of the work itself."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times) if device.type == "cpu" else statistics.median(times)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in the Frobenius norm, in float64 on the CPU; inf when a holds a NaN or inf."""
    a, b = a.double().cpu(), b.double().cpu()
    if not a.isfinite().all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def outputs_and_grads(op, x: dict, h0, do, dht, cu, where, dtype, backend: str) -> dict:
    """o, final state and every gradient of one call of an emitted op on `where` in `dtype` (states in fp32, or fp64
    for fp64), the loss reading o and the final state through the fixed cotangents do and dht."""
    leaves = {n: t.to(where, dtype).clone().requires_grad_() for n, t in x.items()}
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves["initial_state"] = h0.to(where, state_dtype).clone().requires_grad_()
    cu_t = None if cu is None else torch.tensor(cu, device=where, dtype=torch.int32)
    o, ht = op(**leaves, output_final_state=True, cu_seqlens=cu_t, backend=backend)
    loss = (o.double() * do.to(where, torch.float64)).sum() + (ht.double() * dht.to(where, torch.float64)).sum()
    loss.backward()
    return {"o": o, "final_state": ht, **{f"d{n}": t.grad for n, t in leaves.items()}}


def write_report(out_dir: str, name: str, report: list[str], log: list[str]) -> None:
    """Rewrite `<name>.md` (the report) and `<name>_log.txt` under out_dir: the GPU scripts call it after every line,
    so a call cut off by its time limit keeps what it measured."""
    for suffix, lines in ((".md", report), ("_log.txt", log)):
        with open(os.path.join(out_dir, name + suffix), "w") as f:
            f.write("\n".join(lines) + "\n")


def kernel_ms(fn: Callable[[], object], cpu: bool = False, warmup: int = 5, rep: int = 40) -> float:
    """Median milliseconds of fn() by triton.testing.do_bench (CUDA events, L2 flushed); on the CPU (a bench
    script's smoke run) one call by the wall clock, which only shows that the timed code runs."""
    if cpu:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def fwd_and_fwd_bwd_ms(fn: Callable[[], torch.Tensor], grads: torch.Tensor, cpu: bool, log: Callable) -> tuple:
    """(forward ms, forward+backward ms) of fn() -> output tensor, each None where it raised (the traceback goes
    to `log`, and the benchmark goes on to its next row)."""
    out = []
    for run in (fn, lambda: fn().backward(grads)):
        try:
            out.append(kernel_ms(run, cpu))
        except Exception:  # noqa: BLE001 - a failed row is recorded, not fatal
            log(traceback.format_exc())
            out.append(None)
    return tuple(out)


def step_through(step: Callable, x: dict, state: torch.Tensor, per_token, **fixed) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs [B, T, ...], last state) of a decode step run token by token from `state` over the sequences of x
    [B, T, ...] (the inputs named in per_token; `fixed` goes to every call as is): what a chunked call must equal."""
    outs = []
    with torch.no_grad():
        for t in range(x["q"].shape[1]):
            out, state = step(**{n: x[n][:, t] for n in per_token}, **fixed, state=state)
            outs.append(out)
    return torch.stack(outs, 1), state


def kernel_profile(run: Callable[[], object], device, rows: int = 12) -> str:
    """torch.profiler's table of one call of `run` (warm it up first): per kernel on a GPU, sorted by GPU time;
    per op on CPU."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        run()
        synchronize(torch.device(device))
    sort = "cuda_time_total" if on_gpu else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=40)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> Optional[float]:
    """The CUDA allocator's peak; None on CPU, where there is none to read."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def is_oom(err: Exception) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def first_line(err: Exception) -> str:
    """The first line of an error's message: for CUDA out of memory, how much it tried to allocate and what was free."""
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def backend_note(program: Program, device: torch.device) -> str:
    lsm = program.ir.model.lsm
    if lsm is None or "L" not in program.ir.model.pattern:
        return "SDPA"
    ops = getattr(program.package, f"{lsm}_ops")
    name, reason = ops.backend_for("auto", torch.empty(1, device=device))
    return f"{name} ({reason})"


def bench_training(name: str, program: Program, device: torch.device, shapes, warmup: int, iters: int,
                   rows: list, say: Callable[[str], None]) -> None:
    """One full training step per (seq, batch); a row per shape (tok_s None: out of memory)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = program.model()
    vocab = program.ir.model.vocab
    optimizer = make_optimizer(model, TrainConfig())
    note = backend_note(program, device)

    def step(inputs, targets):
        with autocast_for(device):
            _, loss = lm_loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clipped_step(optimizer, 1.0)

    for seq, batch in shapes:
        inputs = torch.randint(0, vocab, (batch, seq), device=device)
        targets = torch.randint(0, vocab, (batch, seq), device=device)
        reset_peak(device)
        try:
            seconds = timed(lambda: step(inputs, targets), device, warmup, iters)
            row = dict(model=name, seq=seq, batch=batch, tok_s=batch * seq / seconds, peak_gib=peak_gib(device),
                       backend=note)
            say(f"train  {name:22s} seq {seq:6d} x {batch:3d}: {row['tok_s']:11,.0f} tok/s, peak {fmt_gib(row['peak_gib'])}")
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            optimizer.zero_grad(set_to_none=True)
            row = dict(model=name, seq=seq, batch=batch, tok_s=None, peak_gib=None, backend=note)
            say(f"train  {name:22s} seq {seq:6d} x {batch:3d}: out of memory ({first_line(err)})")
        rows.append(row)
    del model, optimizer
    reset_peak(device)


def long_cache(cache, context: int):
    """The cache of a short prefill with every KV cache stretched to `context` random positions.

    The cost of a decode step does not depend on the cached values, only on their number. Each KV cache is
    allocated once at its capacity: the context and one slot for the token decoded after it (a step writes
    it in place), or a full ring of `window` slots for a sliding-window layer.
    """
    out = []
    for layer in cache:
        if isinstance(layer, KVCache):
            B, H, _, D = layer.k.shape
            window = layer.window
            capacity, length = (context + 1, context) if window is None else (window, min(context, window))
            out.append(KVCache(torch.randn(B, H, capacity, D, dtype=layer.k.dtype, device=layer.k.device),
                               torch.randn(B, H, capacity, D, dtype=layer.v.dtype, device=layer.v.device),
                               context, length, window=window))
        else:
            out.append(layer)  # LSM state: the same size at any context
    return out


@torch.no_grad()
def bench_decoding(name: str, program: Program, device: torch.device, contexts, batch: int, warmup: int, iters: int,
                   rows: list, say: Callable[[str], None]) -> None:
    """Latency of one token after each context, and the bytes of the cache it reads (exact on any device)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = program.model().to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    vocab = program.ir.model.vocab
    _, short = model(torch.randint(0, vocab, (batch, 16), device=device), use_cache=True)
    token = torch.randint(0, vocab, (batch, 1), device=device)
    for context in contexts:
        cache = None
        try:
            reset_peak(device)
            cache = long_cache(short, context)
            seconds = timed(lambda: model(token, cache=cache, use_cache=True), device, warmup, iters)
            row = dict(model=name, context=context, batch=batch, ms=seconds * 1e3, cache_bytes=cache_nbytes(cache),
                       peak_gib=peak_gib(device))
            say(f"decode {name:22s} context {context:7d}: {row['ms']:8.2f} ms/token, cache "
                f"{row['cache_bytes'] / 2**20:9.2f} MiB, peak {fmt_gib(row['peak_gib'])}")
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            row = dict(model=name, context=context, batch=batch, ms=None, cache_bytes=None, peak_gib=None)
            say(f"decode {name:22s} context {context:7d}: out of memory ({first_line(err)})")
        rows.append(row)
        del cache
    del model
    reset_peak(device)


# ---- kernels ------------------------------------------------------------------------------------


def op_inputs(rec, B: int, T: int, H: int, D: int, dtype, device) -> tuple[list, dict]:
    """Random q, k, v and the extra arguments the recurrence takes (gates as in GLA / RetNet / DeltaNet)."""
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(3))
    if rec.delta or rec.dplr or rec.update == "titans":  # the delta rule (and Titans' inner step) wants unit keys
        k = F.normalize(k.float(), dim=-1).to(dtype)
    args = {}
    if rec.decay == "scalar":
        args["g"] = F.logsigmoid(torch.randn(B, T, H, device=device)) / 4
    elif rec.decay == "vector":
        args["g"] = F.logsigmoid(torch.randn(B, T, H, D, device=device)) / 16
    elif rec.decay == "constant":
        args["g"] = torch.log(1 - 2.0 ** (-5 - torch.arange(H, device=device, dtype=torch.float32)))
    if rec.delta and not rec.dplr:
        args["beta"] = torch.rand(B, T, H, device=device)  # fp32, as the delta kernels take it
    if rec.bonus:
        args["u"] = (torch.randn(H, D, device=device) * 0.5).to(dtype)
    if rec.dplr:
        alpha = torch.rand(B, T, H, 1, device=device)
        args["a"], args["b"] = (-alpha * k.float()).to(dtype), k.clone()
    if rec.elementwise == "outer_sum":  # GFW: GLA's gate on the values too
        args["gv"] = F.logsigmoid(torch.randn(B, T, H, D, device=device)) / 16
    elif rec.elementwise == "outer_product":  # Mamba: dt = softplus(.), S4D-real A
        args["dt"] = F.softplus(torch.randn(B, T, H, D, device=device) - 3)
        args["A"] = -torch.arange(1, D + 1, device=device, dtype=torch.float32).expand(H, D, D).contiguous()
    if rec.update != "none":  # test-time-training updates: the lr, then Titans' momentum and weight decay
        args["theta"] = torch.sigmoid(torch.randn(B, T, H, device=device)) / (D if rec.update == "ttt" else 1)
    if rec.momentum:
        args["eta"] = torch.sigmoid(torch.randn(B, T, H, device=device))
    if rec.weight_decay:
        args["alpha"] = torch.sigmoid(torch.randn(B, T, H, device=device) - 4)
    if rec.update == "ttt":  # the inner LayerNorm's weight and bias
        args["ln_weight"], args["ln_bias"] = torch.ones(H, D, device=device), torch.zeros(H, D, device=device)
    leaves = [x.requires_grad_(True) for x in (q, k, v, *args.values())]
    return leaves[:3], dict(zip(args, leaves[3:]))


def fla_ops() -> tuple[Optional[dict], str]:
    """fla's chunk kernels by recurrence key (decay, delta), or (None, why not)."""
    try:
        import fla
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as err:  # noqa: BLE001 - any import failure means: no peer to compare
        return None, f"fla not importable ({type(err).__name__}: {err})"
    ops = {
        ("none", False): lambda q, k, v, a, s: chunk_simple_gla(q, k, v, scale=s)[0],
        ("constant", False): lambda q, k, v, a, s: chunk_simple_gla(q, k, v, g=a["g"].expand(q.shape[:3]), scale=s)[0],
        ("scalar", False): lambda q, k, v, a, s: chunk_simple_gla(q, k, v, g=a["g"], scale=s)[0],
        ("vector", False): lambda q, k, v, a, s: chunk_gla(q, k, v, g=a["g"], scale=s)[0],
        ("none", True): lambda q, k, v, a, s: chunk_delta_rule(q, k, v, beta=a["beta"], scale=s)[0],
        ("scalar", True): lambda q, k, v, a, s: chunk_gated_delta_rule(q, k, v, g=a["g"], beta=a["beta"], scale=s)[0],
    }
    return ops, f"fla {getattr(fla, '__version__', '?')}"


def kernel_case(op_name: str, kind: str, fwd: Callable, leaves: list, T: int, B: int, device, warmup: int,
                iters: int, say) -> dict:
    """fwd and fwd+bwd median ms of fwd() -> tensor; peak MiB above the inputs on CUDA; errors kept as text."""
    row = dict(op=op_name, kind=kind, T=T, B=B, fwd_ms=None, fwdbwd_ms=None, peak_mib=None, error="")
    try:
        with torch.no_grad():
            row["fwd_ms"] = timed(fwd, device, warmup, iters) * 1e3
        grad_out = torch.randn_like(fwd())

        def fwd_bwd():
            for x in leaves:
                x.grad = None
            fwd().backward(grad_out)

        synchronize(device)
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        reset_peak(device)
        row["fwdbwd_ms"] = timed(fwd_bwd, device, warmup, iters) * 1e3
        if device.type == "cuda":
            row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except Exception as err:  # noqa: BLE001 - one op that fails (or OOMs) is a table cell, not the end of the run
        row["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"
    tps = f"{B * T / row['fwdbwd_ms'] * 1e3:11,.0f} tok/s fwd+bwd" if row["fwdbwd_ms"] else row["error"]
    say(f"kernel {op_name:22s} T {T:6d} x {B:3d}: fwd {fmt_ms(row['fwd_ms'])}, fwd+bwd {fmt_ms(row['fwdbwd_ms'])} ({tps})")
    for x in leaves:
        x.grad = None
    return row


def bench_kernels(programs: dict[str, Program], device: torch.device, size: Size, lengths, rows: list, say) -> None:
    """Each LSM op at backend auto, fla's kernel of the same recurrence if importable, SDPA causal; per T."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    H, D = size.kernel_heads, size.kernel_dim
    fla, fla_note = fla_ops() if device.type == "cuda" else (None, "fla's kernels are Triton kernels for CUDA")
    if fla is None:
        say(f"kernel fla skipped: {fla_note}")
    tokens = max(size.kernel_tokens, max(lengths))
    for T in lengths:
        B = max(1, tokens // T)
        torch.manual_seed(0)
        for lsm, program in programs.items():
            ops = getattr(program.package, f"{lsm}_ops")
            rec = ops.RECURRENCE
            (q, k, v), args = op_inputs(rec, B, T, H, D, dtype, device)
            op = program.op(lsm)
            backend = ops.backend_for("auto", q, v)[0]
            rows.append(kernel_case(f"lmoec {lsm}", f"lmoec ({backend})", lambda: op(q, k, v, **args)[0],
                                    [q, k, v, *args.values()], T, B, device, size.warmup, size.iters, say))
            # fla has no element-wise gates (GFW's chunk_gla peer is GLA's: bench/elementwise_gpu.py times it)
            # (nor test-time-training updates beyond the delta rule: bench/ttt_gpu.py times fla's TTT and titans)
            plain = not (rec.bonus or rec.dplr or rec.elementwise != "none" or rec.update != "none")
            peer = fla and fla.get((rec.decay, rec.delta)) if plain else None
            if peer is not None:
                rows.append(kernel_case(f"fla ({lsm} recurrence)", fla_note, lambda: peer(q, k, v, args, D ** -0.5),
                                        [q, k, v, *args.values()], T, B, device, size.warmup, size.iters, say))
            del q, k, v, args
        qkv = [torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        rows.append(kernel_case("SDPA causal", "torch SDPA", lambda: F.scaled_dot_product_attention(*qkv, is_causal=True),
                                qkv, T, B, device, size.warmup, size.iters, say))
        del qkv
        reset_peak(device)


def best_of(rounds: list[list[dict]], key: tuple[str, ...], higher: tuple[str, ...] = ()) -> list[dict]:
    """One row per key over all rounds: for each float field the largest value if it is in `higher`
    (throughput, peak memory), else the smallest (times); None (out of memory, an error) only where no
    round measured it."""
    merged: dict[tuple, dict] = {}
    for rows in rounds:
        for row in rows:
            best = merged.setdefault(tuple(row[f] for f in key), dict(row))
            for name, value in row.items():
                if not isinstance(value, float):
                    continue
                if best[name] is None:
                    best[name] = value
                    best["error"] = ""
                else:
                    best[name] = max(best[name], value) if name in higher else min(best[name], value)
    return list(merged.values())


# ---- the run ------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def versions() -> str:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton absent: say so
        triton_version = "not installed"
    return f"torch {torch.__version__}, Triton {triton_version}"


def resolve(cfg: BenchConfig) -> tuple[torch.device, Size, Optional[SpecIR]]:
    """Check every argument before anything runs; ValueError with one line otherwise."""
    unknown = [w for w in cfg.what if w not in FIGURES]
    if unknown or not cfg.what:
        raise ValueError(f"unknown --what {','.join(unknown) or '(empty)'}: choose from {','.join(FIGURES)}")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise ValueError(f"unknown --device {cfg.device!r}: choose auto, cpu or cuda")
    device = pick_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    size_name = cfg.size or ("paper" if device.type == "cuda" else "tiny")
    if size_name not in SIZES:
        raise ValueError(f"unknown --size {size_name!r}: choose from {', '.join(SIZES)}")
    for flag, values in (("--lengths", cfg.lengths), ("--contexts", cfg.contexts)):
        if values is not None and (not values or any(not isinstance(x, int) or x < 1 for x in values)):
            raise ValueError(f"bad {flag} {values}: expected positive integers")
    size = SIZES[size_name]
    if cfg.iters is not None:
        if cfg.iters < 1:
            raise ValueError(f"bad --iters {cfg.iters}: expected a positive integer")
        size = replace(size, iters=cfg.iters)
    if cfg.tokens is not None:
        if cfg.tokens < 1:
            raise ValueError(f"bad --tokens {cfg.tokens}: expected a positive integer")
        size = replace(size, train_tokens=cfg.tokens)
    if cfg.rounds is not None and cfg.rounds < 1:
        raise ValueError(f"bad --rounds {cfg.rounds}: expected a positive integer")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"bad --threads {cfg.threads}: expected a positive integer")
    base_ir = load_base(cfg.spec or size.base)
    if base_ir.model is None and ("train" in cfg.what or "decode" in cfg.what):
        raise ValueError(f"{cfg.spec}: the spec defines no model (only lsms {sorted(base_ir.lsms)}); "
                         "--what train/decode need a model spec (--what kernels takes an lsm-only spec)")
    if base_ir.model is not None and cfg.variants is not None:
        known = model_variants(base_ir, size.model.get("layers", base_ir.model.layers))
        bad = [v for v in cfg.variants + (cfg.decode_variants or []) if v not in known]
        if bad:
            raise ValueError(f"unknown variant {bad[0]!r}: choose from {', '.join(known)}")
    return device, size, base_ir


def run_bench(cfg: BenchConfig, say: Callable[[str], None] = print) -> BenchResult:
    """Measure the figures cfg.what asks for; nothing is written (see write_outputs).

    On CPU torch runs one intra-op thread unless cfg.threads says otherwise: on cores that other
    processes share, multithreaded torch waits on descheduled threads (100x slower, erratic steps
    measured here) and the figures would show the scheduler rather than the models.
    """
    device, size, base_ir = resolve(cfg)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or 1)
    try:
        return _run(cfg, say, device, size, base_ir)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: BenchConfig, say: Callable[[str], None], device: torch.device, size: Size,
         base_ir: SpecIR) -> BenchResult:
    started = time.perf_counter()
    lengths = cfg.lengths or list(size.train_lengths)
    tokens = max(size.train_tokens, max(lengths))
    shapes = [(L, max(1, tokens // L)) for L in lengths]
    contexts = cfg.contexts or list(size.decode_contexts)
    kernel_lengths = cfg.lengths or list(size.kernel_lengths)
    rounds = cfg.rounds or (1 if device.type == "cuda" else 3)
    parts = [size.describe(), f"base spec {base_ir.source}"]
    if "train" in cfg.what:
        parts.append(f"train: {tokens} tokens per step, lengths {', '.join(map(str, lengths))}")
    if "decode" in cfg.what:
        parts.append(f"decode: batch {size.decode_batch}, contexts {', '.join(map(str, contexts))}")
    if "kernels" in cfg.what:
        parts.append(f"kernels: H {size.kernel_heads}, D {size.kernel_dim}, B*T {max(size.kernel_tokens, max(kernel_lengths))}, "
                     f"{'bf16' if device.type == 'cuda' else 'fp32'}")
    parts.append(f"{'median' if device.type == 'cuda' else 'minimum'} of {size.iters} timed run(s) after {size.warmup} "
                 f"warmup" + (f", best of {rounds} rounds that each pass over every variant (a change of load on "
                              "shared cores then touches all variants alike)" if rounds > 1 else ""))
    if hasattr(os, "getloadavg"):
        parts.append("load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg()) + " at start")
    if cfg.note:
        parts.append(cfg.note)
    settings = "; ".join(parts)
    result = BenchResult(device=device_name(device), settings=settings)

    def log(message: str) -> None:
        say(message)
        result.log.append(message)

    log(f"{result.device}; {versions()}; {settings}")
    layers = size.model.get("layers", base_ir.model.layers) if base_ir.model else 0
    variants = model_variants(base_ir, layers) if base_ir.model else {}
    names = cfg.variants or list(variants)
    overrides = {k: v for k, v in size.model.items() if k != "layers"}

    built: dict[str, Program] = {}

    def build(name: str) -> Program:
        if name not in built:
            lsm, pattern = variants[name]
            built[name] = program_for(lsm, pattern, base=base_ir, moe=size.moe, **overrides)
        return built[name]

    def attempt(what: str, name: str, fn) -> None:
        """One variant's failure (a kernel that does not compile, say) is logged; the others still run."""
        try:
            fn()
        except Exception as err:  # noqa: BLE001
            log(f"{what} {name}: FAILED: {type(err).__name__}: {first_line(err)}")

    kernel_programs: dict[str, Program] = {}
    if "kernels" in cfg.what:
        for lsm in dict.fromkeys([*KERNEL_LSMS, *base_ir.lsms]):
            attempt("kernel", lsm, lambda: kernel_programs.__setitem__(lsm, compile_ir(SpecIR(
                source=f"bench kernel {lsm}", name=f"bench_op_{lsm}", lsms=lsms_of(lsm, base_ir)))))
    train, decode, kernels = [], [], []
    for round_ in range(rounds):
        if rounds > 1:
            log(f"round {round_ + 1} of {rounds}")
        train.append([])
        for name in names if "train" in cfg.what else []:
            if cfg.budget and time.perf_counter() - started > 0.65 * cfg.budget:  # leave a third for the rest
                log(f"skipped train {name}: over the training share of the {cfg.budget:.0f} s budget")
                continue
            attempt("train", name, lambda: bench_training(name, build(name), device, shapes, size.warmup, size.iters,
                                                          train[-1], log))
        decode.append([])
        for name in (cfg.decode_variants or names) if "decode" in cfg.what else []:
            if cfg.budget and time.perf_counter() - started > cfg.budget:
                log(f"skipped decode {name}: over the {cfg.budget:.0f} s budget")
                continue
            attempt("decode", name, lambda: bench_decoding(name, build(name), device, contexts, size.decode_batch,
                                                           size.warmup, size.iters, decode[-1], log))
        kernels.append([])
        if "kernels" in cfg.what:
            bench_kernels(kernel_programs, device, size, kernel_lengths, kernels[-1], log)
    result.train = best_of(train, ("model", "seq"), higher=("tok_s", "peak_gib"))
    result.decode = best_of(decode, ("model", "context"), higher=("peak_gib",))
    result.kernels = best_of(kernels, ("op", "T"), higher=("peak_mib",))
    result.seconds = time.perf_counter() - started
    return result


# ---- output -------------------------------------------------------------------------------------


def fmt_gib(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f} GiB"


def fmt_ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f} ms"


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def markdown(result: BenchResult, title: str = "lmoec bench: Linear-MoE efficiency figures") -> str:
    lines = [f"# {title}", "",
             f"{result.device}; {versions()}; {datetime.date.today().isoformat()}; {result.seconds:.0f} s.", "",
             f"Settings: {result.settings}.", ""]
    if result.train:
        lengths = list(dict.fromkeys((r["seq"], r["batch"]) for r in result.train))
        lines += ["## Training throughput and peak memory vs sequence length (Fig. 4 / Table 3)", "",
                  "One full training step at constant tokens per step; cells: tokens/s, allocator peak "
                  "(n/a on CPU: no allocator peak to read).", "",
                  "| model | " + " | ".join(f"{s} x {b}" for s, b in lengths) + " | change first -> last | LSM backend |",
                  "|---|" + "---|" * (len(lengths) + 2)]
        for name in dict.fromkeys(r["model"] for r in result.train):
            rows = {(r["seq"], r["batch"]): r for r in result.train if r["model"] == name}
            cells = [f"{rows[s]['tok_s']:,.0f} tok/s, {fmt_gib(rows[s]['peak_gib'])}" if s in rows and rows[s]["tok_s"]
                     else ("OOM" if s in rows else "-") for s in lengths]
            first, last = rows.get(lengths[0], {}).get("tok_s"), rows.get(lengths[-1], {}).get("tok_s")
            change = f"{100 * (last / first - 1):+.0f}%" if first and last else "-"
            backend = next(iter(rows.values()))["backend"]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {change} | {backend} |")
        lines.append("")
    if result.decode:
        contexts = list(dict.fromkeys(r["context"] for r in result.decode))
        batch = result.decode[0]["batch"]
        lines += ["## Decoding: latency per token and cache memory vs context (Fig. 5)", "",
                  f"Batch {batch}, one new token after the context; cells: ms/token, cache bytes (exact, counted "
                  "from the cache tensors), allocator peak (n/a on CPU).", "",
                  "| model | " + " | ".join(str(c) for c in contexts) + " |", "|---|" + "---|" * len(contexts)]
        for name in dict.fromkeys(r["model"] for r in result.decode):
            rows = {r["context"]: r for r in result.decode if r["model"] == name}
            cells = [f"{rows[c]['ms']:.2f} ms, cache {fmt_bytes(rows[c]['cache_bytes'])}, peak {fmt_gib(rows[c]['peak_gib'])}"
                     if c in rows and rows[c]["ms"] is not None else ("OOM" if c in rows else "-") for c in contexts]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if result.kernels:
        sdpa = {r["T"]: r for r in result.kernels if r["op"] == "SDPA causal"}
        lines += ["## Kernel throughput: each LSM op vs SDPA causal attention", "",
                  "Same B, T, H, D for every op; tokens/s = B*T / time; peak = allocator peak above the inputs during "
                  "fwd+bwd (n/a on CPU). Ratio: SDPA time / op time (> 1: the op is faster).", "",
                  "| T | B | op | backend | fwd ms | fwd+bwd ms | fwd+bwd tokens/s | peak MiB | fwd+bwd vs SDPA |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result.kernels:
            s = sdpa.get(r["T"])
            ratio = f"{s['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}x" if s and s["fwdbwd_ms"] and r["fwdbwd_ms"] else "-"
            tps = f"{r['B'] * r['T'] / r['fwdbwd_ms'] * 1e3:,.0f}" if r["fwdbwd_ms"] else r["error"] or "-"
            peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
            fwd = f"{r['fwd_ms']:.2f}" if r["fwd_ms"] is not None else "-"
            fb = f"{r['fwdbwd_ms']:.2f}" if r["fwdbwd_ms"] is not None else "-"
            lines.append(f"| {r['T']} | {r['B']} | {r['op']} | {r['kind']} | {fwd} | {fb} | {tps} | {peak} | {ratio} |")
        lines.append("")
    lines += ["## Log", "", "```", *result.log, "```", ""]
    return "\n".join(lines)


def plot(result: BenchResult, out: Path) -> list[Path]:
    """train.png, decode.png, kernels.png for the figures that have rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def short(n: int) -> str:
        return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)

    def length_axis(ax, rows, key, label):
        """Log-scaled lengths, ticked at the measured ones."""
        xs = sorted({r[key] for r in rows})
        ax.set_xscale("log")
        ax.set_xticks(xs, [short(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(label)

    def series(rows, key, x, y):
        for name in dict.fromkeys(r[key] for r in rows):
            pts = [(r[x], r[y]) for r in rows if r[key] == name and r[y] is not None]
            if pts:
                yield name, *zip(*pts)

    def save(fig, name):
        fig.suptitle(f"{result.device}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    if result.train:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for name, xs, ys in series(result.train, "model", "seq", "tok_s"):
            a.plot(xs, ys, marker="o", label=name)
        length_axis(a, result.train, "seq", "sequence length (constant tokens per step)")
        a.set(ylabel="tokens/s", title="training throughput")
        a.set_ylim(bottom=0)
        a.legend(fontsize=8)
        peaks = list(series(result.train, "model", "seq", "peak_gib"))
        for name, xs, ys in peaks:
            b.plot(xs, ys, marker="o", label=name)
        if peaks:
            length_axis(b, result.train, "seq", "sequence length")
            b.set(ylabel="peak GiB", title="training peak memory")
        else:
            b.axis("off")
            b.text(0.5, 0.5, "training peak memory: n/a\n(no allocator peak to read on CPU)", ha="center",
                   va="center", transform=b.transAxes)
        save(fig, "train.png")
    if result.decode:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for name, xs, ys in series(result.decode, "model", "context", "ms"):
            a.plot(xs, ys, marker="o", label=name)
        length_axis(a, result.decode, "context", "context length")
        a.set(ylabel="ms per token", title="decode latency")
        a.set_ylim(bottom=0)
        a.legend(fontsize=8)
        for name, xs, ys in series(result.decode, "model", "context", "cache_bytes"):
            b.plot(xs, [y / 2**20 for y in ys], marker="o", label=name)
        length_axis(b, result.decode, "context", "context length")
        b.set(yscale="log", ylabel="cache MiB", title="decode cache memory")
        save(fig, "decode.png")
    if result.kernels:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, title in ((a, "fwd_ms", "forward"), (b, "fwdbwd_ms", "forward + backward")):
            for name, xs, ys in series(result.kernels, "op", "T", key):
                tokens = {r["T"]: r["B"] * r["T"] for r in result.kernels}
                ax.plot(xs, [tokens[x] / (y / 1e3) for x, y in zip(xs, ys)], marker="o", label=name)
            length_axis(ax, result.kernels, "T", "T (constant B*T)")
            ax.set(yscale="log", ylabel="tokens/s", title=title)
        a.legend(fontsize=8)
        save(fig, "kernels.png")
    return written


def write_outputs(result: BenchResult, out: Path, md_name: str = "bench.md", title: Optional[str] = None) -> list[Path]:
    """DIR/bench.md and the PNGs of the figures that ran."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / md_name
    md.write_text(markdown(result, title) if title else markdown(result))
    return [md, *plot(result, out)]
