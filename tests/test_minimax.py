"""The MiniMax-01 family: the specs' sizes, and each feature they needed against a hand-written float64 reference.

The references follow MiniMax's modelling code (read in transformers' modeling_minimax.py and MiniMax's own):
partial RoPE on the first rotary_dim dims of wider-than-hidden/heads heads; the lightning layer's SiLU on q, k
and v, per-layer ALiBi slopes, RMSNorm over all heads and sigmoid gate; post-norm blocks with the residual
scale alpha. Each is written out here from the formulas, not from lmoec's code. The whole of minimax-tiny is
also compared with transformers' MiniMaxForCausalLM given the same weights.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import lmoec
from conftest import assert_close_to_scale
from lmoec.cli import main
from lmoec.ir.graph import embedding_params, param_counts
from lmoec.paths import SPECS
from lmoec.runtime.attention import Attention

TEXT_01 = SPECS / "models" / "minimax-text-01.lsm"
TINY = SPECS / "models" / "minimax-tiny.lsm"


@pytest.fixture(scope="module")
def tiny():
    return lmoec.compile_spec(TINY)


def perturb(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Every parameter moved off its init (norm weights off 1), so that each one matters to the output."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def test_text_01_counts_are_the_papers_456b_and_45_9b():
    program = lmoec.compile_spec(TEXT_01)
    total, active = param_counts(program.ir)
    embeddings = embedding_params(program.ir)
    assert abs(total / 456e9 - 1) < 0.01, total  # the paper's total counts the embedding and LM head
    assert abs((active - embeddings) / 45.9e9 - 1) < 0.01, active - embeddings  # its active count leaves them out
    with torch.device("meta"):
        model = program.model()
    assert model.num_params() == total
    assert model.num_params(active=True, embeddings=False) == active - embeddings
    attention = model.blocks[7].mixer
    assert (attention.heads, attention.kv_heads, attention.head_dim, attention.rotary_dim) == (64, 8, 128, 64)
    assert [b.kind for b in model.blocks] == list("LLLLLLLN" * 10)


def rope_reference(t: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """t [B, T, H, D]: pair i < R/2 is the complex number t[i] + j t[i + R/2], turned by positions * theta^(-2i/R);
    dims from R on stay as they are."""
    half = rotary_dim // 2
    angle = positions.double()[:, None] * theta ** (-2 * torch.arange(half, dtype=torch.float64) / rotary_dim)
    turned = torch.complex(t[..., :half], t[..., half:rotary_dim]) * torch.polar(torch.ones_like(angle), angle)[:, None]
    return torch.cat([turned.real, turned.imag, t[..., rotary_dim:]], dim=-1)


def attention_reference(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Causal GQA softmax attention with partial RoPE, spelled out."""
    B, T, _ = x.shape
    H, G, D = attn.heads, attn.kv_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(B, T, H, D)
    k = (x @ attn.k_proj.weight.T).view(B, T, G, D)
    v = (x @ attn.v_proj.weight.T).view(B, T, G, D)
    positions = torch.arange(T)
    q, k = (rope_reference(t, positions, attn.rotary_dim, attn.rope_theta) for t in (q, k))
    k, v = (t.repeat_interleave(H // G, dim=2) for t in (k, v))
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
    return o.reshape(B, T, H * D) @ attn.o_proj.weight.T


def test_attention_with_wide_heads_and_partial_rope_matches_the_reference_and_decodes():
    torch.manual_seed(0)
    attn = Attention(hidden=24, heads=4, kv_heads=2, rope_theta=500.0, head_dim=10, rotary_dim=6).double()
    perturb(attn)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    full = attn(x)
    assert_close_to_scale(full, attention_reference(attn, x), 1e-12)
    full_rope = Attention(hidden=24, heads=4, kv_heads=2, rope_theta=500.0, head_dim=10).double()
    full_rope.load_state_dict(attn.state_dict())
    assert (full_rope(x) - full).abs().max() > 1e-3  # rotary_dim = 6 of 10 is not the whole head
    y, cache = attn(x[:, :5], use_cache=True)
    steps = [y]
    for t in range(5, 9):
        y, cache = attn(x[:, t: t + 1], past=cache, use_cache=True)
        steps.append(y)
    assert_close_to_scale(torch.cat(steps, dim=1), full, 1e-12)


def slopes(heads: int, layer: int, layers: int) -> torch.Tensor:
    """MiniMax's lightning decay rate per head: ALiBi's 2^(-8 (h + 1) / H), times 1 - layer / (layers - 1) + 1e-5."""
    return torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)], dtype=torch.float64) * (
        1 - layer / (layers - 1) + 1e-5)


def lightning_reference(layer, x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """MiniMax's lightning layer token by token: silu(q, k, v), S_t = exp(-slope) S_{t-1} + k_t v_t^T, o_t = q_t S_t
    (no scale), RMSNorm over all heads' channels (eps 1e-5), times sigmoid(x W_og), then the output projection."""
    B, T, _ = x.shape
    H, D = layer.heads, layer.head_v
    q, k, v = (F.silu(x @ p.weight.T).view(B, T, H, D) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    state = x.new_zeros(B, H, D, D)
    outputs = []
    for t in range(T):
        state = torch.exp(-slope)[:, None, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state).reshape(B, H * D))
    o = torch.stack(outputs, dim=1)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.o_norm.weight
    o = o * torch.sigmoid(x @ layer.W_og.weight.T)
    return o @ layer.o_proj.weight.T


def test_lightning_layer_matches_minimax_forward_and_backward(tiny):
    torch.manual_seed(1)
    layer = tiny.layer(hidden=32, heads=2, layer_idx=3, layers=8).double()
    perturb(layer)
    assert (layer.head_k, layer.head_v) == (48, 48)
    x = torch.randn(2, 21, 32, dtype=torch.float64, requires_grad=True)
    got = layer(x, backend="torch")
    want = lightning_reference(layer, x, slopes(2, 3, 8))
    assert_close_to_scale(got, want, 1e-10)
    upstream = torch.randn_like(got)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad(got, params, upstream)
    wanted = torch.autograd.grad(want, params, upstream)
    for g, w in zip(grads, wanted):
        assert_close_to_scale(g, w, 1e-9)


def test_decay_slope_follows_the_layer_index_and_needs_layers(tiny):
    model = tiny.model()
    for i, block in enumerate(model.blocks):
        if block.kind == "L":
            torch.testing.assert_close(block.mixer.log_decay(dtype=torch.float64), -slopes(4, i, 8), rtol=1e-12, atol=0)
    layer_module = getattr(tiny.package, "minimax_tiny_lightning_layer")
    with pytest.raises(ValueError, match="reads `layers`"):
        layer_module.Layer(32, 2, layer_idx=0)


def test_head_v_alone_and_feature_map_v(tmp_path):
    """head_v without head_k (K from expand_k), and a ReLU on v: additive linear attention written out."""
    spec = tmp_path / "values.lsm"
    spec.write_text("lsm values { expand_k = 0.25 head_v = 12 feature_map v = relu }\n")
    torch.manual_seed(3)
    layer = lmoec.compile_spec(spec).layer(hidden=32, heads=2).double()
    assert (layer.key_proj_dim, layer.head_v) == (4, 12)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    q, k = ((x @ p.weight.T).view(2, 7, 2, 4) for p in (layer.q_proj, layer.k_proj))
    v = F.relu(x @ layer.v_proj.weight.T).view(2, 7, 2, 12)
    scores = torch.einsum("bthk,bshk->bhts", q, k).tril() * 4 ** -0.5
    want = torch.einsum("bhts,bshv->bthv", scores, v).reshape(2, 7, 24) @ layer.o_proj.weight.T
    assert_close_to_scale(layer(x), want, 1e-12)


def residual_reference(model, ids: torch.Tensor, postnorm: bool, alpha: float, beta: float) -> torch.Tensor:
    """The blocks composed by hand from the model's own sublayers: post-norm h = norm(x), x = alpha h + beta f(h);
    pre-norm x = alpha x + beta f(norm(x))."""
    x = model.embed(ids)
    for block in model.blocks:
        for norm, sublayer in ((block.mixer_norm, block.mixer), (block.ffn_norm, block.ffn)):
            h = norm(x)
            x = alpha * (h if postnorm else x) + beta * sublayer(h)
    return model.head(model.norm(x))


@pytest.mark.parametrize("residual, postnorm, alpha, beta", [
    ("", True, 2.0, 1.0),  # minimax-tiny as written: (2 * 8)^(1/4)
    ("residual { postnorm = false alpha = 1.5 beta = 0.75 }", False, 1.5, 0.75),
    ("residual = none", False, 1.0, 1.0),  # the base's block removed: the plain pre-norm residual
])
def test_residual_blocks_match_their_formula_train_and_decode(residual, postnorm, alpha, beta, tmp_path):
    spec = tmp_path / "variant.lsm"
    spec.write_text(f'import "{TINY.as_posix()}"\nmodel variant extends minimax_tiny {{ layers = 2 pattern = "LN" {residual} }}\n')
    torch.manual_seed(2)
    model = lmoec.compile_spec(spec).model().double()
    perturb(model, 0.05)
    ids = torch.randint(0, 256, (2, 24))
    logits = model(ids)
    with torch.no_grad():
        assert_close_to_scale(logits, residual_reference(model, ids, postnorm, alpha, beta), 1e-12)
    F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        out, cache = model(ids[:, :16], use_cache=True)
        steps = [out]
        for t in range(16, 24):
            out, cache = model(ids[:, t: t + 1], cache=cache, use_cache=True)
            steps.append(out)
    assert_close_to_scale(torch.cat(steps, dim=1), logits.detach(), 1e-10)


def test_minimax_tiny_equals_transformers_minimax_with_the_same_weights(tmp_path):
    """transformers' MiniMaxForCausalLM (its own port of MiniMax's code) with the weights mapped gives the same
    logits, in float32 (transformers runs its norms, RoPE tables and router in float32 whatever the dtype) at the
    DESIGN.md float32 tolerance. The port differs from MiniMax's code in three details, which this variant of
    minimax-tiny adopts: slopes scaled by 1 - layer / (layers - 1 + 1e-5) + 1e-5, RoPE over the whole head, and
    eps 1e-6 in the lightning layers' RMSNorm."""
    transformers = pytest.importorskip("transformers", reason="transformers (the [hf] extra) is not installed")
    if not hasattr(transformers, "MiniMaxForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no MiniMax model")
    spec = tmp_path / "hf_port.lsm"
    spec.write_text(f'import "{TINY.as_posix()}"\n'
                    "lsm port extends minimax_tiny_lightning {\n"
                    "    decay constant = -(2 ** (-8 * (h + 1) / H)) * (1 - layer / (layers - 1 + 1e-5) + 1e-5)\n"
                    "    output_norm_eps = 1e-6\n}\n"
                    "model port extends minimax_tiny { lsm = port attention { rotary_dim = none } }\n")
    torch.manual_seed(4)
    ours = lmoec.compile_spec(spec).model().eval()
    H, D, hidden, ffn = 4, 48, 128, 128
    config = transformers.MiniMaxConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=8, num_attention_heads=H,
        num_key_value_heads=2, head_dim=D, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
        layer_types=["linear_attention"] * 7 + ["full_attention"], block_size=16, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        full_attn_alpha_factor=2.0, linear_attn_alpha_factor=2.0, mlp_alpha_factor=2.0)
    theirs = transformers.MiniMaxForCausalLM(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():  # norm weights near 1, the rest small
            p.copy_(0.1 * torch.randn_like(p) + (1.0 if p.dim() == 1 else 0.0))
        weights = {"embed.weight": theirs.model.embed_tokens.weight, "norm.weight": theirs.model.norm.weight,
                   "head.weight": theirs.lm_head.weight}
        for i, layer in enumerate(theirs.model.layers):
            ours_at, attn, moe = f"blocks.{i}.", layer.self_attn, layer.mlp
            weights[ours_at + "mixer_norm.weight"] = layer.input_layernorm.weight
            weights[ours_at + "ffn_norm.weight"] = layer.post_attention_layernorm.weight
            if ours.blocks[i].kind == "L":  # one fused projection: per head q, then k, then v
                qkv = attn.qkv_proj.weight.view(H, 3, D, hidden)
                for j, side in enumerate("qkv"):
                    weights[ours_at + f"mixer.{side}_proj.weight"] = qkv[:, j].reshape(H * D, hidden)
                weights[ours_at + "mixer.W_og.weight"] = attn.output_gate.weight
                weights[ours_at + "mixer.o_proj.weight"] = attn.out_proj.weight
                weights[ours_at + "mixer.o_norm.weight"] = attn.norm.weight
            else:
                for side in "qkvo":
                    weights[ours_at + f"mixer.{side}_proj.weight"] = getattr(attn, f"{side}_proj").weight
            weights[ours_at + "ffn.router.weight"] = moe.gate.weight
            weights[ours_at + "ffn.w_gate"] = moe.experts.gate_up_proj[:, :ffn].transpose(1, 2)
            weights[ours_at + "ffn.w_up"] = moe.experts.gate_up_proj[:, ffn:].transpose(1, 2)
            weights[ours_at + "ffn.w_down"] = moe.experts.down_proj.transpose(1, 2)
        ours.load_state_dict(weights)
        ids = torch.randint(0, 256, (2, 40))
        assert_close_to_scale(ours(ids), theirs(ids).logits, 1e-5)


def test_lmoec_train_trains_minimax_tiny_on_the_default_corpus(tmp_path, capsys):
    argv = ["train", str(TINY), "--steps", "6", "--seq-len", "32", "--batch", "4", "--warmup", "2", "--eval-every", "6",
            "--save-every", "6", "--no-progress", "--out", str(tmp_path)]  # no --data: the Python stdlib's sources
    assert main(argv) == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[0] > math.log(256) - 0.5  # starts near uniform over bytes
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    assert (tmp_path / "checkpoint.pt").exists()
