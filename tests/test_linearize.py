"""`lmoec linearize` (Liger): tiny random Llama / Mistral / Qwen2 / Qwen3 checkpoints built from configs (nothing downloaded).

All weight on a window >= T reproduces the source model; all weight on the LSM is the float64 oracle recurrence
on the source's own projections; GQA shapes; Liger Attention decodes (window KV cache + LSM state) as the full
forward computes, and left-padded batches equal unpadded runs; bad input is one error line."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from lmoec.backends.reference import recurrent_reference  # noqa: E402
from lmoec.cli import linearize as linearize_cli  # noqa: E402
from lmoec.ir.nodes import Recurrence  # noqa: E402
from lmoec.linearize import linearize  # noqa: E402
from test_train import run_cli  # noqa: E402

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def source_model(arch: str, folder):
    """A tiny random checkpoint of `arch` saved to `folder`; every weight (biases too) off its init."""
    config_class, model_class = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                                 "mistral": ("MistralConfig", "MistralForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[arch]
    torch.manual_seed(0)
    sizes = {**SIZES, "head_dim": 16} if arch == "qwen3" else SIZES  # Qwen3: head_dim * heads != hidden, q/k norms
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**sizes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
def test_all_weight_on_a_full_window_reproduces_the_source(arch, tmp_path):
    source = source_model(arch, tmp_path / "src")
    out = linearize(tmp_path / "src", tmp_path / "lin", attention={"window": 64, "mix": 1.0})
    model = load(out)
    layer = model.model.blocks[0].mixer
    D = 16 if arch == "qwen3" else 8
    assert layer.k_proj.weight.shape == (2 * D, 32) and layer.q_proj.weight.shape == (4 * D, 32)  # GQA: 2 kv heads
    ids = torch.randint(0, 64, (2, 23))
    with torch.no_grad():
        expected = source(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
        _, cache = model.model(ids[:, :5], use_cache=True)
    assert cache[0]["state"].shape == (2, 4, D, D)  # the LSM state is per q head
    assert cache[0]["window"].k.shape[1] == 2  # the window KV cache per kv head


def test_all_weight_on_the_lsm_is_the_oracle_recurrence(tmp_path):
    """Without --attention, layer 0 is GLA on the source's own projections: q, k softmax over the head dim, k and v
    repeated to the q heads, log gate logsigmoid(k_proj x + bias) / 16, scale 1 (the float64 reference recurrence)."""
    source = source_model("qwen2", tmp_path / "src")
    model = load(linearize(tmp_path / "src", tmp_path / "lin")).double()
    attn = source.model.layers[0].self_attn.double()
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    B, T, H, D = 2, 21, 4, 8
    q = attn.q_proj(x).view(B, T, H, D)
    k_raw = attn.k_proj(x).view(B, T, 2, D).repeat_interleave(2, dim=2)
    v = attn.v_proj(x).view(B, T, 2, D).repeat_interleave(2, dim=2)
    o = recurrent_reference(Recurrence(decay="vector", delta=False, dplr=False, bonus=False), q.softmax(-1), k_raw.softmax(-1),
                            v, g=torch.nn.functional.logsigmoid(k_raw) / 16, scale=1.0)[0]
    expected = attn.o_proj(o.reshape(B, T, H * D))
    with torch.no_grad():
        got = model.model.blocks[0].mixer(x, backend="torch")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_hgrn2_style_is_the_oracle_recurrence(tmp_path):
    """--lsm hgrn2 on a GQA Llama: the forget gate f = the key projection (repeated to the q heads, as v), log gate
    logsigmoid(f), the key tied to it (k = 1 - sigmoid(f)), q softmax over the head dim, scale 1."""
    source = source_model("llama", tmp_path / "src")
    out = linearize(tmp_path / "src", tmp_path / "lin", lsm="hgrn2")
    assert "tie k = 1 - exp(g)" in (out / "model.lsm").read_text()
    model = load(out).double()
    attn = source.model.layers[0].self_attn.double()
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    B, T, H, D = 2, 21, 4, 8
    q = attn.q_proj(x).view(B, T, H, D)
    f = attn.k_proj(x).view(B, T, 2, D).repeat_interleave(2, dim=2)
    v = attn.v_proj(x).view(B, T, 2, D).repeat_interleave(2, dim=2)
    o = recurrent_reference(Recurrence(decay="vector", delta=False, dplr=False, bonus=False), q.softmax(-1),
                            1 - torch.sigmoid(f), v, g=torch.nn.functional.logsigmoid(f), scale=1.0)[0]
    with torch.no_grad():
        got = model.model.blocks[0].mixer(x, backend="torch")
    torch.testing.assert_close(got, attn.o_proj(o.reshape(B, T, H * D)), rtol=1e-10, atol=1e-10)
    source_model("qwen2", tmp_path / "qwen2")
    with pytest.raises(ValueError, match="hgrn2 maps llama and mistral"):
        linearize(tmp_path / "qwen2", tmp_path / "lin2", lsm="hgrn2")
    with pytest.raises(ValueError, match="goes without --attention"):
        linearize(tmp_path / "src", tmp_path / "lin3", lsm="hgrn2", attention={"window": 8, "mix": 0.5})
    assert not (tmp_path / "lin2").exists() and not (tmp_path / "lin3").exists()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_liger_attention_decodes_and_pads_like_the_full_forward(arch, tmp_path):
    """Window 4 < the sequence, mix 0.5: prefill + one-token steps (window KV cache + LSM state) give the full
    forward's logits, greedy generate() equals the argmax of the full forward, and a left-padded batch (Qwen2's
    biases, Qwen3's q/k norms) gives each row's unpadded logits."""
    source_model(arch, tmp_path / "src")
    model = load(linearize(tmp_path / "src", tmp_path / "lin", attention={"window": 4, "mix": 0.5}))
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        logits, cache = model.model(ids[:, :6], use_cache=True)
        steps = [logits]
        for t in range(6, 13):
            logits, cache = model.model(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
        new = model.generate(ids[:, :6], max_new_tokens=5, do_sample=False)
        assert torch.equal(model(new).logits[:, 5:-1].argmax(-1), new[:, 6:])
        prompts = [torch.randint(1, 64, (n,)) for n in (9, 3)]
        batch = torch.zeros(2, 9, dtype=torch.long)
        mask = torch.zeros(2, 9, dtype=torch.long)
        for i, p in enumerate(prompts):
            batch[i, 9 - len(p):], mask[i, 9 - len(p):] = p, 1
        padded = model(batch, attention_mask=mask).logits
        for i, p in enumerate(prompts):
            torch.testing.assert_close(padded[i, 9 - len(p):], model(p[None]).logits[0], rtol=1e-5, atol=1e-5)
        out = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
        for i, p in enumerate(prompts):
            assert torch.equal(out[i, 9:], model.generate(p[None], max_new_tokens=4, do_sample=False)[0, len(p):])


def test_linearize_cli_errors(tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"  # an architecture linearize does not map
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(gpt2)
    assert run_cli(linearize_cli, str(gpt2), "-o", str(tmp_path / "a")) == 2
    assert "model_type 'gpt2' is not supported" in capsys.readouterr().err
    assert run_cli(linearize_cli, str(tmp_path / "nowhere"), "-o", str(tmp_path / "b")) == 2
    assert "no config.json" in capsys.readouterr().err
    assert run_cli(linearize_cli, str(gpt2), "--attention", "size=3", "-o", str(tmp_path / "c")) == 2
    assert "--attention takes window=N and mix=W" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")


def test_finetune_lora_adapter_and_merge(tmp_path, capsys):
    """LoRA on a linearized byte-vocabulary Llama (Liger Attention, window 8 < seq_len): the held-out loss falls, the
    adapter folder loads with peft over the base, and --merge writes a folder whose logits equal base + its adapter (kept in adapter/)."""
    from peft import PeftModel

    from lmoec.cli import finetune as finetune_cli

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**SIZES, "vocab_size": 256})
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    linearize(tmp_path / "src", tmp_path / "lin", attention={"window": 8, "mix": 0.5})
    data = tmp_path / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    common = ["--data", str(data), "--steps", "4", "--seq-len", "32", "--batch", "2", "--lr", "1e-2", "--lora", "r=4"]
    assert run_cli(finetune_cli, str(tmp_path / "lin"), *common, "--merge", "-o", str(tmp_path / "merged")) == 0
    result = json.loads((tmp_path / "merged" / "finetune.json").read_text())
    assert result["held_out_after"] < result["held_out_before"]
    assert (tmp_path / "merged" / "adapter" / "adapter_model.safetensors").exists() and (tmp_path / "merged" / "model.lsm").exists()
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        base = load(tmp_path / "lin")
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "merged" / "adapter").eval()(ids).logits
        merged = load(tmp_path / "merged")(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert (merged - before).abs().max() > 1e-3  # the adapters changed the model
    capsys.readouterr()
    assert run_cli(finetune_cli, str(tmp_path / "lin"), "--lora", "targets=nope", "-o", str(tmp_path / "x")) == 2
    assert "no linear map named 'nope'" in capsys.readouterr().err
    assert run_cli(finetune_cli, str(tmp_path / "lin"), "--lora", "rank=4", "-o", str(tmp_path / "y")) == 2
    assert "--lora takes r=N" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # an HGRN2-style model has no k projection: the default targets are the q, v and o projections it has
    linearize(tmp_path / "src", tmp_path / "hgrn2", lsm="hgrn2")
    assert run_cli(finetune_cli, str(tmp_path / "hgrn2"), *common, "-o", str(tmp_path / "hgrn2-ft")) == 0
    assert json.loads((tmp_path / "hgrn2-ft" / "finetune.json").read_text())["targets"] == ["q_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize("base", ["gated_deltanet", "gla"])
def test_kv_heads_equals_the_per_head_layer_with_shared_weights(base, tmp_path):
    """kv_heads is a general lsm feature: a GQA layer (here with short convolutions, the delta rule and output gates)
    computes what the per-head layer computes when its k and v weights (and conv filters) repeat each kv head's."""
    from lmoec import compile_spec
    from lmoec.paths import ROOT

    spec = tmp_path / "gqa.lsm"
    spec.write_text(f'import "{(ROOT / "specs" / "lsm" / f"{base}.lsm").as_posix()}"\n'
                    f"lsm gqa extends {base} {{ kv_heads = 2 }}\nlsm mha extends {base} {{ }}\n")
    program = compile_spec(spec)
    torch.manual_seed(0)
    gqa, mha = program.layer("gqa", hidden=32, heads=4).double(), program.layer("mha", hidden=32, heads=4).double()
    with torch.no_grad():
        for p in gqa.parameters():
            p.add_(0.1 * torch.randn_like(p))
        shared = gqa.state_dict()
        for name, t in gqa.state_dict().items():
            side = name.split("_")[0]
            if side in ("k", "v") and name.endswith(("proj.weight", "conv.conv.weight")):
                shared[name] = t.unflatten(0, (2, -1)).repeat_interleave(2, 0).flatten(0, 1)  # kv head j -> q heads 2j, 2j+1
        mha.load_state_dict(shared)
        x = torch.randn(2, 19, 32, dtype=torch.float64)
        torch.testing.assert_close(gqa(x, backend="torch"), mha(x, backend="torch"), rtol=1e-10, atol=1e-10)
        y, cache = gqa(x[:, :11], use_cache=True, backend="torch")
        step, _ = gqa(x[:, 11:12], past=cache, use_cache=True)
        torch.testing.assert_close(step[:, 0], gqa(x[:, :12], backend="torch")[:, 11], rtol=1e-10, atol=1e-10)
    assert gqa.k_proj.weight.shape[0] == mha.k_proj.weight.shape[0] // 2
