"""Feature extraction split across the processes of a torchrun launch, gathered back in dataset order.

When ``torch.distributed`` is initialised with more than one process, every process runs the same
extraction over the same list of images: process ``r`` of ``W`` takes the contiguous block of positions
``[r·N//W, (r+1)·N//W)`` (:func:`process_block`), and :func:`gather_rows` hands every process the blocks'
rows concatenated in rank order, which is dataset order. Blocks differ in length by at most one image and
are never padded with repeats, so no row is duplicated or dropped, whatever ``N`` is; an image that does not
decode is missing from its block alone. In one process both are the identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def process_share() -> tuple[int, int]:
    """``(rank, world_size)`` of this process in the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True in the process that prints and writes files (rank 0, or the only process)."""
    return process_share()[0] == 0


def block_of(count: int, rank: int, world_size: int) -> range:
    """Process ``rank``'s positions among ``count``: a contiguous block; the blocks in rank order tile
    ``range(count)``, and their lengths differ by at most one."""
    return range(rank * count // world_size, (rank + 1) * count // world_size)


def process_block(count: int) -> range:
    """The positions among ``count`` that this process handles (:func:`block_of`)."""
    return block_of(count, *process_share())


def my_share(items: Sequence[T]) -> list[T]:
    """This process's block of ``items`` (all of them in one process)."""
    return [items[i] for i in process_block(len(items))]


def _communication_device() -> torch.device:
    """Where collectives take their tensors: this process's GPU under NCCL, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


GATHER_CHUNK_BYTES = 256 * 2**20
"""Most bytes one collective of :func:`gather_rows` moves per process: ImageNet's features go in pieces, not
as one padded copy per process on every GPU."""


def gather_rows(rows: Tensor, chunk_bytes: int = GATHER_CHUNK_BYTES) -> Tensor:
    """Every process's ``rows`` ([n_r, ...], n_r may differ, even be 0), concatenated in rank order, in every
    process, on ``rows``' device. The trailing shape and dtype are taken from the processes that have rows (a
    process without any may pass ``torch.empty(0)``); they must agree among those. The rows travel in pieces
    of at most ``chunk_bytes`` per process."""
    rank, world = process_share()
    if world == 1:
        return rows
    shapes: list[tuple[int, tuple[int, ...], str] | None] = [None] * world
    dist.all_gather_object(shapes, (rows.shape[0], tuple(rows.shape[1:]), str(rows.dtype)))
    described = [s for s in shapes if s is not None and s[0] > 0]
    if not described:
        return rows
    tails = {(tail, dtype) for _, tail, dtype in described}
    if len(tails) > 1:
        raise ValueError(f"processes computed rows of different shapes or types: {sorted(tails)}")
    tail = described[0][1]
    dtype = getattr(torch, described[0][2].removeprefix("torch."))
    sizes = [s[0] if s is not None else 0 for s in shapes]
    row_bytes = max(1, math.prod(tail) * torch.empty((), dtype=dtype).element_size())
    step = max(1, chunk_bytes // row_bytes)
    device = _communication_device()
    pieces: list[list[Tensor]] = [[] for _ in range(world)]
    for begin in range(0, max(sizes), step):
        end = min(begin + step, max(sizes))
        chunk = torch.zeros((end - begin, *tail), dtype=dtype, device=device)
        if sizes[rank] > begin:
            chunk[: min(end, sizes[rank]) - begin] = rows[begin:end].to(device)
        parts = [torch.empty_like(chunk) for _ in range(world)]
        dist.all_gather(parts, chunk)
        for owner, part in enumerate(parts):
            if sizes[owner] > begin:
                pieces[owner].append(part[: min(end, sizes[owner]) - begin].to(rows.device))
    return torch.cat([piece for owned in pieces for piece in owned])
