"""Distributed setup for ``torchrun``: gloo on CPU, NCCL on CUDA; nothing when run as a single process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


@contextlib.contextmanager
def distributed_context() -> Iterator[int]:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); yields this process's rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield dist.get_rank() if dist.is_initialized() else 0
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        yield dist.get_rank()
    finally:
        dist.barrier()
        dist.destroy_process_group()
