"""Expert parallel over gloo (2 and 4 CPU processes) equals one process holding all experts and tokens.

Each rank gets a consecutive slice of the global batch and E / R experts. Compared with one process on
the whole batch: outputs; input gradients; expert-weight gradients (this rank's slice); router and
shared-expert gradients summed over ranks (they are replicated, as under data parallelism); the
aux loss averaged over ranks (the value a data-parallel mean of the losses sees) and the global load.
"""
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmoec.runtime.moe import MoE
from lmoec.trainer.distributed import shutdown_process_group
from lmoec.trainer.expert_parallel import shard_experts
from ranks import free_port

HIDDEN, FFN, EXPERTS, TOKENS = 8, 6, 8, 24

CONFIGS = {
    "softmax_shared": dict(top_k=2, shared_experts=1),
    "sigmoid_bias_capacity": dict(top_k=3, score="sigmoid", bias_balancing=True, capacity_factor=0.5),
}


def _make(config: str) -> tuple[MoE, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    moe = MoE(HIDDEN, experts=EXPERTS, expert_ffn=FFN, init_std=0.5, dtype=torch.float64, **CONFIGS[config])
    if moe.router.bias is not None:
        moe.router.bias.copy_(torch.randn(EXPERTS) * 0.3)
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.float64)
    grad_y = torch.randn(TOKENS, HIDDEN, dtype=torch.float64)
    return moe, x, grad_y


def _run(moe: MoE, x: torch.Tensor, grad_y: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = moe(x.unsqueeze(0)).squeeze(0)
    (y * grad_y).sum().backward()
    out = {"y": y.detach(), "x.grad": x.grad, "aux": moe.last_aux_loss.detach(), "z": moe.last_z_loss.detach(),
           "load": moe.last_tokens_per_expert, "dropped": moe.last_dropped_tokens}
    out.update({f"{n}.grad": p.grad for n, p in moe.named_parameters() if p.requires_grad})
    return out


def _worker(rank: int, world: int, port: int, config: str, results_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a timeout turns a stuck collective into a failure instead of a hung suite
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        moe, x, grad_y = _make(config)
        shard_experts(moe)
        part = slice(rank * TOKENS // world, (rank + 1) * TOKENS // world)
        out = _run(moe, x[part], grad_y[part])
        torch.save(out, os.path.join(results_dir, f"{rank}.pt"))
    finally:
        shutdown_process_group()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_expert_parallel_matches_single_process(world, config, tmp_path):
    mp.spawn(_worker, args=(world, free_port(), config, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    moe, x, grad_y = _make(config)
    single = _run(moe, x, grad_y)

    tight = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), single["y"], **tight)
    torch.testing.assert_close(torch.cat([r["x.grad"] for r in ranks]), single["x.grad"], **tight)
    for name in ("w_gate", "w_up", "w_down"):
        torch.testing.assert_close(torch.cat([r[f"{name}.grad"] for r in ranks]), single[f"{name}.grad"], **tight)
    replicated = [n for n in single if n.endswith(".grad") and (n.startswith("router") or n.startswith("shared"))]
    assert "router.weight.grad" in replicated
    for name in replicated:
        torch.testing.assert_close(sum(r[name] for r in ranks), single[name], **tight)
    torch.testing.assert_close(sum(r["aux"] for r in ranks) / world, single["aux"], **tight)
    torch.testing.assert_close(sum(r["z"] for r in ranks) / world, single["z"], **tight)
    for r in ranks:
        assert torch.equal(r["load"], single["load"]) and torch.equal(r["dropped"], single["dropped"])
    if moe.capacity_factor is not None:
        assert int(single["dropped"]) > 0  # the drops were exercised
