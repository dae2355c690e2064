"""`lmoec generate`: decoding equals the full forward, LSM state stays fixed-size, sampling, CLI errors."""
from __future__ import annotations

import pytest
import torch

from lmoec.cli import generate as generate_cli
from lmoec.trainer import checkpoint as ckpt
from lmoec.trainer.generate import cache_nbytes, generate_ids, load_model, sample_next
from lmoec.trainer.train import TrainConfig, train
from test_model import tiny_program
from test_train import QUIET, run_cli


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A hybrid MoE model (LN) trained a few steps: a real checkpoint to generate from."""
    out = tmp_path_factory.mktemp("run")
    program = tiny_program("LN", moe=True)
    data = out / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    cfg = TrainConfig(steps=10, seq_len=32, batch=4, lr=1e-2, warmup=3, eval_every=10, save_every=10, data=str(data))
    train(program.files, program.ir.name, cfg, out, **QUIET)
    return out


@pytest.mark.parametrize("pattern", ["LLL", "LNL"])
def test_greedy_decoding_matches_full_forward_argmax(pattern):
    """Tokens from prefill + recurrent steps are the argmax of the full forward on the generated sequence (fp64)."""
    torch.manual_seed(1)
    model = tiny_program(pattern, moe=True).model().double().eval()
    prompt = torch.randint(0, 256, (2, 7))
    new = torch.stack(list(generate_ids(model, prompt, max_new_tokens=6, temperature=0)), dim=1)
    sequence = torch.cat([prompt, new], dim=1)
    with torch.no_grad():
        full = model(sequence)
    assert torch.equal(full[:, prompt.shape[1] - 1 : -1].argmax(-1), new)


def test_lsm_state_does_not_grow_with_length():
    model = tiny_program("LL").model().double().eval()
    with torch.no_grad():
        _, cache = model(torch.randint(0, 256, (1, 5)), use_cache=True)
        sizes = [cache_nbytes(cache)]
        for _ in range(20):
            _, cache = model(torch.randint(0, 256, (1, 1)), cache=cache, use_cache=True)
            sizes.append(cache_nbytes(cache))
    assert sizes[0] > 0 and len(set(sizes)) == 1


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.5, -1.0], [1.0, 0.0, 0.0, 5.0]])
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=0).tolist() == [1, 3]
    for _ in range(20):
        assert sample_next(logits, 1.0, top_k=1, generator=gen).tolist() == [1, 3]
        assert sample_next(logits, 1.0, top_p=0.01, generator=gen).tolist() == [1, 3]
        assert set(sample_next(logits, 5.0, top_k=2, generator=gen).tolist()) <= {1, 2, 3, 0}
        first = sample_next(logits[:1], 5.0, top_k=2, generator=gen).item()
        assert first in (1, 2)


def test_generate_cli_from_checkpoint(trained_run, capsys):
    assert run_cli(generate_cli, str(trained_run), "--prompt", "the quick", "--max-new-tokens", "12", "--temperature", "0") == 0
    text = capsys.readouterr().out
    assert text.startswith("the quick") and len(text.encode()) >= len("the quick") + 1
    model, state = load_model(trained_run)
    assert state["step"] == 10 and not model.training


def test_generate_cli_prompt_that_is_not_utf8(trained_run, capsysbinary):
    """A shell argument need not be UTF-8 (Python holds such bytes as surrogate escapes): the byte-level model reads
    the prompt's own bytes, echoed as they came, with --compile too (it acts on CUDA only)."""
    prompt = b"\xff\xfe deep (((("
    assert run_cli(generate_cli, str(trained_run), "--prompt", prompt.decode("utf-8", "surrogateescape"),
                   "--max-new-tokens", "4", "--temperature", "0", "--compile") == 0
    out = capsysbinary.readouterr()
    assert out.err == b"" and out.out.startswith(prompt) and len(out.out) > len(prompt)


def test_generate_cli_errors(trained_run, tmp_path, capsys):
    torn = tmp_path / "torn.pt"
    torn.write_bytes((trained_run / ckpt.FILENAME).read_bytes()[:1000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    cases = [(tmp_path / "missing.pt", "not found"), (tmp_path, "holds no checkpoint.pt"),
             (torn, "corrupt or not a checkpoint"), (foreign, "not an lmoec checkpoint")]
    for path, expected in cases:
        assert run_cli(generate_cli, str(path), "--prompt", "x") == 2
        err = capsys.readouterr().err
        assert err.startswith("lmoec generate: error: ") and expected in err and len(err.strip().splitlines()) == 1, err
