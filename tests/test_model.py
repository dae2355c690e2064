"""The emitted causal LM: files, config, init, parameter counts, decoding == full forward."""
from __future__ import annotations

import json

import pytest
import torch

from lmoec.ir.nodes import AttentionSpec, DenseFFNSpec, ModelSpec, MoESpec, SpecIR
from lmoec.program import compile_ir, compile_spec
from lmoec.paths import SPECS


def lsm_ir(name: str) -> SpecIR | None:
    """The lsms of specs/lsm/<name>.lsm, or None while that spec (or the frontend) is not in the tree."""
    path = SPECS / "lsm" / f"{name}.lsm"
    if not path.exists():
        return None
    return compile_spec(path).ir


def tiny_program(pattern: str, lsm: str | None = "gla", moe: bool = False, kv_heads: int | None = None,
                 window: int | None = None, tie: bool = False, hidden: int = 32, heads: int = 2):
    """A tiny model of the given pattern, built in the IR directly (no model spec file needed)."""
    lsms = {}
    if "L" in pattern:
        source = lsm_ir(lsm)
        if source is None:
            pytest.skip(f"specs/lsm/{lsm}.lsm is not in the tree yet")
        lsms = {name: spec.model_copy(update={"recurrence": None, "heads": None}) for name, spec in source.lsms.items()}
        lsm = source.lsm().name
    model = ModelSpec(
        name=f"tiny_{pattern.lower()}", vocab=256, hidden=hidden, layers=len(pattern), heads=heads, pattern=pattern,
        lsm=lsm if "L" in pattern else None,
        attention=AttentionSpec(kv_heads=kv_heads, window=window),
        moe=MoESpec(experts=4, top_k=2, expert_ffn=32) if moe else None,
        ffn=None if moe else DenseFFNSpec(ffn=64),
        tie_embeddings=tie,
    )
    ir = SpecIR(source=f"<test {pattern}>", name=model.name, lsms=lsms, model=model)
    program = compile_ir(ir)
    if moe and "moe.py" not in program.files:
        pytest.skip("the MoE emitter (moe.py) is not in the tree yet")
    return program


def decode_matches_forward(model, T: int = 11, prefill: int = 4, B: int = 2) -> float:
    """Max |logits| difference between a prefill + one-token steps and one full forward."""
    ids = torch.randint(0, 256, (B, T))
    with torch.no_grad():
        full = model(ids)
        logits, cache = model(ids[:, :prefill], use_cache=True)
        steps = [logits]
        for t in range(prefill, T):
            logits, cache = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(logits)
    return (torch.cat(steps, dim=1) - full).abs().max().item()


def test_emits_model_and_config_only_for_model_specs():
    program = tiny_program("NN")
    assert {"model.py", "config.json"} <= set(program.files)
    config = json.loads(program.files["config.json"])
    assert config["pattern"] == "NN" and config["vocab"] == 256 and config["ffn"] == 64
    lsm_only = SpecIR(source="<lsm only>", name="x", lsms={})
    assert "model.py" not in compile_ir(lsm_only).files
    assert program.package.model.CONFIG == config


def test_attention_decode_equals_full_forward_gqa_and_window():
    torch.manual_seed(0)
    for kv_heads, window in ((None, None), (1, None), (1, 5)):
        model = tiny_program("NN", kv_heads=kv_heads, window=window, heads=4).model().double()
        assert decode_matches_forward(model) < 1e-12, (kv_heads, window)


def test_window_cache_stays_bounded():
    from lmoec.trainer.generate import cache_nbytes

    model = tiny_program("N", window=3).model().double()
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        _, cache = model(ids, use_cache=True)
        before = cache_nbytes(cache)
        for t in range(5):
            _, cache = model(ids[:, :1], cache=cache, use_cache=True)
    assert cache_nbytes(cache) == before == 2 * 3 * 32 * 8  # k and v: 3 positions x hidden, float64


def test_init_scales_residual_outputs_and_ties_embeddings():
    torch.manual_seed(0)
    model = tiny_program("NNNN", tie=True, hidden=128, heads=4).model()
    assert model.head.weight is model.embed.weight
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))
    std = model.config["init_std"]
    assert abs(model.blocks[0].mixer.q_proj.weight.std().item() - std) < 0.1 * std
    out_std = model.blocks[0].mixer.o_proj.weight.std().item()
    assert abs(out_std - std / (2 * 4) ** 0.5) < 0.1 * out_std


def test_build_rejects_unknown_overrides_and_bad_patterns():
    program = tiny_program("NN")
    with pytest.raises(ValueError, match="unknown config keys"):
        program.model(hiden=3)
    with pytest.raises(ValueError, match="pattern"):
        program.model(layers=3)


@pytest.mark.parametrize("pattern", ["LL", "LN", "NLLN"])
def test_lsm_and_hybrid_decode_equals_full_forward(pattern):
    torch.manual_seed(0)
    model = tiny_program(pattern).model().double()
    assert decode_matches_forward(model, T=13, prefill=5) < 1e-9


def test_moe_model_collects_weighted_aux_losses_and_decodes():
    torch.manual_seed(0)
    model = tiny_program("NN", moe=True).model().double()
    ids = torch.randint(0, 256, (2, 9))
    model(ids)
    expected = sum(b.ffn.aux_loss_coef * b.ffn.last_aux_loss + b.ffn.z_loss_coef * b.ffn.last_z_loss for b in model.blocks)
    assert torch.allclose(model.aux_loss, expected)
    assert decode_matches_forward(model) < 1e-12
    routed = 3 * 4 * 32 * 32 * 2  # gate, up, down of 4 experts per layer, 2 layers
    assert model.num_params() - model.num_params(active=True) == routed // 2  # top-2 of 4 experts active


@pytest.mark.parametrize("spec, total, active", [("a0.3b-2b", 2.0e9, 0.3e9), ("a1b-7b", 7.0e9, 1.0e9)])
def test_reference_sizes_count_near_their_names(spec, total, active):
    path = SPECS / "models" / f"{spec}.lsm"
    if not path.exists():
        pytest.skip(f"{path} is not in the tree yet")
    program = compile_spec(path)
    with torch.device("meta"):
        model = program.model()
    # the paper's names count parameters without the embedding and LM head, and round
    assert abs(model.num_params(embeddings=False) / total - 1) < 0.15, model.num_params(embeddings=False)
    assert abs(model.num_params(active=True, embeddings=False) / active - 1) < 0.15, model.num_params(active=True, embeddings=False)
    assert model.num_params() - model.num_params(embeddings=False) == 2 * 50304 * model.config["hidden"]
