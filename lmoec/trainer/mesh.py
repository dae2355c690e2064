"""The device mesh: how the ranks of a run are laid out as data, sequence and expert parallel groups.

Mesh dims ("dp", "sp", "ep"), world = dp * sp * ep. The three axes are
independent: ranks that differ along dp or ep see different samples (the
non-expert weights are replicated over all of dp, sp and ep and their
gradients reduce over the whole mesh; an expert's weights live on one ep rank
and reduce over dp and sp); ranks along sp hold consecutive slices of the same
sequences. Tensor parallelism is not implemented: tp > 1 is refused by name.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..ir.nodes import ParallelSpec

MESH_DIMS = ("dp", "sp", "ep")


def check_layout(
    spec: ParallelSpec,
    world_size: int,
    seq_len: Optional[int] = None,
    experts: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> dict[str, int]:
    """The degrees {dp, sp, ep} of `spec` on `world_size` ranks, or a ValueError saying why not.

    dp = 1 (the default) is taken as "whatever is left": dp = world / (sp * ep).
    seq_len is the global sequence length (split over sp), experts the MoE
    expert count (split over ep), batch_size the global batch (split over dp * ep).
    """
    where = f" ({spec.loc})" if spec.loc is not None else ""
    for name in ("dp", "sp", "ep", "tp"):
        if getattr(spec, name) < 1:
            raise ValueError(f"parallel{where}: {name} = {getattr(spec, name)} must be >= 1")
    if spec.tp > 1:
        raise ValueError(f"parallel{where}: tp = {spec.tp} is not supported (tensor parallelism is not implemented); use tp = 1")
    if world_size < 1:
        raise ValueError(f"parallel: world size must be >= 1, got {world_size}")
    sp, ep = spec.sp, spec.ep
    if world_size % (sp * ep):
        raise ValueError(f"parallel{where}: sp * ep = {sp} * {ep} = {sp * ep} does not divide the world size {world_size}")
    dp = spec.dp
    if dp == 1:
        dp = world_size // (sp * ep)
    elif dp * sp * ep != world_size:
        raise ValueError(f"parallel{where}: dp * sp * ep = {dp} * {sp} * {ep} = {dp * sp * ep} != world size {world_size}")
    if seq_len is not None and seq_len % sp:
        raise ValueError(f"parallel{where}: sp = {sp} does not divide the sequence length {seq_len} (each rank holds an equal slice)")
    if experts is not None and experts % ep:
        raise ValueError(f"parallel{where}: ep = {ep} does not divide the expert count {experts}")
    if batch_size is not None and batch_size % (dp * ep):
        raise ValueError(f"parallel{where}: dp * ep = {dp * ep} ranks hold different samples but do not divide the batch size {batch_size}")
    return {"dp": dp, "sp": sp, "ep": ep}


def build_mesh(
    spec: ParallelSpec,
    seq_len: Optional[int] = None,
    experts: Optional[int] = None,
    batch_size: Optional[int] = None,
    device_type: Optional[str] = None,
):
    """A DeviceMesh with dims ("dp", "sp", "ep") over the initialized process group.

    Initializes the default group from torchrun's environment if needed (NCCL
    when CUDA is available, gloo otherwise). `mesh["sp"].get_group()` is the
    group LASP-2 communicates over.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    dims = check_layout(spec, dist.get_world_size(), seq_len, experts, batch_size)
    return init_device_mesh(device_type, tuple(dims[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)


def sample_rank(mesh) -> tuple[int, int]:
    """(index, count) of this rank's share of the batch: ranks along dp and ep see different samples."""
    dp, ep = mesh["dp"], mesh["ep"]
    return dp.get_local_rank() * ep.size() + ep.get_local_rank(), dp.size() * ep.size()
