"""Distributed setup for ``torchrun``: gloo on CPU, NCCL on CUDA (one GPU per process); nothing when run as a single
process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def backend_for(device: str = "auto") -> str:
    """The process-group backend for a training ``device`` (the config key): NCCL when the run trains on CUDA, one
    GPU per process; gloo on CPU. More processes on a node than it has GPUs is an error, not an NCCL hang."""
    from leukoscope.train.trainer import training_device

    if training_device(device).type != "cuda":
        return "gloo"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if local_world > torch.cuda.device_count():
        raise ValueError(f"torchrun started {local_world} processes on this node but it has "
                         f"{torch.cuda.device_count()} CUDA GPU(s); NCCL needs one GPU per process: use "
                         f"--nproc_per_node={torch.cuda.device_count()}, or train on CPU with --set device=cpu")
    return "nccl"


@contextlib.contextmanager
def distributed_context(device: str = "auto") -> Iterator[int]:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); yields this process's rank.
    ``device`` is the config's training device (see :func:`backend_for`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield dist.get_rank() if dist.is_initialized() else 0
        return
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        yield dist.get_rank()
    finally:
        dist.barrier()
        dist.destroy_process_group()
