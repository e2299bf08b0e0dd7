"""ExpertHead deployment: one platform's text head t_k on trunk outputs computed by the QueryEncoder.

Each expert replica loads only its own head (`load_head`), not the trunks. `@serve.batch` pads concurrent
trunk outputs into one head pass. A `fail` flag in user_config makes it raise: a fault-injection drill for
the ingress's degraded answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray import serve

from geoloc_ray import io
from geoloc_ray.serve.fanout import ExpertVector


def stack_trunks(trunks: Sequence[Any]) -> Any:
    """One batched TextTrunkOutput from single-query ones of different lengths (zero padding, mask 0)."""
    import torch

    from geoloc_ray.model.outputs import TextTrunkOutput

    length = max(t.hidden.shape[1] for t in trunks)
    hidden = torch.zeros(len(trunks), length, trunks[0].hidden.shape[2], dtype=trunks[0].hidden.dtype)
    mask = torch.zeros(len(trunks), length, dtype=trunks[0].attention_mask.dtype)
    for i, t in enumerate(trunks):
        n = t.hidden.shape[1]
        hidden[i, :n] = t.hidden[0]
        mask[i, :n] = t.attention_mask[0]
    return TextTrunkOutput(hidden=hidden, attention_mask=mask, pooled=torch.cat([t.pooled for t in trunks]))


class InjectedFailure(RuntimeError):
    """Raised while user_config `fail: true` is set (fault-injection drill)."""


@serve.deployment
class ExpertHead:
    def __init__(self, platform: str, model_uri: str, storage: dict, device: str = "cpu",
                 torch_threads: int = 1, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01):
        import torch

        from geoloc_ray.model import load_head, read_manifest

        io.use_storage_options(storage)
        torch.set_num_threads(torch_threads)
        self.platform = platform
        self.device = device
        self.model_version = read_manifest(model_uri)["model_version"]
        self.head = load_head(model_uri, platform, device=device)
        self.fail = False
        self.embed.set_max_batch_size(max_batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def reconfigure(self, user_config: dict | None) -> None:
        self.fail = bool((user_config or {}).get("fail", False))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed(self, trunks: list[Any]) -> list[ExpertVector]:
        import torch

        if self.fail:
            raise InjectedFailure(f"expert {self.platform}: failing on purpose (user_config fail: true)")
        with torch.inference_mode():
            vectors = self.head.text(stack_trunks(trunks).to(self.device)).float().cpu().numpy()
        return [ExpertVector(self.platform, v, self.model_version) for v in vectors]

    def info(self) -> dict:
        return {"platform": self.platform, "model_version": self.model_version, "fail": self.fail}
