"""Ray Train's torch process group for the config's `device`, checked on every worker before it is set up.

Ray picks NCCL whenever workers hold GPUs; NCCL needs CUDA. With `device: cpu` the workers compute on the CPU
(GPU requests kept, e.g. a rehearsal on nodes that declare GPUs they lack), so the group is gloo. Otherwise
every worker resolves `device` first: a GPU worker without CUDA then fails with the message naming the key,
not with NCCL's "no GPUs found" from inside Ray's setup. Imported inside functions: it imports Ray Train.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.train.torch import TorchConfig

from geoloc_ray.devices import resolve_device

_TorchBackend = TorchConfig().backend_cls  # Ray's own torch backend (its class is private)


class DeviceCheckedBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: DeviceTorchConfig):
        worker_group.execute(resolve_device, backend_config.device)  # raises DeviceError on a worker: run fails
        super().on_start(worker_group, backend_config)


@dataclass
class DeviceTorchConfig(TorchConfig):
    """TorchConfig + the config's `device`, resolved on every worker before the process group."""

    device: str = "auto"

    @property
    def backend_cls(self):
        return DeviceCheckedBackend


def torch_config(device: str, use_gpu: bool) -> DeviceTorchConfig:
    """gloo when the workers compute on the CPU (`device: cpu`, or no GPU asked for); else Ray's choice (NCCL)."""
    backend = "gloo" if device == "cpu" or not use_gpu else None
    return DeviceTorchConfig(backend=backend, device=device)
