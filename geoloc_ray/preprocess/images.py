"""Image loading that never stops a run: a missing or corrupt image becomes a reason, not an exception."""

from __future__ import annotations

import io as _pyio

from geoloc_ray import io


def load_image(uri: str, size: int | None = None):
    """Decode an image (any fsspec URI) as RGB; raises on a missing or corrupt file."""
    from PIL import Image

    with Image.open(_pyio.BytesIO(io.read_bytes(uri))) as im:
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
