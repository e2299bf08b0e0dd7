"""Image loading that never stops a run: a missing or corrupt image becomes a reason or a skipped row, not an
exception. `prepare` checks every image once; training and embedding decode pixels with the same rules."""

from __future__ import annotations

import io as _pyio
import logging

import numpy as np

from geoloc_ray import io

log = logging.getLogger(__name__)


def load_image(uri: str, size: int | None = None):
    """Decode an image (any fsspec URI) as RGB; raises on a missing or corrupt file."""
    from PIL import Image

    with Image.open(_pyio.BytesIO(io.read_bytes(uri))) as im:
        if size is not None:
            # A JPEG at least twice the target decodes at 1/2, 1/4 or 1/8 scale in the DCT (never below `size`):
            # 1024 -> 384 px took 1.9x less CPU than a full decode (bench/decode_rate.py).
            im.draft("RGB", (size, size))
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return im


def image_problem(uri: str) -> str | None:
    """Why the image can't be used (None when it decodes fully)."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = io.read_bytes(uri)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable: {exc}"
    if not data:
        return "corrupt: empty file"
    try:
        with Image.open(_pyio.BytesIO(data)) as im:
            im.verify()
        with Image.open(_pyio.BytesIO(data)) as im:  # verify() does not decode pixels: load them too
            im.load()
            if im.size[0] < 2 or im.size[1] < 2:
                return f"corrupt: degenerate size {im.size}"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"corrupt: {exc}"
    return None


def decode_pixels(uris, size: int) -> tuple[np.ndarray, list[bool]]:
    """(N, size, size, 3) uint8 and which rows decoded; a file broken since `prepare` is skipped, not fatal."""
    out = np.zeros((len(uris), size, size, 3), dtype=np.uint8)
    ok = []
    for i, uri in enumerate(uris):
        try:
            out[i] = np.asarray(load_image(str(uri), size))
            ok.append(True)
        except Exception as exc:  # noqa: BLE001 - any decode failure is reported and skipped
            log.warning("skipping undecodable image %s: %s", uri, exc)
            ok.append(False)
    return out, ok
