"""Process-group setup from the torchrun environment; one process on one device is the default case."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dino.devices import resolve_device


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto", timeout_minutes: float = 60.0) -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and join the process group when > 1; a
    collective fails after ``timeout_minutes`` of waiting for the other processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(minutes=timeout_minutes)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart == 0:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
        else:
            # torchrun restarted the group (--max-restarts): its store, kept across restarts, still holds
            # the addresses the previous group's processes published, which a new process can read before
            # its peer has replaced them (gloo then connects to a dead port). A namespace per restart.
            store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
            dist.init_process_group(
                backend=backend, store=dist.PrefixStore(f"dino-restart-{restart}/", store), rank=rank,
                world_size=world_size, timeout=timeout,
            )  # fmt: skip
    return DistEnv(rank, world_size, local_rank, device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def max_over_processes_(value: torch.Tensor) -> torch.Tensor:
    """``value`` ← its maximum over all processes, in place (queued on its device: no host wait);
    unchanged in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def any_process(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True when ``flag`` is true on at least one process, so that all processes take the same branch."""
    return any_processes([flag], device)[0]


def any_processes(flags: Sequence[bool | torch.Tensor], device: torch.device) -> list[bool]:
    """For each flag (a bool, or a one-element tensor on any device), True when it is true on at least one
    process: several decisions agreed on with one collective (and one host synchronisation)."""
    value = torch.stack(
        [f.detach().float().reshape(()).to(device) if isinstance(f, torch.Tensor) else torch.tensor(float(f), device=device)
         for f in flags]
    )  # fmt: skip
    return [v > 0 for v in max_over_processes_(value).tolist()]
