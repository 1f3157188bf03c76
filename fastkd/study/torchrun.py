"""torch.distributed helpers for the training loop (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK).

Every rank holds the whole (device-resident) data set, draws the same permutation and takes its
slice of each global batch, so a run on N processes sees the batches a single process sees.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: str) -> str:
    """Joins the process group torchrun describes (NCCL on CUDA, gloo on CPU); returns this rank's
    device. Without torchrun (WORLD_SIZE unset or 1) it does nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of ``x`` (along dim 0)."""
    rank, world = rank_and_world()
    return x.tensor_split(world)[rank] if world > 1 else x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] > 1:
        dist.all_reduce(x)
    return x


def barrier():
    if rank_and_world()[1] > 1:
        dist.barrier()


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
