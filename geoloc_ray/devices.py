"""Which device a process computes on: the config's `device` (auto / cuda / cpu) against what Ray assigned and
what torch sees. One rule for train workers, embedding actors, Serve replicas and the caption model.

`cpu` keeps every resource request as configured (GPU requests included) but computes on the CPU: a rehearsal on
nodes that declare GPUs they do not have runs production's requests that way. A worker Ray gave a GPU that torch
cannot see fails at once under `auto` / `cuda`, naming the key, instead of failing later inside CUDA or NCCL.
"""

from __future__ import annotations

import sys
from typing import get_args

from geoloc_ray.config.loading import DeviceChoice

DEVICE_CHOICES: tuple[str, ...] = get_args(DeviceChoice)


class DeviceError(RuntimeError):
    """The config's `device` cannot be honoured in this process; the message says why and what to set."""


def ray_gpus_assigned() -> bool | None:
    """In a Ray worker (task, actor, replica): whether Ray assigned it a GPU. None outside one (a driver, a plain
    process), where nobody assigned anything."""
    ray = sys.modules.get("ray")  # imported by any Ray worker; never imported here just to ask
    if ray is None or not ray.is_initialized():
        return None
    if ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return bool(ray.get_gpu_ids())


def ray_withheld_gpus() -> bool:
    """True in a Ray worker that was assigned no GPU. Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for such
    workers, so torch and faiss would still see the node's GPUs (another worker's)."""
    return ray_gpus_assigned() is False


def pick_device(choice: str, gpu_assigned: bool | None, cuda_visible: bool) -> str:
    """The decision table, pure: `gpu_assigned` is None outside a Ray worker."""
    if choice not in DEVICE_CHOICES:
        raise DeviceError(f"device: {choice!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if choice == "cpu":
        return "cpu"
    if gpu_assigned is False:  # a Ray worker given no GPU: any GPU it sees belongs to another worker
        if choice == "cuda":
            raise DeviceError("device: cuda, but Ray assigned this worker no GPU: request one (train.use_gpu, "
                              "index.actors.num_gpus, serve.num_gpus, refine.actors.num_gpus) or set `device: auto`")
        return "cpu"
    if cuda_visible:
        return "cuda"
    if gpu_assigned:
        raise DeviceError(f"device: {choice}, and Ray assigned this worker a GPU, but torch sees no CUDA device "
                          "(a node that declares a GPU it does not have, or a broken driver). Set `device: cpu` to "
                          "compute on the CPU with the same resource requests, or fix the node.")
    if choice == "cuda":
        raise DeviceError("device: cuda, but torch sees no CUDA device here: set `device: auto` or `cpu`")
    return "cpu"


def resolve_device(choice: str = "auto") -> str:
    """"cuda" or "cpu" for this process, from `choice` (the config's `device`). Which CUDA device is Ray's
    business: it sets CUDA_VISIBLE_DEVICES for actors and tasks; a Ray Train worker asks `get_device()`.
    `cpu` never initialises CUDA."""
    if choice == "cpu":
        return "cpu"
    import torch

    return pick_device(choice, ray_gpus_assigned(), torch.cuda.is_available())


def to_device(x, device):
    """A host tensor on `device`: on CUDA through pinned (page-locked) memory with a non-blocking copy, so the host
    does not wait for the transfer and the copy overlaps queued GPU work; elsewhere as is (`.to`, a no-op on the
    CPU). Takes torch tensors; torch is the caller's import."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
