"""Per-image nuisance that keeps the task from being a colour lookup: light, colour cast, noise, JPEG.

Kept mild enough that a roof colour stays nameable (red does not turn orange), strong enough that no two
images of a location share pixel statistics.
"""

from __future__ import annotations

import io as _io

import numpy as np
from PIL import Image


def downsample(arr: np.ndarray, size: int) -> np.ndarray:
    """Box-filter the supersampled canvas to the output size (anti-aliasing for free)."""
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32)


def photometric(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, a slight colour cast, an illumination ramp and sensor noise."""
    h, w, _ = arr.shape
    mean = arr.mean()
    arr = (arr - mean) * rng.uniform(0.85, 1.15) + mean
    gain = rng.uniform(0.8, 1.2) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    angle, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.12)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = 1 + amp * ((xx / w - 0.5) * np.cos(angle) + (yy / h - 0.5) * np.sin(angle))
    arr = arr * gain * ramp[..., None]
    arr = arr + rng.standard_normal(arr.shape, dtype=np.float32) * rng.uniform(2.0, 6.0)
    return np.clip(arr, 0, 255).astype(np.uint8)


def encode_jpeg(arr: np.ndarray, rng: np.random.Generator) -> bytes:
    """JPEG at a random quality (real corpora mix compression levels); deterministic for given pixels."""
    buf = _io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(rng.integers(82, 96)))
    return buf.getvalue()
