"""Sequence parallelism applied to a built model from outside: the model never knows about ranks.

`apply_sequence_parallel(model, mesh_or_group)` makes every layer of an
emitted CausalLM work on this rank's contiguous slice of the sequence
(torchtitan's model.py / parallelize.py split):

* LSM layers: their package's `op` becomes LASP-2 (lmoec.trainer.lasp2) while
  such a layer runs; short convolutions start from the previous rank's last
  kernel - 1 inputs (a small halo all_gather) instead of zeros. A layer with
  memories runs LASP-2 over its (memory, batch) segments, and each segment's
  convolution starts from the last inputs the same segment had on the ranks
  before (a segment may hold fewer than kernel - 1 tokens on a rank).
* attention layers: RoPE positions start at this rank's offset, and attention
  is LASP-2H (all-gathered K and V, causal across ranks).

Everything else (embeddings, norms, FFN / MoE, the head) is per token already.
Training only: decoding with a cache under sp is refused. Replicated weights
get per-rank partial gradients: `average_gradients` over the sp group (or a
DDP / FSDP group that includes it) makes them the whole-sequence gradient of
the mean loss.
"""
from __future__ import annotations

import sys
import threading
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.attention import Attention, KVCache
from .lasp2 import _gather, lasp2_op, lasp2h_attention, recurrence_of
from ..runtime.memories import segment_tails
from ..runtime.moe import MoE

_ACTIVE = threading.local()  # the sp group of the LSM layer running now (None: not under sp)


def _sp_group(mesh_or_group):
    if hasattr(mesh_or_group, "mesh_dim_names"):
        return mesh_or_group["sp"].get_group()
    return mesh_or_group if mesh_or_group is not None else dist.group.WORLD


def _dispatching_op(original):
    """Stand-in for a package's `op` in its layer module: LASP-2 while an sp layer runs, else the op itself."""

    def op(*args, **kwargs):
        group = getattr(_ACTIVE, "group", None)
        if group is None:
            return original(*args, **kwargs)
        return lasp2_op(original, *args, group=group, **kwargs)

    op.__wrapped__ = original
    op.__doc__ = original.__doc__
    return op


def _is_lsm_layer(module: nn.Module) -> bool:
    op = getattr(sys.modules.get(type(module).__module__), "op", None)
    if op is None:
        return False
    try:
        recurrence_of(getattr(op, "__wrapped__", op))
    except ValueError:
        return False
    return True


def _parallelize_lsm_layer(layer: nn.Module, group) -> None:
    layer_module = sys.modules[type(layer).__module__]
    if not hasattr(layer_module.op, "__wrapped__"):
        layer_module.op = _dispatching_op(layer_module.op)

    def enter(module, args, kwargs):
        if kwargs.get("past") is not None or kwargs.get("use_cache"):
            raise ValueError("sequence parallel: LSM layers run without a cache (training); decode on one rank")
        module._sp_outer = getattr(_ACTIVE, "group", None)
        _ACTIVE.group = group

    def leave(module, args, kwargs, output):
        _ACTIVE.group = module._sp_outer

    if hasattr(layer_module, "segment_conv") and not hasattr(layer_module.segment_conv, "__wrapped__"):
        layer_module.segment_conv = _dispatching_segment_conv(layer_module.segment_conv)
    if hasattr(layer_module, "balancing_losses") and not hasattr(layer_module.balancing_losses, "__wrapped__"):
        layer_module.balancing_losses = _dispatching_balancing_losses(layer_module.balancing_losses)
    layer.register_forward_pre_hook(enter, with_kwargs=True)
    layer.register_forward_hook(leave, with_kwargs=True, always_call=True)
    for sub in layer.modules():
        if type(sub).__name__ == "ShortConv":
            _parallelize_short_conv(sub, group)


def _parallelize_short_conv(conv: nn.Module, group) -> None:
    """A causal conv reads kernel - 1 earlier inputs: take them from the previous rank."""
    rank = dist.get_rank(group)
    local_forward = conv.forward
    halo_len = conv.kernel - 1

    def forward(x, state=None, features=None):
        if state is None and halo_len > 0:
            if x.shape[1] < halo_len:
                raise ValueError(f"sequence parallel: a rank's slice ({x.shape[1]} tokens) is shorter than the short conv's reach {halo_len}")
            tie, halos = _gather(x[:, x.shape[1] - halo_len:], group)
            state = (halos[rank - 1] if rank > 0 else torch.zeros_like(halos[0])) + tie
        return local_forward(x, state, features)

    conv.forward = forward


def _dispatching_balancing_losses(original):
    """Memory routing's losses with f over the whole sequence while a parallelized layer runs."""

    def losses(logits, probs, chosen, memories):
        return original(logits, probs, chosen, memories, sequence_group=getattr(_ACTIVE, "group", None))

    losses.__wrapped__ = original
    return losses


def _dispatching_segment_conv(original):
    """Stand-in for a memory layer's `segment_conv`: under sp, each segment starts from its earlier ranks' inputs."""

    def segment_conv(rows, weight, slots, state=None):
        group = getattr(_ACTIVE, "group", None)
        if group is not None and state is None and weight.shape[-1] > 1:
            state = _segment_halo(rows, slots, weight.shape[-1] - 1, group)
        return original(rows, weight, slots, state)

    segment_conv.__wrapped__ = original
    return segment_conv


def _segment_halo(rows: torch.Tensor, slots, keep: int, group) -> torch.Tensor:
    """[segments, keep, C]: the last `keep` inputs of each segment over the ranks before this one.

    Every rank sends its segments' last `keep` rows and their counts; the state is then composed rank by
    rank (a rank with fewer than `keep` rows of a segment shifts in only those), so a segment that was
    short or empty on the previous rank reaches further back.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    lengths = (slots.cu_seqlens[1:] - slots.cu_seqlens[:-1]).clamp(max=keep)
    counts = [torch.empty_like(lengths) for _ in range(world)]
    dist.all_gather(counts, lengths.contiguous(), group=group)
    tie, tails = _gather(segment_tails(rows, slots, keep), group)
    state = torch.zeros_like(tails[0])
    position = torch.arange(keep, device=rows.device)[None, :]
    for j in range(rank):
        n = counts[j][:, None]  # result[i] = tail[i] for the last n positions, else the old state shifted by n
        shifted = state.gather(1, (position + n).clamp(max=keep - 1)[..., None].expand_as(state))
        state = torch.where((position >= keep - n)[..., None], tails[j], shifted)
    return state + tie


def _parallelize_attention(attn: Attention, group) -> None:
    """RoPE at this rank's absolute positions; LASP-2H instead of local attention."""
    if attn.window is not None:
        raise ValueError("sequence parallel: sliding-window attention is not supported under sp (window reaches across ranks)")
    rank = dist.get_rank(group)
    local_forward = attn.forward

    def forward(x, past=None, use_cache=False):
        if past is not None or use_cache:
            raise ValueError("sequence parallel: attention runs without a KV cache (training); decode on one rank")
        # an empty cache whose next position is this rank's offset: RoPE then sees absolute positions
        empty = x.new_zeros(x.shape[0], attn.kv_heads, 0, attn.head_dim)
        return local_forward(x, past=KVCache(empty, empty, rank * x.shape[1]))

    def attend(q, k, v, start, real=None):  # [B, H, T, D] in and out; training batches are never padded
        if real is not None:
            raise ValueError("sequence parallel: attention takes no padding mask")
        return lasp2h_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), group=group).transpose(1, 2)

    attn.forward = forward
    attn._attend = attend


def apply_sequence_parallel(model: nn.Module, mesh_or_group=None) -> nn.Module:
    """Make `model` run on this rank's slice of T over the mesh's "sp" dim (or a ProcessGroup); in place."""
    group = _sp_group(mesh_or_group)
    if dist.get_world_size(group) == 1:
        return model
    for module in model.modules():
        if isinstance(module, Attention):
            _parallelize_attention(module, group)
        elif _is_lsm_layer(module):
            _parallelize_lsm_layer(module, group)
        elif isinstance(module, MoE):
            module.sequence_group = group
    return model


def shard_sequence(x: torch.Tensor, mesh_or_group=None, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of x along `dim` (T), for inputs and targets."""
    group = _sp_group(mesh_or_group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if x.shape[dim] % world:
        raise ValueError(f"sequence parallel: sp = {world} does not divide the sequence length {x.shape[dim]}")
    return x.chunk(world, dim=dim)[rank]


def average_gradients(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
    """All-reduce every gradient to its mean over `group`: per-rank mean losses -> the global mean's gradient."""
    world = dist.get_world_size(group)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(world)
