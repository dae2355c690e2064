"""Train every variant of a manifest briefly on one task and compare them: CSV, Markdown, PNG.

Tasks
    mqar    multi-query associative recall (lmoec.tasks.mqar); metric: recall accuracy
    corpus  the byte-level default corpus (or --data); metric: held-out loss

Every variant trains with the same seed, data stream and schedule, so the only
difference between rows is the spec.
"""
from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import compile_spec
from .trainer.train import TrainConfig, autocast_for, clipped_step, make_optimizer, pick_device, train
from .tasks.mqar import IGNORE, MQARConfig, mqar_batch, recall_accuracy
from .variants import load_manifest


@dataclass(frozen=True)
class SweepConfig:
    task: str = "mqar"
    steps: int = 300
    batch: int = 32
    lrs: tuple[float, ...] = (3e-3,)  # each variant trains at each; the table keeps its best (Zoology's protocol)
    seed: int = 0
    mqar: MQARConfig = MQARConfig()
    seq_len: int = 128  # corpus task
    data: Optional[str] = None  # corpus task: None is the default corpus
    eval_batches: int = 8
    device: str = "auto"
    model_overrides: Optional[dict] = None  # e.g. smaller sizes in tests


def _mqar_run(program, cfg: SweepConfig, lr: float) -> dict:
    """Train on fresh MQAR batches; report recall accuracy on fixed held-out batches."""
    torch.manual_seed(cfg.seed)
    dev = pick_device(cfg.device)
    model = program.model(**(cfg.model_overrides or {})).to(dev).train()
    if model.config["vocab"] < cfg.mqar.vocab:
        raise ValueError(f"{model.config['name']}: vocab {model.config['vocab']} < MQAR vocab {cfg.mqar.vocab}")
    sched = TrainConfig(steps=cfg.steps, lr=lr, warmup=max(1, cfg.steps // 10), seed=cfg.seed)
    optimizer = make_optimizer(model, sched)
    train_gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = sched.lr_at(step)
        inputs, targets = mqar_batch(cfg.mqar, cfg.batch, train_gen)
        with autocast_for(dev):
            logits = model(inputs.to(dev))
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(dev).flatten(), ignore_index=IGNORE)
        aux = getattr(model, "aux_loss", None)
        optimizer.zero_grad(set_to_none=True)
        (loss if aux is None else loss + aux.float()).backward()
        clipped_step(optimizer, 1.0)
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    model.eval()
    eval_gen = torch.Generator().manual_seed(cfg.seed + 10_007)
    accs = []
    with torch.no_grad():
        for _ in range(cfg.eval_batches):
            inputs, targets = mqar_batch(cfg.mqar, cfg.batch, eval_gen)
            with autocast_for(dev):
                logits = model(inputs.to(dev))
            accs.append(recall_accuracy(logits.float().cpu(), targets))
    return {
        "metric": "recall_accuracy",
        "value": sum(accs) / len(accs),
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": seconds,
        "curve": losses,
    }


def _corpus_run(program, cfg: SweepConfig, out: Path, lr: float) -> dict:
    tc = TrainConfig(steps=cfg.steps, seq_len=cfg.seq_len, batch=cfg.batch, lr=lr, seed=cfg.seed, data=cfg.data,
                     eval_every=cfg.steps, save_every=cfg.steps, warmup=max(1, cfg.steps // 10), eval_batches=cfg.eval_batches)
    t0 = time.perf_counter()
    result = train(program.files, program.ir.name, tc, out, model_config=_config(program, cfg), device=cfg.device,
                   progress=False, say=lambda _: None)
    return {
        "metric": "eval_loss",
        "value": result.eval_losses()[-1],
        "final_train_loss": sum(result.losses()[-10:]) / len(result.losses()[-10:]),
        "seconds": time.perf_counter() - t0,
        "curve": result.losses(),
    }


def _config(program, cfg: SweepConfig) -> Optional[dict]:
    if not cfg.model_overrides:
        return None
    return {**program.package.model.CONFIG, **cfg.model_overrides}


def run_sweep(manifest_path: Path, cfg: SweepConfig, out: Path, say: Callable[[str], None] = print, jobs: int = 1) -> list[dict]:
    """Train each variant at each learning rate; write results.csv, results.md, results.png and results.json into `out`.

    One row per variant: its best run over cfg.lrs (every run is kept under "runs" in results.json), since
    recurrences differ in the learning rate they need and a single one would rank them by that. jobs > 1
    trains that many runs at once in worker processes, each with an equal share of the CPU threads: small
    models use few threads well, so on a CPU this finishes a sweep sooner.
    """
    if cfg.task not in ("mqar", "corpus"):
        raise ValueError(f"unknown task {cfg.task!r} (mqar or corpus)")
    if jobs < 1 or not cfg.lrs or min(cfg.lrs) <= 0:
        raise ValueError(f"jobs and learning rates must be positive, got jobs={jobs}, lrs={list(cfg.lrs)}")
    folder, manifest = load_manifest(manifest_path)
    variants = manifest["variants"]
    if not variants:
        raise ValueError(f"{manifest_path}: the manifest lists no variants")
    out = Path(out)
    tasks = [(i, lr) for i in range(len(variants)) for lr in cfg.lrs]
    runs: dict[tuple[int, float], dict] = {}

    def report(task: tuple[int, float], run: dict) -> None:
        runs[task] = run
        say(f"[{len(runs)}/{len(tasks)}] {run['name']} ({run['family']}, {run['pattern']}), lr {run['lr']:g}: "
            f"{run['metric']} = {run['value']:.4f}  (train loss {run['final_train_loss']:.3f}, {run['seconds']:.0f} s)")

    if jobs == 1:
        for i, lr in tasks:
            report((i, lr), _run_variant(folder, variants[i], cfg, out, lr, threads=None))
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        work = [((i, lr), (folder, variants[i], cfg, out, lr, threads)) for i, lr in tasks]
        # leaving the block terminates the workers: on Ctrl-C or a failed run, the others stop at once
        with multiprocessing.get_context("spawn").Pool(jobs, initializer=_ignore_ctrl_c) as pool:
            for task, run in pool.imap_unordered(_run_task, work):
                report(task, run)
    rows = []
    for i in range(len(variants)):
        tries = [runs[i, lr] for lr in cfg.lrs]
        best = (max if tries[0]["metric"] == "recall_accuracy" else min)(tries, key=lambda r: r["value"])
        rows.append({**best, "runs": [{k: r[k] for k in ("lr", "value", "final_train_loss", "seconds")} for r in tries]})
    write_results(rows, cfg, out)
    return rows


def _ignore_ctrl_c() -> None:
    """In a worker: Ctrl-C reaches the whole process group; the parent alone handles it (and stops the workers),
    so that one line is printed rather than a traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_task(task: tuple[tuple[int, float], tuple]) -> tuple[tuple[int, float], dict]:
    key, args = task
    return key, _run_variant(*args)


def _run_variant(folder: Path, variant: dict, cfg: SweepConfig, out: Path, lr: float, threads: Optional[int]) -> dict:
    """One run: the variant's point in the grid and what training it at `lr` gave."""
    if threads is not None:
        torch.set_num_threads(threads)
    program = compile_spec(folder / variant["spec"])
    if cfg.task == "mqar":
        res = _mqar_run(program, cfg, lr)
    else:
        res = _corpus_run(program, cfg, out / "runs" / f"{variant['name']}__lr{lr:g}", lr)
    params = variant["params_total"] if not cfg.model_overrides else None
    return {"name": variant["name"], **{f"vary:{a}": x for a, x in variant["point"].items()}, "family": variant["family"],
            "pattern": variant["pattern"], "params_total": params, "lr": lr, **res}


def write_results(rows: list[dict], cfg: SweepConfig, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    columns = [c for c in rows[0] if c not in ("curve", "runs")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    metric = rows[0]["metric"]
    better = max if metric == "recall_accuracy" else min
    best = better(rows, key=lambda r: r["value"])
    setting = (f"task {cfg.task}" + (f" (seq_len {cfg.mqar.seq_len}, {cfg.mqar.num_pairs} pairs, vocab {cfg.mqar.vocab})" if cfg.task == "mqar" else "")
               + f", {cfg.steps} steps, batch {cfg.batch}, lr " + (f"{cfg.lrs[0]:g}" if len(cfg.lrs) == 1 else
               "best of " + "/".join(f"{lr:g}" for lr in cfg.lrs)) + f", seed {cfg.seed}")
    md = [f"# Sweep: {metric}", "", setting, "", "| variant | family | pattern | params | " + metric + " | lr | final train loss | seconds |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = f"{r['params_total'] / 1e6:.2f}M" if r["params_total"] else "-"
        mark = " **(best)**" if r is best else ""
        md.append(f"| {r['name']}{mark} | {r['family']} | {r['pattern']} | {params} | {r['value']:.4f} | {r['lr']:g} | {r['final_train_loss']:.3f} | {r['seconds']:.0f} |")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r["name"].split("__", 1)[-1] + (f" ({r['params_total'] / 1e6:.2f}M)" if r["params_total"] else "")
              for r in rows]  # the grid point and the parameter count
    left.barh(labels, [r["value"] for r in rows], color="tab:blue")
    left.set_xlabel(metric.replace("_", " "))
    left.invert_yaxis()
    for r, label in zip(rows, labels):
        right.plot(range(1, len(r["curve"]) + 1), r["curve"], label=label, lw=1)
    right.set_xlabel("step")
    right.set_ylabel("train loss")
    right.set_yscale("log")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.suptitle(setting, fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.png").write_bytes(png.getvalue())
    (out / "results.csv").write_text(buf.getvalue())
    (out / "results.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
