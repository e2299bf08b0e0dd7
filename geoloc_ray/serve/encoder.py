"""QueryEncoder deployment: the shared text trunk + the gate, run once per query for all experts.

`@serve.batch` groups concurrent queries into one trunk pass; each answer carries its own trunk output
(`TextTrunkOutput.split`: padding trimmed) to the expert deployments.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from geoloc_ray import artifacts, io
from geoloc_ray.serve.fanout import EncodedQuery


def own_storage(trunk: Any) -> Any:
    """A copy that owns its tensors: a slice of the batch would pickle the whole batch's storage."""
    from dataclasses import fields, replace

    return replace(trunk, **{f.name: getattr(trunk, f.name).cpu().clone() for f in fields(trunk)})


@serve.deployment
class QueryEncoder:
    """Loads the checkpoint without heads: text trunk + gate only (the image trunk is dropped)."""

    def __init__(self, model_uri: str, storage: dict, device: str = "auto", torch_threads: int = 1,
                 max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01):
        import torch

        from geoloc_ray.devices import resolve_device
        from geoloc_ray.model import load_model

        io.use_storage_options(storage)
        torch.set_num_threads(torch_threads)
        model = load_model(model_uri, device=resolve_device(device), heads=[]).eval()
        if model.gate is None:
            raise ValueError(f"{model_uri}: this model has no gate; serve the assembled PE-MoE model "
                             f"(model: {artifacts.MOE}, the default)")
        # Queries never touch the image trunk: free its memory (EVA-L is ~1 GB in production).
        model.image_trunk = torch.nn.Identity()
        self.model = model
        self.model_version = model.manifest["model_version"]
        self.encode.set_max_batch_size(max_batch_size)
        self.encode.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def encode(self, queries: list[str]) -> list[EncodedQuery]:
        import torch

        with torch.inference_mode():
            trunk = self.model.text_trunk_output(queries)
            gate = self.model.gate(trunk).cpu()
        platforms = list(self.model.platforms)
        return [EncodedQuery(own_storage(part), g.tolist(), platforms, self.model_version)
                for part, g in zip(trunk.split(), gate, strict=True)]

    def info(self) -> dict:
        return {"model_version": self.model_version, "platforms": list(self.model.platforms)}
