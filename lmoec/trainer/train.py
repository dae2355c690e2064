"""Single-process training of an emitted model: AdamW, warmup + cosine, clipping, checkpoints, exact resume.

Resume is exact because everything a step depends on is restored or is a pure
function of the step: model and optimizer state come from the checkpoint, the
learning rate is computed from the step, batches are drawn from (seed, step),
and the RNG states are restored. Distributed training wraps the same model
from outside (the model never knows about ranks).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..runtime.loader import load_package
from ..runtime.recompute import linear_cross_entropy
from . import checkpoint as ckpt
from .data import BYTE_VOCAB, DataError, TokenData, load_tokens, sample_batch
from .train_config import TrainConfig


@dataclass
class TrainResult:
    records: list[dict] = field(default_factory=list)  # the JSONL log, as dicts
    checkpoint: Optional[Path] = None
    plot: Optional[Path] = None

    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records if "loss" in r]

    def eval_losses(self) -> list[float]:
        return [r["eval_loss"] for r in self.records if "eval_loss" in r]


RESUME_CAN_CHANGE = {"steps", "eval_every", "save_every", "compile", "recompute"}
COMPILE_BACKEND = "inductor"  # tests use "aot_eager": the same graphs, forward and backward, without code generation


def saved_config(state: dict) -> TrainConfig:
    """The TrainConfig a checkpoint was written with."""
    stored = state["train_config"]
    return TrainConfig(**{**stored, "betas": tuple(stored["betas"])})


class RunError(Exception):
    """The run can't start as asked (an existing run in the way, a mismatched resume); one clear line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run after a whole step, saved in the checkpoint: `--resume` continues exactly there."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"interrupted after step {step}")
        self.step, self.checkpoint = step, checkpoint


class _StopRequest:
    """While active (main thread only), the first Ctrl-C asks the loop to stop after the current step, so the
    checkpoint is saved at a step boundary; a second one interrupts at once (the last checkpoint stays intact,
    since checkpoints are written atomically)."""

    def __init__(self, active: bool):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.requested = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_StopRequest":
        if self.active:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self._previous)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device):
    """bf16 autocast on GPU; full precision on CPU (bf16 matmuls are slow there and hurt exactness)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, total loss with the MoE aux losses the model collected).

    An emitted model hands over its last hidden states, and the LM head and the loss run a chunk of tokens
    at a time (linear_cross_entropy): [tokens, vocab] float32 logits and their gradient are never whole.
    """
    if hasattr(model, "hidden_states"):
        hidden, _ = model.hidden_states(inputs)
        ce = linear_cross_entropy(hidden.flatten(0, 1), model.head.weight, targets.flatten())
    else:
        logits = model(inputs)
        ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1), targets.flatten())
    aux = getattr(model, "aux_loss", None)
    return ce, ce if aux is None else ce + aux.to(ce.dtype)


def loss_function(model, compile: bool = False, recompute: bool = False
                  ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """lm_loss of `model` as a function of (inputs, targets). With compile, each block of the model goes
    through torch.compile (regional compilation: the blocks of one kind share one compiled graph, so a deep
    stack compiles in the time of one block): norms, gates, projections, routing and the SwiGLU experts fuse
    around the emitted ops, which enter the graph as their registered custom ops (lmoec.runtime.library).
    A model without `blocks` is compiled whole.

    With recompute, each block keeps only its input for the backward and runs its forward again there
    (activation checkpointing, non-reentrant): a block's activations (the MoE's routed rows above all) then
    exist for one block at a time, for about one more forward of compute. The checkpoint stays outside the
    compiled graph, so the blocks compile as without it and their side outputs (the MoE's aux losses, read
    after the block) keep their gradients."""
    def loss(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lm_loss(model, inputs, targets)

    blocks = getattr(model, "blocks", None)
    if recompute and blocks is None:
        raise ValueError("recompute needs a model made of blocks (an emitted CausalLM)")
    if not compile and not recompute:
        return loss
    if blocks is None:
        return torch.compile(loss, backend=COMPILE_BACKEND)
    for block in blocks:
        if not recompute:
            block.compile(backend=COMPILE_BACKEND)
            continue
        forward = torch.compile(block.forward, backend=COMPILE_BACKEND) if compile else block.forward
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, forward, use_reentrant=False)
    return loss


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norm gains, biases, per-head decay parameters) do not. On CUDA the fused
    implementation (one kernel over all parameters, the same update): the multi-tensor one took 68 ms of a 250 ms
    A0.3B-2B step (run 14)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay) or None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


def clipped_step(optimizer: torch.optim.Optimizer, max_norm: float, norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scale the gradients of the optimizer's parameters to a global L2 norm of at most max_norm, then step; returns
    the norm before clipping (torch.nn.utils.clip_grad_norm_'s rule, with its 1e-6 guard).

    A fused AdamW divides the gradients by the clipping factor in its own pass over them (its `grad_scale`, the hook
    torch.amp.GradScaler unscales through; it writes the divided gradients back, as GradScaler expects), so clipping
    costs the norm's read and that write, not a pass of its own that reads and writes every gradient (a 6.6 ms kernel
    of a 187 ms A0.3B-2B step on an H100, run 15). Other optimizers clip first.
    `norm`: the global norm where the caller has it (distributed training sums its parts over ranks).
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if not optimizer.defaults.get("fused"):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        optimizer.step()
        return norm
    optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0).float()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
    return norm


def update_router_biases(model) -> None:
    """Aux-loss-free balancing: MoE layers with a router bias nudge it by the step's expert load."""
    for module in model.modules():
        if hasattr(module, "update_bias") and getattr(getattr(module, "router", None), "bias", None) is not None:
            module.update_bias()


@torch.no_grad()
def evaluate(model, data: TokenData, cfg: TrainConfig, device: torch.device) -> float:
    """Mean cross-entropy over fixed held-out batches (the same ones at every eval)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(cfg.eval_batches):
        inputs, targets = sample_batch(data.eval, cfg.batch, cfg.seq_len, seed=cfg.seed + 7919, step=i)
        with autocast_for(device):
            ce, _ = lm_loss(model, inputs.to(device), targets.to(device))
        total += ce.item()
    model.train(was_training)
    return total / cfg.eval_batches


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_log(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    _write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def plot_losses(path: Path, records: list[dict], title: str) -> None:
    """Train loss per step (and a running mean) with eval loss points, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train loss")
    if len(losses) >= 10:
        width = max(5, len(losses) // 30)
        smooth = [sum(losses[max(0, i - width + 1) : i + 1]) / len(losses[max(0, i - width + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"train loss (mean of {width})")
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", lw=2, label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def train(
    files: dict[str, str],
    package_name: str,
    cfg: TrainConfig,
    out: Path,
    *,
    model_config: Optional[dict] = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    stop_after: Optional[int] = None,
    stop_on_interrupt: bool = False,
    say: Callable[[str], None] = print,
    trust_code: bool = False,
) -> TrainResult:
    """Train the model of an emitted package (`files`) and write checkpoint.pt, log.jsonl and loss.png to `out`.

    model_config: overrides of the package's CONFIG (tests use tiny sizes). resume: continue from
    out/checkpoint.pt, restoring everything; `cfg` must then equal the run's settings except
    RESUME_CAN_CHANGE (more steps extend the cosine schedule to the new end). stop_after: end after this step as if interrupted (the
    schedule still spans cfg.steps), which is how tests check that resuming is exact. stop_on_interrupt (the
    command line): Ctrl-C ends the run after the current step with a checkpoint of it, raising Interrupted.
    trust_code: resume even if the checkpoint's package is not what this lmoec emits from its IR
    (lmoec.trainer.checkpoint.package).
    """
    from tqdm import tqdm

    out = Path(out)
    ckpt_path, log_path, plot_path = out / ckpt.FILENAME, out / "log.jsonl", out / "loss.png"
    state = None
    if resume:
        state = ckpt.load(ckpt_path)
        package_name, files = ckpt.package(state, ckpt_path, trust_code)
        model_config = state["model_config"]
        saved = saved_config(state)
        changed = {k: (getattr(saved, k), v) for k, v in asdict(cfg).items() if getattr(saved, k) != v}
        fixed = sorted(set(changed) - RESUME_CAN_CHANGE)
        if fixed:
            raise RunError("resume keeps the run's settings; " + ", ".join(
                f"{k} was {changed[k][0]!r}, now {changed[k][1]!r}" for k in fixed))
        if "steps" in changed:
            say(f"resuming with steps = {cfg.steps} (the run was started with {saved.steps}); the schedule now ends at {cfg.steps}")
    elif ckpt_path.exists():
        raise RunError(f"{out} already holds a run ({ckpt_path}); pass --resume to continue it or choose another --out")

    data = load_tokens(cfg.data, cfg.seq_len)
    if state is not None and state["data"]["digest"] != data.digest:
        raise RunError(f"the data differs from the run's ({state['data']['source']}); resume needs the same data")

    torch.manual_seed(cfg.seed)
    package = load_package(package_name, files)
    model = package.model.CausalLM(model_config) if model_config is not None else package.model.build()
    if model.config["vocab"] < BYTE_VOCAB:
        raise RunError(f"the model's vocab is {model.config['vocab']}; byte-level data needs at least {BYTE_VOCAB}")
    dev = pick_device(device)
    model.to(dev).train()
    optimizer = make_optimizer(model, cfg)
    step_loss = loss_function(model, cfg.compile, cfg.recompute)
    records: list[dict] = []
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        ckpt.set_rng_state(state["rng"])
        if log_path.exists():  # drop what was logged after the checkpoint: those steps run again
            records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
            records = [r for r in records if r["step"] <= start]

    def save(step: int) -> None:
        ckpt.save(ckpt_path, {
            "package": {"name": package_name, "files": files},
            "model_config": dict(model.config),
            "train_config": asdict(cfg),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "rng": ckpt.rng_state(),
            "data": {"source": data.source, "digest": data.digest, "position": step},
        })

    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        n_total = model.num_params()
        n_active = model.num_params(active=True)
        say(f"model {model.config['name']} ({model.config['pattern']}): {n_total / 1e6:.2f}M parameters, "
            f"{n_active / 1e6:.2f}M active per token; device {dev}")
        say(f"data: {data.source}; {len(data.train):,} train / {len(data.eval):,} held-out byte tokens")
    else:
        say(f"resumed {ckpt_path} at step {start}")
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, dynamic_ncols=True, desc="train")
    tokens_per_step = cfg.batch * cfg.seq_len
    with _StopRequest(stop_on_interrupt) as stop:
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = cfg.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = sample_batch(data.train, cfg.batch, cfg.seq_len, cfg.seed, step)
            with autocast_for(dev):
                ce, loss = step_loss(inputs.to(dev), targets.to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clipped_step(optimizer, cfg.grad_clip)
            update_router_biases(model)
            done = step + 1
            record = {"step": done, "loss": ce.item(), "lr": lr, "grad_norm": grad_norm.item()}
            if loss is not ce:
                record["aux_loss"] = (loss - ce).item()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            record["tokens_per_s"] = tokens_per_step / (time.perf_counter() - t0)
            records.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            if done % cfg.eval_every == 0 or done == cfg.steps:
                records.append({"step": done, "eval_loss": evaluate(model, data, cfg, dev)})
                (bar.write if progress else say)(f"step {done}: train loss {record['loss']:.3f}, held-out loss {records[-1]['eval_loss']:.3f}")
            if done % cfg.save_every == 0 or done == end or stop.requested:
                save(done)
                write_log(log_path, records)
                plot_losses(plot_path, records, f"{model.config['name']} ({model.config['pattern']})")
            if stop.requested and done < end:
                bar.close()
                raise Interrupted(done, ckpt_path)
    bar.close()
    if start >= end:  # nothing left to run: still leave the log and plot behind
        write_log(log_path, records)
    return TrainResult(records=records, checkpoint=ckpt_path, plot=plot_path if plot_path.exists() else None)


__all__ = ["TrainConfig", "TrainResult", "RunError", "Interrupted", "DataError", "train", "evaluate", "lm_loss",
           "loss_function", "pick_device", "clipped_step"]
