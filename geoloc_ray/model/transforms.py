"""A tower's input preprocessing: resize to its image size, scale to [0, 1], normalise with its mean/std.

open_clip gives mean/std per tower (and per pretrained tag); the model carries them in `preprocess_cfg` and the
checkpoint manifest records them, so indexing and serving get the same transform without rebuilding the model.
Batched tensor ops (no PIL per image) so it runs inside Ray Data `map_batches` over uint8 arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from geoloc_ray.devices import to_device

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _pair(size: Any) -> int:
    return int(size[0] if isinstance(size, (list, tuple)) else size)


@dataclass(frozen=True)
class ImagePreprocess:
    size: int
    mean: tuple[float, float, float] = _OPENAI_MEAN
    std: tuple[float, float, float] = _OPENAI_STD
    interpolation: str = "bilinear"

    @classmethod
    def from_cfg(cls, preprocess_cfg: dict, size: int | None = None) -> ImagePreprocess:
        """From open_clip's preprocess config (the model's `preprocess_cfg` or a manifest's `preprocess`)."""
        interp = preprocess_cfg.get("interpolation", "bilinear")
        return cls(
            size=_pair(size or preprocess_cfg.get("size", 224)),
            mean=tuple(preprocess_cfg.get("mean", _OPENAI_MEAN)),
            std=tuple(preprocess_cfg.get("std", _OPENAI_STD)),
            interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
        )

    def to_unit(self, images: Any) -> torch.Tensor:
        """uint8 (N, H, W, 3) array or tensor (any device) / list of HWC arrays or PIL images / float NCHW -> float NCHW
        in [0, 1] at size, on the input's device."""
        if isinstance(images, torch.Tensor) and images.dtype != torch.uint8:
            x = images.float()
        else:
            if not isinstance(images, (np.ndarray, torch.Tensor)):
                return torch.cat([self.to_unit(np.asarray(img)[None]) for img in images]) if len(images) else (
                    torch.zeros(0, 3, self.size, self.size))
            # A uint8 tensor may already be on the GPU (the embedding actors and train steps copy uint8 across
            # and normalise there: a quarter of float32's bytes over PCIe, and no CPU time on the conversion).
            arr = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(images))
            x = arr.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] != 3:
            raise ValueError(f"expected RGB images with 3 channels, got shape {tuple(x.shape)}")
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode=self.interpolation,
                              antialias=self.interpolation != "nearest", align_corners=None)
            x = x.clamp_(0.0, 1.0)
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, images: Any, augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 augment_mask: Sequence[bool] | np.ndarray | None = None) -> torch.Tensor:
        """Model input (N, 3, size, size); `augment` (e.g. SatelliteAugment) runs on the masked images only."""
        x = self.to_unit(images)
        if augment is not None:
            # row indices from the host mask: a boolean index on a GPU tensor would wait for the GPU to count it
            rows = np.arange(len(x)) if augment_mask is None else np.flatnonzero(np.asarray(augment_mask, dtype=bool))
            if len(rows):
                index = to_device(torch.as_tensor(rows), x.device)
                x[index] = augment(x[index])
        return self.normalize(x)


def image_preprocess(source: Any) -> ImagePreprocess:
    """The preprocessing of a model (GeoLocModel) or of a checkpoint manifest (dict)."""
    if isinstance(source, dict):
        size = source.get("model_config", {}).get("image", {}).get("image_size")
        return ImagePreprocess.from_cfg(source.get("preprocess") or {}, size)
    return ImagePreprocess.from_cfg(source.preprocess_cfg, source.model_cfg.image.image_size)
