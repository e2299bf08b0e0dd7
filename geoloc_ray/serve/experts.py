"""ExpertHead deployment: one platform's text head t_k on trunk outputs computed by the QueryEncoder.

Each expert replica loads only its own head (`load_head`), not the trunks. `@serve.batch` pads concurrent
trunk outputs into one head pass. A `fail` flag in user_config makes it raise: a fault-injection drill for
the ingress's degraded answers.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from geoloc_ray import io
from geoloc_ray.serve.fanout import ExpertVector


class InjectedFailure(RuntimeError):
    """Raised while user_config `fail: true` is set (fault-injection drill)."""


@serve.deployment
class ExpertHead:
    def __init__(self, platform: str, model_uri: str, storage: dict, device: str = "auto",
                 torch_threads: int = 1, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01):
        import torch

        from geoloc_ray.devices import resolve_device
        from geoloc_ray.model import load_head, read_manifest

        io.use_storage_options(storage)
        torch.set_num_threads(torch_threads)
        self.platform = platform
        self.device = resolve_device(device)
        self.model_version = read_manifest(model_uri)["model_version"]
        self.head = load_head(model_uri, platform, device=self.device)
        self.fail = False
        self.embed.set_max_batch_size(max_batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def reconfigure(self, user_config: dict | None) -> None:
        self.fail = bool((user_config or {}).get("fail", False))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed(self, trunks: list[Any]) -> list[ExpertVector]:
        import torch

        from geoloc_ray.model.outputs import TextTrunkOutput

        if self.fail:
            raise InjectedFailure(f"expert {self.platform}: failing on purpose (user_config fail: true)")
        with torch.inference_mode():
            vectors = self.head.text(TextTrunkOutput.cat(trunks).to(self.device)).float().cpu().numpy()
        return [ExpertVector(self.platform, v, self.model_version) for v in vectors]

    def info(self) -> dict:
        return {"platform": self.platform, "model_version": self.model_version, "fail": self.fail}
