"""`lmoec linearize`: a pretrained softmax-attention LLM (Llama, Mistral, Qwen2, Qwen3) as a gated linear-recurrent one.

Liger (Lan et al., 2025): every attention layer becomes an LSM layer that reuses the layer's own q, k, v and o
projections; the MLPs, norms and embeddings are kept as they are. The GLA gate is built from the key projection
(log gate = logsigmoid(k) / 16: here a projection W_gk that starts as a copy of the key projection, repeated to
the q heads, so fine-tuning can move it apart), q and k take a softmax over the head dim as their feature map,
scale 1. Qwen3's per-head q and k norms become the spec's `qk_norm` (the gate reads the key projection before
it). With `window` the layer is Liger Attention: o = mix * sliding-window softmax attention (RoPE, the
model's own) + (1 - mix) * GLA.

What it writes is ordinary lmoec: an editable `.lsm` spec (`model.lsm`) and an HF folder of its compiled package
with the mapped weights, loadable with AutoModelForCausalLM and `lmoec finetune`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
LSMS = ("gla", "hgrn2")
SPEC_FILE = "model.lsm"


class LinearizeError(ValueError):
    """A source model or a flag that linearize can't take (one line, naming what)."""


@dataclass(frozen=True)
class Source:
    """What the spec needs from the source model's config.json."""

    arch: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    norm_eps: float
    rope_theta: float
    tie: bool
    qkv_bias: bool
    qk_norm: bool  # Qwen3's RMSNorm of q and k per head
    head_dim: int  # may differ from hidden / heads (Qwen3)
    max_seq_len: int
    token_ids: dict


def read_source(config, where: str) -> Source:
    """Check that the config is one lmoec maps exactly, and take its numbers."""
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED:
        raise LinearizeError(f"{where}: model_type {arch!r} is not supported (supported: {', '.join(SUPPORTED)})")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if getattr(config, "hidden_act", "silu") != "silu":
        raise LinearizeError(f"{where}: hidden_act {config.hidden_act!r}: lmoec's dense FFN is SwiGLU (silu)")
    if getattr(config, "mlp_bias", False):
        raise LinearizeError(f"{where}: mlp_bias = true is not mapped (lmoec's FFN has no biases)")
    if arch != "qwen2" and getattr(config, "attention_bias", False):
        raise LinearizeError(f"{where}: attention_bias = true (a bias on o_proj) is not mapped")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise LinearizeError(f"{where}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not mapped (plain RoPE only)")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise LinearizeError(f"{where}: config.json gives no rope_theta")
    token_ids = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return Source(arch=arch, vocab=config.vocab_size, hidden=config.hidden_size, layers=config.num_hidden_layers,
                  heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                  ffn=config.intermediate_size, norm_eps=float(config.rms_norm_eps), rope_theta=float(theta),
                  tie=bool(getattr(config, "tie_word_embeddings", False)), qkv_bias=arch == "qwen2",
                  qk_norm=arch == "qwen3", head_dim=head_dim,
                  max_seq_len=int(getattr(config, "max_position_embeddings", 4096) or 4096), token_ids=token_ids)


def parse_attention(items: Optional[list[str]]) -> Optional[dict]:
    """`--attention window=64 mix=0.5` -> {"window": 64, "mix": 0.5}; None without the flag."""
    if items is None:
        return None
    found = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in ("window", "mix") or key in found:
            raise LinearizeError(f"--attention takes window=N and mix=W (each once), got {item!r}")
        try:
            found[key] = int(value) if key == "window" else float(value)
        except ValueError:
            raise LinearizeError(f"--attention {key} must be {'an integer' if key == 'window' else 'a number'}, got {value!r}") from None
    if "window" not in found:
        raise LinearizeError("--attention needs window=N")
    if not 1 <= found["window"] <= 2**31 - 1 or not 0 <= found.get("mix", 0.5) <= 1:
        raise LinearizeError("--attention: window must be between 1 and 2**31 - 1 and mix between 0 and 1")
    found.setdefault("mix", 0.5)
    return found


def spec_text(src: Source, attention: Optional[dict], lsm: str = "gla") -> str:
    """The editable spec of the linearized model (numbers and fixed names only)."""
    if lsm == "hgrn2":  # HGRN2-style: the key projection is the forget gate's, and k = 1 - sigmoid(f)
        lines = [
            f"# Linearized from a {src.arch} checkpoint by `lmoec linearize --lsm hgrn2` (Liger, Lan et al., 2025): q, v and o",
            "# projections, MLPs, norms and embeddings reused; the forget gate f = x W_gk starts as the key projection",
            "# (repeated to the q heads, as v), the key is tied to it (k = 1 - sigmoid(f)). Edit and recompile freely.",
            "lsm liger_hgrn2 {",
        ]
        if src.head_dim * src.heads != src.hidden:
            expand = src.head_dim * src.heads / src.hidden
            lines.append(f"    expand_k = {expand!r}  expand_v = {expand!r}")
        lines += ["    decay vector = logsigmoid(x @ W_gk)", "    tie k = 1 - exp(g)", "    feature_map q = softmax",
                  "    scale = 1", "}"]
        return "\n".join(lines + _model_lines(src, "liger_hgrn2"))
    lines = [
        f"# Linearized from a {src.arch} checkpoint by `lmoec linearize` (Liger, Lan et al., 2025): q, k, v and o",
        "# projections, MLPs, norms and embeddings reused; W_gk (the GLA gate) starts as a copy of the key projection.",
        "# Edit and recompile freely: `lmoec finetune` builds this spec and loads the folder's weights by name.",
        "lsm liger_gla {",
    ]
    if src.kv_heads != src.heads:
        lines.append(f"    kv_heads = {src.kv_heads}")
    if src.head_dim * src.heads != src.hidden:
        expand = src.head_dim * src.heads / src.hidden
        lines.append(f"    expand_k = {expand!r}  expand_v = {expand!r}")
    if src.qk_norm:
        lines.append(f"    qk_norm {{ eps = {src.norm_eps!r} }}")
    if src.qkv_bias:
        lines.append("    qkv_bias = true")
        lines.append("    param gk_bias[H, K] = 0")
        lines.append("    decay vector = logsigmoid(x @ W_gk + gk_bias) / 16")
    else:
        lines.append("    decay vector = logsigmoid(x @ W_gk) / 16")
    lines += ["    feature_map = softmax", "    scale = 1"]
    if attention is not None:
        lines.append(f"    window_attention {{ window = {attention['window']} mix = {attention['mix']!r} "
                     f"rope_theta = {src.rope_theta!r} }}")
    lines.append("}")
    return "\n".join(lines + _model_lines(src, "liger_gla"))


def _model_lines(src: Source, lsm_name: str) -> list[str]:
    return [
        "",
        "model linearized {",
        f"    vocab = {src.vocab}  hidden = {src.hidden}  layers = {src.layers}  heads = {src.heads}",
        f'    pattern = "L" * {src.layers}',
        f"    lsm = {lsm_name}",
        f"    ffn {{ ffn = {src.ffn} }}",
        f"    norm = rmsnorm  norm_eps = {src.norm_eps!r}  tie_embeddings = {str(src.tie).lower()}  max_seq_len = {src.max_seq_len}",
        "}",
        "",
    ]


def map_weights(source: dict[str, torch.Tensor], src: Source, lsm: str = "gla") -> dict[str, torch.Tensor]:
    """The source model's state dict (transformers names) as the linearized CausalLM's (hgrn2: no k projection;
    v, like the gate, repeated to the q heads, which gives each q head the values its kv head gave it)."""
    out = {"embed.weight": source["model.embed_tokens.weight"], "norm.weight": source["model.norm.weight"]}
    out["head.weight"] = source["model.embed_tokens.weight"] if src.tie else source["lm_head.weight"]
    group = src.heads // src.kv_heads
    for i in range(src.layers):
        a, b = f"model.layers.{i}.", f"blocks.{i}."
        out[b + "mixer_norm.weight"] = source[a + "input_layernorm.weight"]
        out[b + "ffn_norm.weight"] = source[a + "post_attention_layernorm.weight"]
        for name in ("gate", "up", "down"):
            out[b + f"ffn.{name}.weight"] = source[a + f"mlp.{name}_proj.weight"]
        for name in ("q", "k", "v", "o") if lsm == "gla" else ("q", "o"):
            out[b + f"mixer.{name}_proj.weight"] = source[a + f"self_attn.{name}_proj.weight"]
            if src.qkv_bias and name != "o":
                out[b + f"mixer.{name}_proj.bias"] = source[a + f"self_attn.{name}_proj.bias"]
        if src.qk_norm:
            for name in ("q", "k"):
                out[b + f"mixer.{name}_norm.weight"] = source[a + f"self_attn.{name}_norm.weight"]
        k = source[a + "self_attn.k_proj.weight"]  # [kv_heads * D, hidden] -> per q head [heads * D, hidden]
        out[b + "mixer.W_gk.weight"] = k.unflatten(0, (src.kv_heads, -1)).repeat_interleave(group, 0).flatten(0, 1)
        if lsm == "hgrn2":
            v = source[a + "self_attn.v_proj.weight"]
            out[b + "mixer.v_proj.weight"] = v.unflatten(0, (src.kv_heads, -1)).repeat_interleave(group, 0).flatten(0, 1)
        if src.qkv_bias:
            bias = source[a + "self_attn.k_proj.bias"].unflatten(0, (src.kv_heads, -1))
            out[b + "mixer.gk_bias"] = bias.repeat_interleave(group, 0)
    return {name: t.detach().clone().contiguous() for name, t in out.items()}


def linearize(path: str | Path, out: str | Path, lsm: str = "gla", attention: Optional[dict] = None) -> Path:
    """Write OUT: model.lsm and the HF folder of its package with the source's weights mapped (all or nothing)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .cli.export import new_folder, publish
    from .program import compile_spec
    from .runtime.hf import save_hf

    path, out = Path(path), Path(out)
    if lsm not in LSMS:
        raise LinearizeError(f"--lsm {lsm!r}: linearize maps to {', '.join(LSMS)}")
    if not (path / "config.json").is_file():
        raise LinearizeError(f"{path}: no config.json (a Hugging Face model folder is expected)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise LinearizeError(f"{path / 'config.json'}: {' '.join(str(e).split())[:300]}") from None
    src = read_source(config, str(path / "config.json"))
    if lsm == "hgrn2" and attention is not None:
        raise LinearizeError("--lsm hgrn2 goes without --attention (its key is tied to the gate: window attention "
                             "would have no key projection of its own)")
    if lsm == "hgrn2" and (src.qkv_bias or src.qk_norm):
        raise LinearizeError(f"{path / 'config.json'}: --lsm hgrn2 maps llama and mistral checkpoints; {src.arch}'s "
                             f"{'k bias' if src.qkv_bias else 'k norm'} has no place in a gate tied to the key")
    tmp = new_folder(out, "lmoec linearize")
    try:
        text = spec_text(src, attention, lsm)
        (tmp / SPEC_FILE).write_text(text, encoding="utf-8")
        program = compile_spec(tmp / SPEC_FILE)
        source = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
        model = program.model()
        model.load_state_dict(map_weights(source, src, lsm))
        save_hf(program.package, model.config, model.state_dict(), tmp, token_ids=src.token_ids)
        try:
            AutoTokenizer.from_pretrained(path).save_pretrained(tmp)
        except (OSError, ValueError):
            pass  # the source folder has no tokenizer: the model is still complete
        publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
