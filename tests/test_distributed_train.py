"""Distributed training (gloo, 2, 4 and 8 CPU processes) equals one process on the same global batch.

One spawned run per world size checks every case (spawn is slow); each rank writes its failures to
a JSON file and the tests below read them, one test per case. Gradient cases are float64: every
rank builds the model from one seed, computes the single-process loss, gradients and clipped
gradients on the whole global batch as the oracle, then the same step under the layout
(lmoec.trainer.distributed.forward_backward, then clipping by global_grad_norm). The total loss (cross-entropy plus the
MoE balancing losses, made global by `parallelize`) and every gradient must match: replicated ones
whole, expert shards against their slice. The resume case trains in float32 through
`train_distributed`, interrupted and resumed from its distributed checkpoint, against an
uninterrupted run (bit-exact) and against the single-process trainer.
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmoec
from lmoec.ir.nodes import ParallelSpec
from lmoec.paths import SPECS
from lmoec.trainer import checkpoint as ckpt
from lmoec.trainer.distributed import build_layout, forward_backward, global_grad_norm, parallelize, train_distributed
from lmoec.trainer.train import TrainConfig, train
from ranks import recording_rank, run_ranks

# pure: Gated DeltaNet (delta + scalar decay, width-4 short convolutions) in both layers;
# hybrid: GLA (vector decay) then grouped-query softmax attention. Both MoE with a shared expert.
SPECS_TEXT = {
    "pure": ("gated_deltanet", "LL"),
    "hybrid": ("gla", "LN"),
}
SPEC_TEMPLATE = """
import "{lsm_path}"
model dist_{name} {{
    vocab = 256
    hidden = 16
    layers = 2
    heads = 2
    pattern = "{pattern}"
    lsm = {lsm}
    attention {{ kv_heads = 1 }}
    moe {{ experts = 8 top_k = 2 expert_ffn = 8 shared_experts = 1 }}
    max_seq_len = 64
}}
"""
BATCH, SEQ, MAX_NORM = 8, 32, 0.5  # BATCH: one sample a rank under ep8 (ep ranks hold different samples); SEQ: 4 tokens
# a rank under sp8 (the short conv reaches 3 back); MAX_NORM below the gradient norm: clipping is exercised
LAYOUTS = {
    2: {"sp2": ParallelSpec(sp=2), "ep2": ParallelSpec(ep=2), "dp2": ParallelSpec(dp=2)},
    4: {"dp2_sp2": ParallelSpec(dp=2, sp=2), "sp2_ep2": ParallelSpec(sp=2, ep=2), "dp2_ep2": ParallelSpec(dp=2, ep=2)},
    # one expert a rank under ep8; all three dimensions at once under dp2_sp2_ep2
    8: {"sp8": ParallelSpec(sp=8), "ep8": ParallelSpec(ep=8), "sp4_ep2": ParallelSpec(sp=4, ep=2),
        "dp2_sp2_ep2": ParallelSpec(dp=2, sp=2, ep=2)},
}
GRAD_CASES = [(world, layout, model) for world in LAYOUTS for layout in LAYOUTS[world] for model in SPECS_TEXT]
RESUME = dict(steps=4, seq_len=8, batch=4, warmup=2, eval_every=2, eval_batches=1, save_every=2)


def write_specs(directory: Path) -> dict[str, Path]:
    paths = {}
    for name, (lsm, pattern) in SPECS_TEXT.items():
        paths[name] = directory / f"dist_{name}.lsm"
        lsm_path = SPECS / "lsm" / f"{lsm}.lsm"
        paths[name].write_text(SPEC_TEMPLATE.format(lsm_path=lsm_path, name=name, pattern=pattern, lsm=lsm))
    return paths


def _close(errors: list[str], what: str, got, want) -> None:
    try:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    except AssertionError as e:
        errors.append(f"{what}: {str(e).splitlines()[:4]}")


def single_process_step(program, seed: int, inputs, targets):
    """The oracle: ce, total loss, total grad norm and clipped gradients of the whole batch on one process."""
    torch.manual_seed(seed)
    model = program.model().double()
    logits = model(inputs)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss = ce + model.aux_loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return ce.detach(), loss.detach(), norm, grads


def check_gradients(program, spec: ParallelSpec, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 256, (BATCH, SEQ), generator=gen)
    targets = torch.randint(0, 256, (BATCH, SEQ), generator=gen)
    want_ce, want_loss, want_norm, want = single_process_step(program, seed, inputs, targets)

    torch.manual_seed(seed)
    model = program.model().double()
    layout = build_layout(spec, SEQ, BATCH, experts=8, device_type="cpu")
    expert_params = parallelize(model, layout)
    ce, loss = forward_backward(model, inputs, targets, layout, expert_params, torch.device("cpu"))
    norm = global_grad_norm(model, layout, expert_params)
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), MAX_NORM, norm)
    errors: list[str] = []
    if layout.degrees["ep"] > 1 and len(expert_params) != 3 * 2:
        errors.append(f"expert shards {sorted(expert_params)}")
    _close(errors, "cross-entropy", ce, want_ce)
    _close(errors, "total loss (with aux)", loss, want_loss)
    _close(errors, "grad norm", norm, want_norm)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    if sorted(got) != sorted(want):
        errors.append(f"parameters differ: {sorted(set(got) ^ set(want))}")
    for name in sorted(set(got) & set(want)):
        w = want[name].chunk(layout.degrees["ep"])[layout.ep_rank] if name in expert_params else want[name]
        _close(errors, f"d {name}", got[name], w)
    return errors


def check_impossible_layouts() -> list[str]:
    errors = []
    for spec, seq, message in [(ParallelSpec(sp=2), 7, "does not divide the sequence length 7"),
                               (ParallelSpec(sp=3), 8, "does not divide the world size")]:
        try:
            build_layout(spec, seq, BATCH, experts=8, device_type="cpu")
            errors.append(f"{spec}: no error")
        except ValueError as e:
            if message not in str(e):
                errors.append(f"{spec}: {e}")
    return errors


def run_training(program_path: Path, out: Path, data: str, **kwargs):
    program = lmoec.compile_spec(program_path)
    cfg = TrainConfig(**RESUME, data=data)
    quiet = dict(progress=False, say=lambda message: None)
    return train_distributed(program.files, program.ir.name, cfg, out, ParallelSpec(sp=2, ep=2), **quiet, **kwargs)


def check_resume(program_path: Path, root: Path, data: str) -> list[str]:
    """sp=2 x ep=2: interrupted at step 2, resumed from the distributed checkpoint -> the uninterrupted run."""
    whole = run_training(program_path, root / "whole", data)
    run_training(program_path, root / "split", data, stop_after=2)
    resumed = run_training(program_path, root / "split", data, resume=True)
    errors = []
    strip = lambda records: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]
    if strip(whole.records) != strip(resumed.records):
        errors.append(f"logs differ:\n{strip(whole.records)}\n{strip(resumed.records)}")
    a, b = ckpt.load(root / "whole"), ckpt.load(root / "split")
    for key in a["model"]:
        if not torch.equal(a["model"][key], b["model"][key]):
            errors.append(f"final weights differ: {key}")
    return errors


def _worker(rank: int, world: int, port: int, root: str, data: str) -> None:
    with recording_rank(rank, world, port, root) as record:
        paths = {name: Path(root, f"dist_{name}.lsm") for name in SPECS_TEXT}
        programs = {name: lmoec.compile_spec(path) for name, path in paths.items()}
        for layout, spec in LAYOUTS[world].items():
            for model in SPECS_TEXT:
                record(f"{layout}-{model}", check_gradients, programs[model], spec, 3)
        if world == 2:
            record("impossible_layouts", check_impossible_layouts)
        if world == 4:
            record("resume", check_resume, paths["hybrid"], Path(root), data)


_RESULTS: dict[int, tuple[Path, dict[str, list[str]]]] = {}


def corpus(directory: Path) -> str:
    path = directory / "text.txt"
    if not path.exists():
        path.write_text(textwrap.dedent(open(textwrap.__file__).read()))
    return str(path)


def results_for(world: int, tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """Run every case of `world` once in spawned processes: (run dir, {case: failures of all ranks})."""
    if world not in _RESULTS:
        root = tmp_path_factory.mktemp(f"dist_train_world{world}")
        for path in write_specs(root).values():
            lmoec.compile_spec(path).package  # emit once here, so the workers only import the cached packages
        _RESULTS[world] = (root, run_ranks(_worker, world, root, corpus(root)))
    return _RESULTS[world]


@pytest.mark.parametrize("world,layout,model", GRAD_CASES)
def test_loss_and_gradients_match_single_process(world, layout, model, tmp_path_factory):
    _, res = results_for(world, tmp_path_factory)
    case = f"{layout}-{model}"
    assert case in res, f"case {case} did not run"
    assert res[case] == [], "\n".join(res[case])


def test_impossible_layouts_fail_clearly(tmp_path_factory):
    _, res = results_for(2, tmp_path_factory)
    assert res["impossible_layouts"] == [], "\n".join(res["impossible_layouts"])


def test_distributed_resume_matches_uninterrupted_and_single_process(tmp_path_factory, tmp_path):
    root, res = results_for(4, tmp_path_factory)
    assert res["resume"] == [], "\n".join(res["resume"])
    # the distributed checkpoint is the single-process format, and the run tracks the single-process trainer
    program = lmoec.compile_spec(root / "dist_hybrid.lsm")
    cfg = TrainConfig(**RESUME, data=corpus(root))
    single = train(program.files, program.ir.name, cfg, tmp_path, progress=False, say=lambda m: None)
    distributed = [json.loads(line) for line in (root / "whole" / "log.jsonl").read_text().splitlines()]
    saved = ckpt.load(root / "whole")
    assert saved["parallel"] == {"dp": 1, "sp": 2, "ep": 2} and saved["train_config"] == asdict(cfg)
    for key in ("loss", "eval_loss", "grad_norm", "aux_loss"):
        got = [r[key] for r in distributed if key in r]
        want = [r[key] for r in single.records if key in r]
        assert len(got) == len(want) > 0, key
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)  # float32, 4 ranks
    single_state = ckpt.load(tmp_path)["model"]
    assert saved["model"].keys() == single_state.keys()
    for key, value in saved["model"].items():
        assert value.shape == single_state[key].shape, key  # expert shards gathered into full tensors


def test_parallel_flags_without_torchrun_fail_clearly(tmp_path, capsys, monkeypatch):
    from lmoec.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = write_specs(tmp_path)["hybrid"]
    assert main(["train", str(path), "--sp", "2", "--out", str(tmp_path / "run")]) == 2
    assert "torchrun --nproc-per-node" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["compile", "recompute"])
def test_single_process_flags_are_refused_before_any_process_group(flag, tmp_path):
    """--compile and --recompute are single-process: the distributed trainer says so before it starts anything."""
    from lmoec.trainer.distributed import train_distributed
    from lmoec.trainer.train import RunError

    program = lmoec.compile_spec(write_specs(tmp_path)["hybrid"])
    with pytest.raises(RunError, match=f"--{flag}: single-process training only"):
        train_distributed(program.files, program.ir.name, TrainConfig(**{flag: True}), tmp_path / "run", None)
    assert not (tmp_path / "run").exists()
