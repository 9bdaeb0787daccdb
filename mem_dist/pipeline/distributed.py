"""Processes: the Accelerate setup, and the few collectives generation needs.

One process per GPU (or per CPU slot), started by ``accelerate launch`` / torchrun, or a
single ``python`` process. Collectives happen only between phases (barriers, a parameter
checksum, small reductions); the surrogate's gradients are all-reduced by DDP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs


class LaunchError(RuntimeError):
    """The processes are not set up the way they were launched."""


@dataclass
class Dist:
    accelerator: Accelerator
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """``obj`` from every rank, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init(device: str = "auto") -> Dist:
    """Start (or join) the process group.

    ``device``: auto = CUDA when available, else CPU. On CPU, several processes need
    ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...`` (or torchrun); a process
    that was launched as one of several (``WORLD_SIZE`` > 1) but ends up alone stops with
    :class:`LaunchError` instead of silently doing every rank's work.
    """
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise LaunchError("device=cuda but CUDA is not available on this machine")
    # Ranks reach the barriers at different times when shards are uneven; the default
    # gloo timeout (30 min) is too short for a shard of 10k samples on a slow rank.
    launched_as = int(os.environ.get("WORLD_SIZE", "1"))
    hint = (f"on CPU launch with 'ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {launched_as} ...' "
            f"or torchrun")
    try:
        acc = Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=6))])
    except (ValueError, RuntimeError) as e:
        if launched_as <= 1:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LaunchError(f"launched as one of {launched_as} processes (WORLD_SIZE={launched_as}) but no process group "
                          f"could start ({first}); {hint}") from None
    if launched_as > 1 and acc.num_processes != launched_as:
        raise LaunchError(
            f"launched as one of {launched_as} processes (WORLD_SIZE={launched_as}) but no process group formed "
            f"(this process would work as if alone); {hint}"
        )
    return Dist(acc, acc.process_index, acc.num_processes, acc.device)


def broadcast_buffers(model: torch.nn.Module, dist: Dist) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP syncs them
    at the start of each forward, but the last training forward leaves each rank with
    its own; the sample phase and the checkpoint must see one surrogate."""
    if dist.world > 1:
        for b in model.buffers():
            torch.distributed.broadcast(b.data, src=0)


def checksum(model: torch.nn.Module) -> float:
    """A float64 checksum of every parameter and buffer (sum of |x| weighted by
    position), to compare the surrogate across ranks."""
    total = torch.zeros((), dtype=torch.float64)
    for i, t in enumerate(model.state_dict().values()):
        if t.is_floating_point():
            total += (t.detach().double().abs().sum() * (1 + (i % 7))).cpu()
    return float(total)


def reduce_gradients(model: torch.nn.Module, dist: Dist, ranks: int) -> None:
    """Each parameter's gradient summed over the processes and divided by ``ranks``, as DDP
    averages them over ``ranks`` processes: for a process standing in for several of a run's
    ranks (its .grad holds their sum) or for none (no .grad: zeros). One all-reduce of one
    flat buffer. With at most two ranks' gradients this gives DDP's bits (a sum of two floats
    does not depend on their order; dividing by 1 or 2 is exact); with more, the order of the
    float sums differs from DDP's, and so may the last bits."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    if dist.world > 1:
        torch.distributed.all_reduce(flat)
    if ranks != 1:
        flat /= ranks
    at = 0
    for p in params:  # back in the parameter's own memory layout (channels-last tensors: fused AdamW reads it raw)
        n = p.numel()
        grad = p.grad if p.grad is not None else torch.empty_like(p)
        p.grad = grad.copy_(flat[at:at + n].view_as(p))
        at += n


def buffers_of(model: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of the model's buffers (BatchNorm running statistics), for :func:`set_buffers`."""
    return [b.detach().clone() for b in model.buffers()]


def set_buffers(model: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    for b, s in zip(model.buffers(), saved, strict=True):
        b.data.copy_(s)
