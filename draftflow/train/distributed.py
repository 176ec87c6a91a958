"""Process set-up (process group, host threads) and the few collectives the trainer needs.

Works the same under plain `python` (one process, no process group) and under
`torchrun` (gloo on CPU, NCCL on GPU). The torchrun variables are read here only.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device_pref if device_pref not in ("auto", "cuda") else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


# Intra-op threads while the compute runs on a GPU (see host_threads).
CUDA_HOST_THREADS = 4


@contextlib.contextmanager
def host_threads(device: torch.device):
    """Size torch's intra-op thread pool for work on `device` while inside; the previous
    size comes back on exit (a colocated run may capture on a GPU, then train on CPU).

    On CUDA the host only reads and writes files, hashes and copies batches, yet a lone
    process's pool has a thread per core; a producer and a consumer on one host then
    keep twice as many threads busy as there are cores, and the thread that launches
    the kernels waits for one (a consumer's steps slow down: docs/architecture.md,
    devices). CUDA work therefore uses CUDA_HOST_THREADS, unless OMP_NUM_THREADS says
    otherwise. CPU work keeps every core: there the pool does the compute (several
    processes on one CPU host need OMP_NUM_THREADS each, see docs/disaggregated.md).
    """
    previous = torch.get_num_threads()
    if device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(previous, CUDA_HOST_THREADS))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks in one flat buffer (losses are already normalised
    by the global count of valid positions, so a sum is the right reduction)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group cleanly: a barrier first, so no rank tears down its
    communicator while a peer still has a collective in flight."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
