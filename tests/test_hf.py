"""Hugging Face integration: save/load round trips (lmoec re-emitting the package, and trust_remote_code in a
process that never imports lmoec itself), generate() against lmoec's own decoding, left padding, `lmoec export`
with the byte tokenizer, lm-eval's loglikelihood."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from lmoec.cli import export as export_cli  # noqa: E402
from lmoec.trainer import checkpoint as ckpt  # noqa: E402
from lmoec.trainer.generate import generate_ids  # noqa: E402
from test_model import tiny_program  # noqa: E402
from test_train import run_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def random_model(pattern: str, **kw):
    """A tiny model with weights wide enough (std 0.3) that greedy decoding does not repeat one token."""
    torch.manual_seed(0)
    program = tiny_program(pattern, **kw)
    model = program.model().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else None
    return program, model


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), 7, dtype=torch.long)  # a real byte as padding: it must not matter
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    return ids, mask


@pytest.mark.parametrize("pattern, window", [("LN", 3), ("LL", None)])
def test_generate_equals_lmoec_decoding_and_left_padding(pattern, window):
    """Greedy generate() = lmoec's generate_ids token for token; a left-padded batch gives each row's unpadded
    logits and tokens (a window of 3 < the prompts: the ring cache's padding mask is exercised)."""
    program, model = random_model(pattern, window=window)
    hf = program.hf_model(model)
    prompts = [torch.randint(1, 256, (n,)) for n in (9, 4, 6)]
    ids, mask = left_padded(prompts)
    batch = hf.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False)
    with torch.no_grad():
        padded_logits = hf(ids, attention_mask=mask).logits
    for i, p in enumerate(prompts):
        mine = torch.stack(list(generate_ids(model, p[None], 7, temperature=0)), dim=1)[0]
        single = hf.generate(p[None], max_new_tokens=7, do_sample=False)[0, len(p):]
        assert torch.equal(single, mine)
        assert torch.equal(batch[i, ids.shape[1]:], mine)
        with torch.no_grad():
            alone = model(p[None])[0]
        torch.testing.assert_close(padded_logits[i, ids.shape[1] - len(p):], alone, rtol=1e-5, atol=1e-5)
    assert len(set(mine.tolist())) > 1  # a real sequence, not one token repeated
    sampled = []
    for _ in range(2):  # sampling through the same cache path: reproducible under a seed, batch > 1
        torch.manual_seed(3)
        sampled.append(hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=20)[:, ids.shape[1]:])
    assert torch.equal(sampled[0], sampled[1]) and sampled[0].shape == (3, 5) and not torch.equal(sampled[0], batch[:, -7:-2])


def test_save_load_round_trip_with_and_without_lmoec(tmp_path):
    """save_pretrained writes safetensors and the package; from_pretrained gives the same logits with lmoec
    imported (the package emitted again from config.json's IR) and, in a fresh process that never imports lmoec
    itself, through trust_remote_code (the folder's own copy of the package)."""
    program, model = random_model("LN", moe=True, tie=True)
    hf = program.hf_model(model)
    out = tmp_path / "hf"
    hf.save_pretrained(out)
    assert (out / "model.safetensors").exists() and (out / "hf.py").exists() and (out / "model.py").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lmoec" and config["auto_map"]["AutoModelForCausalLM"] == "hf.ForCausalLM"
    assert config["lmoec_ir"]["model"]["name"] == program.ir.model.name
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        expected = model(ids)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert type(loaded).__module__.startswith("lmoec_generated_")  # lmoec's emitted package, not the folder's
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
        assert loaded.model.head.weight.data_ptr() == loaded.model.embed.weight.data_ptr()  # still tied
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "assert 'lmoec' not in sys.modules or type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        "torch.save((type(m).__module__, m(torch.load(sys.argv[2])).logits.detach()), sys.argv[3])\n"
    )
    # the child's CPU kernels split their sums as ours do (bit-equal logits) only at our thread count
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    module, logits = torch.load(tmp_path / "out.pt")
    assert module.startswith("transformers_modules")
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_export_cli_tokenizer_and_lm_eval(tmp_path, capsys):
    """`lmoec export` turns a checkpoint into an HF folder with the byte tokenizer; lm-eval's HF model class scores
    local strings through it (loglikelihood = the model's own sum of log-probabilities); a used -o is refused."""
    program, model = random_model("LN")
    run = tmp_path / "run"
    ckpt.save(ckpt.resolve(run), {"package": {"name": program.ir.name, "files": program.files},
                                  "model_config": model.config, "model": model.state_dict()})
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    assert run_cli(export_cli, str(run), "-o", str(used)) == 2
    assert "not an empty folder" in capsys.readouterr().err and sorted(os.listdir(used)) == ["notes.txt"]
    out = tmp_path / "hf"
    assert run_cli(export_cli, str(run), "-o", str(out)) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf-")]  # no temp folder left behind

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "déf f(x):\n\treturn x  # ünïcode"
    assert tokenizer(text)["input_ids"] == list(text.encode()) and tokenizer.decode(list(text.encode())) == text
    assert tokenizer.eos_token_id == 0 and tokenizer.padding_side == "left"

    lm_eval = pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval is not installed (the [eval] extra)")
    from lm_eval.api.instance import Instance

    lm = lm_eval.HFLM(pretrained=str(out), batch_size=2, device="cpu")
    pairs = [("def f(x):", " return x"), ("The cat", " sat on"), ("import", " os")]
    scores = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    with torch.no_grad():
        for (context, continuation), (score, _) in zip(pairs, scores):
            ids = torch.tensor([list((context + continuation).encode())])
            logp = model(ids).double().log_softmax(-1)[0]
            n = len(context.encode())
            expected = sum(float(logp[t - 1, ids[0, t]]) for t in range(n, ids.shape[1]))
            assert score == pytest.approx(expected, rel=1e-5, abs=1e-4)
