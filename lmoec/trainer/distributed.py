"""Distributed training under torchrun: data, sequence and expert parallelism over one DeviceMesh.

Every rank builds the same model from the seed, then `parallelize` wraps it from outside:
experts are sharded over the ep group (all_to_all dispatch), LSM and attention layers run on
this rank's slice of T over the sp group (LASP-2 / LASP-2H), and the MoE balancing statistics
are made global. Each step the global batch of `sample_batch` is split: dp and ep split the
sequences (ranks along both see different samples), sp splits each sequence into contiguous slices.

Gradient reduction. With W = dp * sp * ep ranks each holding B*T / W tokens, the loss of the
global batch is the mean of the ranks' mean losses, L = (1/W) sum_r L_r. Backward on rank r
computes, for every parameter *use* on that rank, the gradient of sum_r' L_r' over the ranks
its outputs reach: LASP-2's all_gather and the EP all_to_all are differentiable, so rank r's
local gradient already contains what its sp and ep peers' losses owe to its computation.
Hence the global gradient is (1/W) times the sum of the local gradients over every rank that
holds a copy of the parameter:

* replicated parameters (embeddings, norms, LSM and attention weights, routers, shared
  experts, the head): held by all W ranks -> all_reduce(sum) over the world, divided by W
  (a mean over dp, and over sp the sum of the partial per-slice gradients, divided by sp);
* routed-expert weights: this rank holds the shard of its ep coordinate, as do all dp * sp
  ranks with the same ep coordinate -> all_reduce(sum) over that dp x sp group, divided by W
  (not by dp * sp: the shard's gradient on each rank is already summed over its ep peers'
  tokens by the all_to_all backward).

MoE balancing loss. aux = E * sum_i f_i P_i with f_i the share of slots routed to expert i and
P_i the mean router probability. `parallelize` all_reduces the slot counts over the world (f is
global; counts carry no gradient) while P stays local: with equal token counts per rank the mean
over ranks of E * sum_i f_i P_i^(r) is the single-process aux loss of the whole batch, and the
z-loss (a per-token mean) averages the same way. So the total loss, not only the cross-entropy,
equals one process on the global batch, and the router-bias update sees the global load on
every rank. A capacity factor is the exception: capacity and drops are decided per ep group
(per dp x sp coordinate), not over the whole batch, so runs with drops differ from one process.

Checkpoints are the single-process format (lmoec.trainer.checkpoint): the expert shards are
all_gathered over ep into full tensors (model and AdamW moments) and rank 0 writes one file, so
a distributed checkpoint resumes on any layout, on one process, and loads in `lmoec generate`.
Gathering a full copy on every rank suits the model sizes this trainer runs on CPU and a few
GPUs; sharded checkpoints (torch.distributed.checkpoint) would be the step for models that
don't fit one rank.
"""
from __future__ import annotations

import json
import gc
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..ir.nodes import ParallelSpec
from ..runtime.loader import load_package
from ..runtime.moe import MoE
from . import checkpoint as ckpt
from .data import BYTE_VOCAB, TokenData, load_tokens, sample_batch
from .expert_parallel import shard_experts
from .mesh import build_mesh, sample_rank
from .parallelize import apply_sequence_parallel
from .train import (
    RESUME_CAN_CHANGE,
    RunError,
    TrainConfig,
    TrainResult,
    autocast_for,
    clipped_step,
    lm_loss,
    make_optimizer,
    plot_losses,
    saved_config,
    update_router_biases,
    write_log,
)

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


@dataclass
class Layout:
    """This rank's place in the mesh and the groups its gradients and statistics reduce over."""

    mesh: object  # torch DeviceMesh with dims (dp, sp, ep)
    degrees: dict[str, int]
    sp_group: object
    ep_group: object
    expert_group: object  # the dp x sp ranks holding the same expert shard as this rank
    sample_index: int  # this rank's share of the batch's sequences: index, count
    sample_count: int

    @property
    def world(self) -> int:
        return dist.get_world_size()

    @property
    def sp_rank(self) -> int:
        return dist.get_rank(self.sp_group)

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep_group)


def build_layout(spec: ParallelSpec, seq_len: int, batch: int, experts: Optional[int], device_type: str) -> Layout:
    """The mesh over the initialized (or torchrun's) process group; ValueError for an impossible layout."""
    mesh = build_mesh(spec, seq_len=seq_len, experts=experts, batch_size=batch, device_type=device_type)
    degrees = dict(zip(mesh.mesh_dim_names, mesh.shape))
    # one group per ep coordinate; every rank creates all of them, in the same order
    expert_group = None
    for e in range(degrees["ep"]):
        ranks = mesh.mesh[:, :, e].flatten().tolist()
        group = dist.new_group(ranks) if degrees["ep"] > 1 else dist.group.WORLD
        if dist.get_rank() in ranks:
            expert_group = group
    index, count = sample_rank(mesh)
    return Layout(mesh, degrees, mesh["sp"].get_group(), mesh["ep"].get_group(), expert_group, index, count)


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def _global_balancing_stats(moe: MoE, group) -> None:
    """Sum the layer's slot counts over `group` before its losses and load are recorded (see module doc)."""
    local_record = moe._record

    def record(logits, probs, counts):
        counts = counts.clone()
        dist.all_reduce(counts, group=group)
        local_record(logits, probs, counts)

    moe._record = record


def parallelize(model: nn.Module, layout: Layout) -> set[str]:
    """Shard experts over ep, run sequence parallel over sp, make MoE statistics global; in place.

    The model must be identical on every rank (built from the same seed). Returns the names of
    the parameters that are expert shards (reduced over `layout.expert_group`, gathered for checkpoints).
    """
    expert_params = set()
    for name, moe in moe_layers(model):
        if layout.degrees["ep"] > 1:
            shard_experts(moe, layout.ep_group)
            expert_params |= {f"{name}.{w}" for w in EXPERT_WEIGHTS}
        if layout.world > 1:
            # under ep the counts are already summed over the ep group: add the other dp x sp ranks'
            _global_balancing_stats(moe, layout.expert_group)
    apply_sequence_parallel(model, layout.sp_group)
    if layout.world > 1:
        for _, moe in moe_layers(model):
            moe.sequence_group = None  # its counts are summed over every dp x sp rank above already
    return expert_params


def shard_batch(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """This rank's part of a global [B, T] batch: its sequences (dp x ep), then its slice of T (sp)."""
    B, T = x.shape[:2]
    rows, cols = B // layout.sample_count, T // layout.degrees["sp"]
    return x[layout.sample_index * rows : (layout.sample_index + 1) * rows, layout.sp_rank * cols : (layout.sp_rank + 1) * cols]


def _all_reduce_flat(grads: list[torch.Tensor], group, divide_by: int) -> None:
    """Sum `grads` over `group` in one collective, then divide (in place)."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.div_(divide_by)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def reduce_gradients(model: nn.Module, layout: Layout, expert_params: set[str]) -> None:
    """Local gradients -> the gradient of the global batch's mean loss (see module doc for why)."""
    replicated, experts = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:  # every rank must take part in the same collectives
            p.grad = torch.zeros_like(p)
        (experts if name in expert_params else replicated).append(p.grad)
    _all_reduce_flat(replicated, dist.group.WORLD, layout.world)
    _all_reduce_flat(experts, layout.expert_group, layout.world)


def _sum_of_squares(grads: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))
    for g in grads:
        total = total + g.to(total.dtype).square().sum()
    return total


def global_grad_norm(model: nn.Module, layout: Layout, expert_params: set[str]) -> torch.Tensor:
    """The L2 norm of the whole model's gradient, with expert shards spread over ep (clipped_step clips by it).

    Call after `reduce_gradients`: replicated gradients are then equal on every rank and each
    expert shard's on its dp x sp group, so the ep group's shards sum to the experts' squared norm.
    """
    replicated, experts = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (experts if name in expert_params else replicated).append(p.grad)
    like = (replicated + experts)[0]
    expert_square = _sum_of_squares(experts, like)
    if expert_params:
        dist.all_reduce(expert_square, group=layout.ep_group)
    return (_sum_of_squares(replicated, like) + expert_square).sqrt()


def global_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean over all ranks of a per-rank scalar (each rank's mean over equally many tokens)."""
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def forward_backward(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, layout: Layout,
                     expert_params: set[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's gradients of the global batch (inputs/targets [B, T], the same on every rank).

    Returns (cross-entropy, total loss) of the global batch, identical on every rank.
    """
    with autocast_for(device):
        ce, loss = lm_loss(model, shard_batch(inputs, layout).to(device), shard_batch(targets, layout).to(device))
    loss.backward()
    reduce_gradients(model, layout, expert_params)
    return global_mean(ce), global_mean(loss)


# ---- checkpoints --------------------------------------------------------------------------------


def _gather_experts(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    pieces = [torch.empty_like(t) for _ in range(layout.degrees["ep"])]
    dist.all_gather(pieces, t.contiguous(), group=layout.ep_group)
    return torch.cat(pieces).cpu()


def _shard_of(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    return t.chunk(layout.degrees["ep"])[layout.ep_rank].clone()


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer state dict's index order."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, layout: Layout, expert_params: set[str]) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of the whole model, as one process would hold them (on every rank)."""
    model_state = {k: (_gather_experts(v, layout) if k in expert_params else v.detach().cpu()) for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    names = _optimizer_names(model, optimizer)
    state = {}
    for index, entry in opt_state["state"].items():
        if names[index] in expert_params:
            entry = {k: (_gather_experts(v, layout) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in entry.items()}
        state[index] = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in entry.items()}
    return model_state, {**opt_state, "state": state}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, opt_state: dict,
                    layout: Layout, expert_params: set[str]) -> None:
    """Load full state dicts (from `full_state` or a single-process run), keeping this rank's expert shards."""
    model.load_state_dict({k: (_shard_of(v, layout) if k in expert_params else v) for k, v in model_state.items()})
    names = _optimizer_names(model, optimizer)
    state = {}
    for index, entry in opt_state["state"].items():
        if names[index] in expert_params:
            entry = {k: (_shard_of(v, layout) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in entry.items()}
        state[index] = entry
    optimizer.load_state_dict({**opt_state, "state": state})


# ---- the training loop --------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, data: TokenData, cfg: TrainConfig, layout: Layout, device: torch.device) -> float:
    """Mean held-out cross-entropy over the same fixed batches as single-process `evaluate`."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(cfg.eval_batches):
        inputs, targets = sample_batch(data.eval, cfg.batch, cfg.seq_len, seed=cfg.seed + 7919, step=i)
        with autocast_for(device):
            ce, _ = lm_loss(model, shard_batch(inputs, layout).to(device), shard_batch(targets, layout).to(device))
        total += global_mean(ce).item()
    model.train(was_training)
    return total / cfg.eval_batches


def _resume_state(ckpt_path: Path, cfg: TrainConfig, say) -> dict:
    state = ckpt.load(ckpt_path)
    saved = saved_config(state)
    changed = {k: (getattr(saved, k), v) for k, v in asdict(cfg).items() if getattr(saved, k) != v}
    fixed = sorted(set(changed) - RESUME_CAN_CHANGE)
    if fixed:
        raise RunError("resume keeps the run's settings; " + ", ".join(f"{k} was {changed[k][0]!r}, now {changed[k][1]!r}" for k in fixed))
    if "steps" in changed:
        say(f"resuming with steps = {cfg.steps} (the run was started with {saved.steps}); the schedule now ends at {cfg.steps}")
    return state


def init_process_group(device: str = "auto") -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); this rank's device."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dev


def shutdown_process_group() -> None:
    """destroy_process_group, after collecting garbage first.

    Parallelized modules hold their process group in reference cycles (closures that replaced their
    forward). Left to interpreter shutdown, the group's destructor runs after gloo's worker threads have
    lost their interpreter and the process aborts ("terminate called without an active exception").
    """
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def train_distributed(
    files: dict[str, str],
    package_name: str,
    cfg: TrainConfig,
    out: Path,
    parallel: ParallelSpec,
    *,
    model_config: Optional[dict] = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    stop_after: Optional[int] = None,
    say: Callable[[str], None] = print,
    trust_code: bool = False,
) -> TrainResult:
    """`lmoec.trainer.train.train` over the mesh `parallel` describes, one call per rank (under torchrun).

    Same arguments, files and log as the single-process trainer; rank 0 writes them and prints
    (`say` is silenced elsewhere). The process group must be initialized or torchrun's environment set.
    """
    from tqdm import tqdm

    if cfg.compile:  # LASP-2 and expert-parallel collectives are not traced yet
        raise RunError("--compile: single-process training only (drop --compile, or train without --sp/--ep/--dp)")
    if cfg.recompute:  # a recomputed block would run its LASP-2 and expert-parallel collectives again: untested
        raise RunError("--recompute: single-process training only (drop --recompute, or train without --sp/--ep/--dp)")
    dev = init_process_group(device)
    rank0 = dist.get_rank() == 0
    say = say if rank0 else (lambda message: None)
    out = Path(out)
    ckpt_path, log_path, plot_path = out / ckpt.FILENAME, out / "log.jsonl", out / "loss.png"
    state = None
    if resume:
        state = _resume_state(ckpt_path, cfg, say)
        package_name, files = ckpt.package(state, ckpt_path, trust_code)
        model_config = state["model_config"]
    elif ckpt_path.exists():
        raise RunError(f"{out} already holds a run ({ckpt_path}); pass --resume to continue it or choose another --out")
    data = load_tokens(cfg.data, cfg.seq_len)
    if state is not None and state["data"]["digest"] != data.digest:
        raise RunError(f"the data differs from the run's ({state['data']['source']}); resume needs the same data")

    if rank0:  # rank 0 writes the package cache first; the others then only import it
        load_package(package_name, files)
    dist.barrier()
    torch.manual_seed(cfg.seed)  # the same init on every rank
    package = load_package(package_name, files)
    model = package.model.CausalLM(model_config) if model_config is not None else package.model.build()
    if model.config["vocab"] < BYTE_VOCAB:
        raise RunError(f"the model's vocab is {model.config['vocab']}; byte-level data needs at least {BYTE_VOCAB}")
    experts = [m.experts for _, m in moe_layers(model)]
    layout = build_layout(parallel, cfg.seq_len, cfg.batch, experts[0] if experts else None, dev.type)
    if layout.degrees["ep"] > 1 and not experts:
        raise RunError(f"ep = {layout.degrees['ep']} but the model has no MoE layers to shard")
    model.to(dev).train()
    expert_params = parallelize(model, layout)
    has_moe = bool(experts)
    optimizer = make_optimizer(model, cfg)
    records: list[dict] = []
    start = 0
    if state is not None:
        load_full_state(model, optimizer, state["model"], state["optimizer"], layout, expert_params)
        start = state["step"]
        ranks_rng = state.get("rng_ranks")
        ckpt.set_rng_state(ranks_rng[dist.get_rank()] if ranks_rng and len(ranks_rng) == layout.world else state["rng"])
        if log_path.exists():
            records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
            records = [r for r in records if r["step"] <= start]

    def save(step: int) -> None:
        model_state, opt_state = full_state(model, optimizer, layout, expert_params)
        rngs = [None] * layout.world
        dist.all_gather_object(rngs, ckpt.rng_state())
        if rank0:
            ckpt.save(ckpt_path, {
                "package": {"name": package_name, "files": files},
                "model_config": dict(model.config),
                "train_config": asdict(cfg),
                "model": model_state,
                "optimizer": opt_state,
                "step": step,
                "rng": rngs[0],
                "rng_ranks": rngs,
                "parallel": dict(layout.degrees),
                "data": {"source": data.source, "digest": data.digest, "position": step},
            })
        dist.barrier()

    if rank0:
        out.mkdir(parents=True, exist_ok=True)
    d = layout.degrees
    layout_text = f"dp={d['dp']} sp={d['sp']} ep={d['ep']} on {layout.world} ranks ({dist.get_backend()})"
    if state is None:
        say(f"model {model.config['name']} ({model.config['pattern']}): {layout_text}; device {dev.type}")
        say(f"data: {data.source}; {len(data.train):,} train / {len(data.eval):,} held-out byte tokens")
    else:
        say(f"resumed {ckpt_path} at step {start}; {layout_text}")
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and rank0), dynamic_ncols=True, desc="train")
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = cfg.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = sample_batch(data.train, cfg.batch, cfg.seq_len, cfg.seed, step)
        optimizer.zero_grad(set_to_none=True)
        ce, loss = forward_backward(model, inputs, targets, layout, expert_params, dev)
        grad_norm = clipped_step(optimizer, cfg.grad_clip, global_grad_norm(model, layout, expert_params))
        update_router_biases(model)
        done = step + 1
        record = {"step": done, "loss": ce.item(), "lr": lr, "grad_norm": grad_norm.item()}
        if has_moe:
            record["aux_loss"] = (loss - ce).item()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        record["tokens_per_s"] = cfg.batch * cfg.seq_len / (time.perf_counter() - t0)
        records.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        if done % cfg.eval_every == 0 or done == cfg.steps:
            records.append({"step": done, "eval_loss": evaluate(model, data, cfg, layout, dev)})
            (bar.write if progress and rank0 else say)(f"step {done}: train loss {record['loss']:.3f}, held-out loss {records[-1]['eval_loss']:.3f}")
        if done % cfg.save_every == 0 or done == end:
            save(done)
            if rank0:
                write_log(log_path, records)
                plot_losses(plot_path, records, f"{model.config['name']} ({model.config['pattern']}, {layout_text})")
    bar.close()
    if start >= end and rank0:
        write_log(log_path, records)
    dist.barrier()
    return TrainResult(records=records, checkpoint=ckpt_path, plot=plot_path if plot_path.exists() else None)


__all__ = ["Layout", "build_layout", "parallelize", "shard_batch", "reduce_gradients", "global_grad_norm",
           "forward_backward", "full_state", "load_full_state", "train_distributed", "init_process_group"]
