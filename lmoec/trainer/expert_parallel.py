"""Expert parallel: each rank of the EP group holds E / R consecutive experts.

One MoE call, on every rank, with its own tokens:

    1. token counts: all_gather of each rank's [E] slot counts -> [R, E] on every rank. It holds
       what an all_to_all of counts would deliver (the split sizes), plus the global load that
       capacity, the router stats and the aux loss need.
    2. dispatch: the rank's slots, sorted by expert (hence by destination rank), all_to_all'd.
    3. the received rows (ordered by source rank, then local expert) are grouped by local expert
       and run through the grouped GEMMs; with a capacity an expert keeps its first rows in
       (source rank, position) order: the global position order when ranks hold consecutive
       slices of the batch, so drops match a single process.
    4. combine: the outputs go back by the inverse all_to_all, and the token's rank weighs them.

The all_to_all is an autograd function (its backward is the reverse all_to_all), so gradients of
inputs, router and experts match a single process holding all experts and all tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.moe import ExpertsFn, MoE, gather_rows, inverse_permutation, run_grouped


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = rows.new_empty(sum(recv_splits), rows.shape[1])
        dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty(sum(ctx.send_splits), grad.shape[1])
        dist.all_to_all_single(back, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    return _AllToAll.apply(rows, send_splits, recv_splits, group)


class ExpertParallel:
    """The EP group of one MoE layer and its dispatch/combine."""

    def __init__(self, experts: int, group=None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if experts % self.size:
            raise ValueError(f"expert parallel degree {self.size} does not divide experts = {experts}")
        self.experts = experts
        self.local_experts = experts // self.size
        self.first_expert = self.rank * self.local_experts

    def exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """[E] slot counts of this rank -> [R, E], row r from rank r."""
        gathered = [torch.empty_like(counts) for _ in range(self.size)]
        dist.all_gather(gathered, counts.contiguous(), group=self.group)
        return torch.stack(gathered)

    def dispatch_combine(
        self,
        tokens: torch.Tensor,
        slot_expert: torch.Tensor,
        top_k: int,
        counts_by_rank: torch.Tensor,
        capacity: Optional[int],
        experts_fn: ExpertsFn,
    ) -> torch.Tensor:
        """tokens [N, hidden], slot_expert [N*k] global ids -> expert outputs [N*k, hidden] in slot order."""
        r, local = self.size, self.local_experts
        order = torch.argsort(slot_expert, stable=True)
        send = gather_rows(tokens, order // top_k, inverse_permutation(order), top_k)
        mine = counts_by_rank[self.rank].view(r, local).sum(1).tolist()
        received_counts = counts_by_rank[:, self.first_expert : self.first_expert + local]  # [R, local]
        theirs = received_counts.sum(1).tolist()
        received = all_to_all(send, mine, theirs, self.group)
        row_expert = torch.repeat_interleave(
            torch.arange(local, device=tokens.device).repeat(r), received_counts.reshape(-1).to(tokens.device)
        )
        out = run_grouped(received, 1, row_expert, local, capacity, experts_fn)
        back = all_to_all(out, theirs, mine, self.group)
        return gather_rows(back, inverse_permutation(order), order)


def shard_experts(moe: MoE, group=None) -> MoE:
    """Keep this rank's slice of the experts in `moe` (in place) and route through the EP group.

    The full layer must be identical on every rank before the call (same seed or a broadcast);
    the router and shared experts stay replicated: reduce their gradients over the group as for
    data parallelism.
    """
    ep = ExpertParallel(moe.experts, group)
    part = slice(ep.first_expert, ep.first_expert + ep.local_experts)
    for name in ("w_gate", "w_up", "w_down"):
        full = getattr(moe, name)
        setattr(moe, name, nn.Parameter(full.detach()[part].clone(), requires_grad=full.requires_grad))
    moe.expert_parallel = ep
    return moe
