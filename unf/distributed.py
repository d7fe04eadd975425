"""torch.distributed helpers shared by every use that runs under ``torchrun`` (gloo on CPU, nccl on CUDA)."""
from __future__ import annotations

import os


def init_distributed(device: str = "cpu") -> bool:
    """Join the process group when started by ``torchrun`` (gloo on CPU, nccl on CUDA); False when run alone."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    return True


def dist_info():
    """``(torch.distributed or None, rank, world_size)``: ``None, 0, 1`` when no process group is running."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1
