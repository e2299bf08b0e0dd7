"""Image corruptions for the robustness evaluation: blur, occlusion and noise at severities 1-3."""

from __future__ import annotations

import numpy as np

SEVERITY = {
    "blur": {1: 0.6, 2: 1.2, 3: 2.0},  # Gaussian sigma, in pixels of a 64 px image (scaled by size)
    "occlusion": {1: 0.15, 2: 0.3, 3: 0.45},  # fraction of the side covered by a grey square
    "noise": {1: 0.04, 2: 0.08, 3: 0.16},  # Gaussian noise std on [0, 1] pixels
}


def corrupt(pixels: np.ndarray, kind: str, severity: int, seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W, 3) -> corrupted copy; deterministic for a seed so every variant sees the same damage."""
    if kind not in SEVERITY or severity not in SEVERITY[kind]:
        raise ValueError(f"unknown corruption {kind!r} severity {severity!r}")
    level = SEVERITY[kind][severity]
    rng = np.random.default_rng(seed)
    if kind == "blur":
        return _blur(pixels, level * pixels.shape[1] / 64.0)
    if kind == "occlusion":
        return _occlude(pixels, level, rng)
    noisy = pixels.astype(np.float32) / 255.0 + rng.normal(0, level, pixels.shape).astype(np.float32)
    return (np.clip(noisy, 0, 1) * 255).round().astype(np.uint8)


def _blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    from PIL import Image, ImageFilter

    return np.stack([np.asarray(Image.fromarray(p).filter(ImageFilter.GaussianBlur(sigma))) for p in pixels])


def _occlude(pixels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    out = pixels.copy()
    h, w = pixels.shape[1:3]
    side = max(1, int(round(fraction * min(h, w))))
    for img in out:
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        img[y : y + side, x : x + side] = 128
    return out
