"""Evaluation commands under torchrun: one process group for the command, the work split, rank 0 reporting.

``torchrun --nproc_per_node=N -m dino.cli knn …`` starts N copies of the command. Each joins the process
group (NCCL on GPUs, gloo on the CPU), takes its ``LOCAL_RANK``'s GPU, extracts its block of every image
list (:mod:`dino.eval.sharding`) and receives all the features, in dataset order; what follows the
extraction (the k-NN vote, the probes, the scores) runs in every process on the same rows, and only the
first process logs below warnings, prints the table and writes files. ``dino train`` sets up its own
processes; the commands that have no extraction to split refuse a torchrun launch.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from dino.cli.arguments import MANY, ONE, device_from_args
from dino.train.distributed import cleanup, init_distributed


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def command_processes(args: argparse.Namespace) -> Iterator[None]:
    """Joins the torchrun process group for a command that splits its extraction (``processes=MANY``), for
    the time the command runs; refuses a torchrun launch of one that does not (``processes=ONE``)."""
    world_size, kind = launched_processes(), getattr(args, "processes", None)
    if world_size == 1 or kind is None:
        yield
        return
    if kind == ONE:
        raise ValueError(
            f"dino {args.command} runs in one process; launch it without torchrun (or with --nproc_per_node=1)"
        )
    assert kind == MANY
    device_from_args(args)  # a bad --device is refused here, named as the option
    env = init_distributed(getattr(args, "device", "auto"))
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield
    finally:
        cleanup()
