"""Multi-process runs under ``torchrun``: who am I, and wait for the others.

Recovery shards its batches across ranks (batch b goes to rank b mod world); every batch is
seeded by its index, so the result is bit-identical to a single-process run. Rank 0
assembles and publishes the stage output; the other ranks only contribute batches::

    torchrun --nproc_per_node 8 --no-python fadrm recover
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> None:
    """Join the process group torchrun set up (NCCL on GPUs, Gloo on CPUs); no-op alone."""
    if world_size() > 1 and not dist.is_initialized():
        if device.type == "cuda":  # this rank's GPU, bound before NCCL creates its communicator on it
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
