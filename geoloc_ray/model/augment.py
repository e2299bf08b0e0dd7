"""Satellite augmentation (the report's): random 90-degree rotations, flips, brightness/contrast jitter.

Satellite views are north-up by convention but a query never says which way is up, and overhead scenes look
plausible in any orientation; drone and ground views are not augmented this way (their "up" is the sky).
Works on float images in [0, 1] (before normalisation), one image (3, H, W) or a batch (N, 3, H, W).
"""

from __future__ import annotations

import torch

from geoloc_ray.config import AugmentConfig


class SatelliteAugment:
    """Callable transform; a seeded generator makes a worker's augmentation stream reproducible."""

    def __init__(self, cfg: AugmentConfig | None = None, seed: int | None = None):
        self.cfg = cfg or AugmentConfig()
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else int(torch.seed() % 2**63))

    def _uniform(self, n: int, spread: float) -> torch.Tensor:
        return 1.0 + (torch.rand(n, generator=self.generator) * 2 - 1) * spread

    def _geometry(self, img: torch.Tensor) -> torch.Tensor:
        square = img.shape[-1] == img.shape[-2]
        if self.cfg.rotate90:
            # A non-square image keeps its shape: only the half turn is allowed.
            k = int(torch.randint(4, (1,), generator=self.generator)) if square else 2 * int(
                torch.randint(2, (1,), generator=self.generator))
            img = torch.rot90(img, k, dims=(-2, -1))
        if self.cfg.flip:
            if bool(torch.rand(1, generator=self.generator) < 0.5):
                img = img.flip(-1)
            if bool(torch.rand(1, generator=self.generator) < 0.5):
                img = img.flip(-2)
        return img

    def _photometric(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        b = self._uniform(n, self.cfg.brightness).to(x).view(n, 1, 1, 1)
        c = self._uniform(n, self.cfg.contrast).to(x).view(n, 1, 1, 1)
        x = x * b
        # Contrast around each image's mean grey level, as torchvision's adjust_contrast does.
        grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(-2, -1)).view(n, 1, 1, 1)
        return ((x - grey) * c + grey).clamp_(0.0, 1.0)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.cfg.enabled:
            return images
        single = images.dim() == 3
        x = images.unsqueeze(0) if single else images
        dtype = x.dtype
        x = x.float() / 255.0 if dtype == torch.uint8 else x
        x = torch.stack([self._geometry(img) for img in x])
        if self.cfg.brightness > 0 or self.cfg.contrast > 0:
            x = self._photometric(x)
        x = (x * 255.0).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
        return x[0] if single else x
