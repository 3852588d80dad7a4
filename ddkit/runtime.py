"""Where and as whom this process runs: the device, the torchrun rank, and a digest of a model's weights.

One copy of each, shared by training, labelling and evaluation (they used to disagree on ``LOCAL_RANK`` and on
the digest of the same weights).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from typing import Iterator

import torch
from torch import nn

from ddkit.errors import ConfigError

__all__ = ["dist_info", "join_process_group", "torchrun_group", "resolve_device", "state_sha256",
           "available_devices"]


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside an initialised torch.distributed group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def join_process_group(backend: str = "gloo") -> tuple[int, int, bool]:
    """``(rank, world_size, started_here)``: joins the torchrun group when ``WORLD_SIZE > 1``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    started = False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=12))
        started = True
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), started


def _init_distributed(device: str | None) -> bool:
    """Join the torchrun group when ``WORLD_SIZE > 1``: NCCL when the processes run on GPUs (one each), gloo when
    the recipe or ``--device`` says cpu. True when this call started it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    dev = resolve_device(device or "auto")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return True


@contextlib.contextmanager
def torchrun_group(device: str | None) -> Iterator[bool]:
    """A command's whole life in the torchrun group (``ddkit train``, ``ddkit run``): joined on entry, left on
    exit. The ranks meet once more before a normal exit, so that none tears gloo down while another is still in a
    collective (it aborts at exit). Yields whether the group was started here; one process: a no-op."""
    started = _init_distributed(device)
    try:
        yield started
        if started:
            torch.distributed.barrier()
    finally:
        if started:
            torch.distributed.destroy_process_group()


def available_devices() -> list[str]:
    """The device names this machine accepts (``auto``, ``cpu`` and one ``cuda:i`` per visible GPU)."""
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["auto", "cpu", *(["cuda"] if gpus else []), *gpus]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under torchrun) when there is one, else the CPU.

    A device this machine does not have (``cuda`` without a GPU, a typo such as ``gpu``) is a :class:`ConfigError`
    that lists the valid names, not a torch traceback.
    """
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(f"torchrun started local rank {local_rank} but only {count} GPU(s) are visible: run "
                              f"--nproc-per-node {count} (one process per GPU) or set run.device=cpu")
        return torch.device("cuda", local_rank)
    valid = available_devices()
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        dev = None
    ok = dev is not None and (dev.type == "cpu" or (dev.type == "cuda" and torch.cuda.is_available()
                                                     and (dev.index or 0) < torch.cuda.device_count()))
    if not ok:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ConfigError(f"run.device={device!r} is not a device of this machine ({gpus} GPU(s) visible); "
                          f"valid: {', '.join(valid)}")
    return dev


def state_sha256(model: nn.Module) -> str:
    """A sha256 of a model's weights (names and raw bytes, in name order): the same weights, the same digest."""
    model = getattr(model, "module", model)  # DDP
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()
