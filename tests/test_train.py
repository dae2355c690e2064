"""`lmoec train`: the loss falls, resume is bit-exact, and bad inputs fail cleanly without overwriting."""
from __future__ import annotations

import argparse
import json
import math
import os

import pytest
import torch

from lmoec.cli import train as train_cli
from lmoec.trainer import checkpoint as ckpt
from lmoec.trainer.data import DataError, load_tokens, sample_batch
from lmoec.trainer.train import RunError, TrainConfig, clipped_step, train
from test_model import tiny_program

QUIET = dict(progress=False, say=lambda message: None)


def run_cli(module, *argv) -> int:
    parser = argparse.ArgumentParser(prog="lmoec")
    module.add_parser(parser.add_subparsers(dest="command"))
    return module.run(parser.parse_args([module.__name__.rsplit(".", 1)[1], *argv]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small deterministic text file (the stdlib default is tested separately)."""
    import textwrap

    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(textwrap.dedent(open(textwrap.__file__).read()) * 2)
    return str(path)


@pytest.mark.parametrize("pattern", ["NN", "LL", "LN"])
def test_short_run_reduces_loss(pattern, corpus, tmp_path):
    torch.manual_seed(0)
    program = tiny_program(pattern)
    cfg = TrainConfig(steps=60, seq_len=32, batch=8, lr=1e-2, warmup=6, eval_every=30, save_every=60, data=corpus)
    result = train(program.files, program.ir.name, cfg, tmp_path, **QUIET)
    losses = result.losses()
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert first > math.log(256) - 0.3  # starts near uniform over bytes
    assert last < first - 1.5, (first, last)
    assert result.eval_losses()[-1] < first - 1.5
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 61))


@pytest.mark.parametrize("pattern", ["NN", "LN"])
def test_resume_is_bit_exact(pattern, corpus, tmp_path):
    program = tiny_program(pattern, moe=False)
    cfg = TrainConfig(steps=10, seq_len=16, batch=2, warmup=3, eval_every=5, save_every=4, data=corpus)
    whole = train(program.files, program.ir.name, cfg, tmp_path / "whole", **QUIET)
    train(program.files, program.ir.name, cfg, tmp_path / "split", stop_after=6, **QUIET)  # "interrupted" at 6
    saved = ckpt.load(tmp_path / "split")
    assert saved["step"] == 6 and saved["data"]["position"] == 6
    resumed = train({}, "ignored: the checkpoint's package is used", cfg, tmp_path / "split", resume=True, **QUIET)
    assert resumed.losses() == whole.losses()  # exact float equality, every step
    assert resumed.eval_losses() == whole.eval_losses()
    final_a, final_b = ckpt.load(tmp_path / "whole")["model"], ckpt.load(tmp_path / "split")["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_recompute_trains_exactly_as_storing(corpus, tmp_path):
    """`lmoec train --recompute` (activation checkpointing) takes the steps the stored-activation run takes, loss
    for loss, on the LN hybrid with MoE (its aux losses come from inside the recomputed blocks)."""
    program = tiny_program("LN")
    (tmp_path / "pkg").mkdir()
    for name, text in program.files.items():
        (tmp_path / "pkg" / name).write_text(text)
    common = ["--steps", "4", "--seq-len", "16", "--batch", "2", "--warmup", "2", "--eval-every", "4",
              "--save-every", "4", "--data", corpus, "--no-progress", "--device", "cpu"]
    assert run_cli(train_cli, str(tmp_path / "pkg"), *common, "--out", str(tmp_path / "stored")) == 0
    assert run_cli(train_cli, str(tmp_path / "pkg"), *common, "--recompute", "--out", str(tmp_path / "recomputed")) == 0

    def losses(run):
        return [r["loss"] for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines()) if "loss" in r]

    assert len(losses("stored")) == 4 and losses("recomputed") == losses("stored")
    assert ckpt.load(tmp_path / "recomputed")["train_config"]["recompute"] is True


def test_default_data_is_the_stdlib_sorted_and_split():
    data = load_tokens(None, seq_len=128)
    assert "stdlib" in data.source and len(data.train) > 1_000_000
    assert len(data.eval) >= 0.04 * (len(data.train) + len(data.eval))
    assert load_tokens(None, seq_len=128).digest == data.digest  # same files, same order
    x, y = sample_batch(data.train, 4, 64, seed=1, step=3)
    x2, _ = sample_batch(data.train, 4, 64, seed=1, step=3)
    assert torch.equal(x, x2) and torch.equal(x[:, 1:], y[:, :-1]) and x.max() < 256


def test_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # the gradients' norm is ~1: clipped, then not
def test_clipped_step_equals_clip_then_step(fused, max_norm):
    """clipped_step folds the clipping into a fused AdamW (its grad_scale): the same norm, parameters, moments and
    clipped gradients as clip_grad_norm_ followed by the step; the unfused path is clip_grad_norm_ itself."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(33, 17), (17,), (5, 4, 3)]
    params = [[torch.randn(s, generator=gen, dtype=torch.float32).requires_grad_() for s in shapes] for _ in range(2)]
    params[1] = [p.detach().clone().requires_grad_() for p in params[0]]
    grads = [torch.randn(s, generator=gen) / 8 for s in shapes]
    optimizers = []
    for group in params:
        for p, g in zip(group, grads):
            p.grad = g.clone()
        optimizers.append(torch.optim.AdamW(group, lr=0.1, weight_decay=0.1, fused=fused))
    want_norm = torch.nn.utils.clip_grad_norm_(params[0], max_norm)
    optimizers[0].step()
    got_norm = clipped_step(optimizers[1], max_norm)
    assert not hasattr(optimizers[1], "grad_scale")
    exact = not fused or max_norm > want_norm  # fused + clipping divides by the factor where clipping multiplies
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(got_norm, want_norm, rtol=0, atol=0)
    for want, got in zip(params[0], params[1]):
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(got.grad, want.grad, **tol)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optimizers[1].state[got][key], optimizers[0].state[want][key], **tol)


def test_unreadable_data_paths(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_tokens(tmp_path / "missing.txt", seq_len=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text files under"):
        load_tokens(tmp_path / "empty", seq_len=8)
    (tmp_path / "short.txt").write_text("x" * 10)
    with pytest.raises(DataError, match="too little text"):
        load_tokens(tmp_path / "short.txt", seq_len=8)
    locked = tmp_path / "locked.txt"
    locked.write_text("x" * 1000)

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(locked), "read_bytes", denied)  # root ignores chmod: simulate it
    with pytest.raises(DataError, match="cannot read .*locked.txt: Permission denied"):
        load_tokens(locked, seq_len=8)


def test_cli_errors_are_one_line_exit_2_and_overwrite_nothing(corpus, tmp_path, capsys):
    package = tiny_program("NN").write(tmp_path / "pkg")
    out = tmp_path / "run"
    small = ["--steps", "2", "--seq-len", "8", "--batch", "2", "--no-progress", "--out", str(out)]
    assert run_cli(train_cli, str(package), "--data", corpus, *small) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()

    cases = [
        ([str(package), "--data", corpus, *small], "--resume"),  # would overwrite the run
        ([str(package), "--data", corpus, *small, "--resume", "--seq-len", "16"], "resume keeps the run's settings"),
        ([str(package), "--data", str(tmp_path / "nope.txt"), *small[:-1], str(tmp_path / "fresh")], "does not exist"),
        ([str(tmp_path / "missing.lsm"), *small], "does not exist"),
        ([str(tmp_path), *small], "not a compiled model package"),
    ]
    bad_spec = tmp_path / "bad.lsm"
    bad_spec.write_text("model broken { vocab = }\n")
    cases.append(([str(bad_spec), *small], "bad.lsm"))
    for argv, expected in cases:
        assert run_cli(train_cli, *argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lmoec train: error: ") and expected in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert (out / "checkpoint.pt").read_bytes() == before

    (out / "checkpoint.pt").write_bytes(before[: len(before) // 2])  # a torn file
    assert run_cli(train_cli, str(package), "--data", corpus, *small, "--resume") == 2
    assert "corrupt or not a checkpoint" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before[: len(before) // 2]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save(path, {"step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(path, {"step": 2})
    monkeypatch.undo()
    assert ckpt.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left behind


def test_existing_run_is_not_overwritten(corpus, tmp_path):
    program = tiny_program("NN")
    cfg = TrainConfig(steps=2, seq_len=8, batch=2, data=corpus)
    train(program.files, program.ir.name, cfg, tmp_path, **QUIET)
    with pytest.raises(RunError, match="already holds a run"):
        train(program.files, program.ir.name, cfg, tmp_path, **QUIET)
