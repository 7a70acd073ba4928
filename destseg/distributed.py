"""torchrun: the process group and collectives (used by data-parallel training and by sharded ``predict``),
and training's stage-long DistributedDataParallel wrapping. Every function is a no-op in a single process."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """Process group facts. Under torchrun (WORLD_SIZE > 1) training is data-parallel: --batch-size is the
    GLOBAL batch, each process takes batch_size / world_size samples of every step's batch."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), local_rank, dist.get_world_size())


def all_reduce(values: list[float], d: Dist) -> list[float]:
    """The sums of ``values`` over all processes."""
    if not d.active:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        dist.barrier()


def ddp_children(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The children of ``model`` that a stage has wrapped in DistributedDataParallel, by attribute name."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return {name: child for name, child in model.named_children() if isinstance(child, DDP)}


@contextlib.contextmanager
def ddp_stage(model: torch.nn.Module, stage, device: torch.device, d: Dist):
    """Under torchrun, for the length of a stage: the stage's trainable children of ``model`` replaced by
    DistributedDataParallel wrappers (BatchNorm statistics stay local), the plain children put back
    afterwards. A no-op in a single process."""
    if d.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        for name, child in list(model.named_children()):
            if any(child is m for m in stage.train_modules):
                setattr(model, name, DDP(child, device_ids=[device.index] if device.type == "cuda" else None))
    try:
        yield
    finally:
        for name, ddp in ddp_children(model).items():
            setattr(model, name, ddp.module)


def unwrapped_state(model: torch.nn.Module) -> dict:
    """The weights on the CPU, under the plain module names even while a stage is DDP-wrapped."""
    wrapped = ddp_children(model)
    for name, ddp in wrapped.items():
        setattr(model, name, ddp.module)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for name, ddp in wrapped.items():
        setattr(model, name, ddp)
    return state
