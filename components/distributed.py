"""Data-parallel training across processes started by ``torchrun`` (one process per device).

The authors trained with ``nn.DataParallel``: each device normalises its own chunk of the batch (no
synchronised BN) and device 0's BN running statistics are the ones that count. Here each rank wraps the
models it trains in ``DistributedDataParallel`` with ``broadcast_buffers=True`` (rank 0's BN buffers are
sent to every rank before each forward) and ``static_graph=True`` (a method may run a model several
times before one backward: target(x_adv) and target(x)). Attacks run the unwrapped modules: they take
input gradients only, which need no synchronisation.

Loss terms are computed per rank and gradients averaged, which equals the global-batch loss for every
term that is a mean over examples (CE, MSE, KL); D2R's |kl1 - kl2| is taken per rank, where the authors'
DataParallel took it over the gathered batch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun exports them; (0, 1, 0) in a plain process."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); returns this rank's device."""
    _, size, local = env_world()
    if size <= 1:
        return device
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return f"cuda:{local}" if use_cuda else "cpu"


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP wrapper for the loss views of one trained model (see the module doc for the settings)."""
    ids = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else None
    )
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, broadcast_buffers=True, static_graph=True
    )


def broadcast_buffers(models: dict[str, nn.Module] | nn.ModuleDict) -> None:
    """Give every rank rank 0's BN statistics (what DataParallel's replicas see) before an attack."""
    for model in models.values():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on one (a stop request must stop all ranks at the same step)."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, indexed by rank (per-rank RNG and loader states for checkpoints)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the MLflow run id, say)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
