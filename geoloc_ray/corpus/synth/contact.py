"""A contact sheet of one location's views, for a human to check that the renders show what they should."""

from __future__ import annotations

import io as _io

import numpy as np
from PIL import Image, ImageDraw

from geoloc_ray import io
from geoloc_ray.config import PlatformRules
from geoloc_ray.corpus.records import platform_from_path
from geoloc_ray.corpus.synth.views import View


def sheet_from_views(views: list[View], title: str = "", scale: int = 2) -> Image.Image:
    """Tile views in rows by platform (satellite, drone, ground), each labelled with its file name."""
    rows: dict[str, list[View]] = {}
    for v in views:
        rows.setdefault(v.platform, []).append(v)
    size = views[0].pixels.shape[0] * scale
    cols = max(len(r) for r in rows.values())
    label_h, top = 12, 14
    sheet = Image.new("RGB", (cols * (size + 4) + 4, top + len(rows) * (size + label_h + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 1), title, fill=(0, 0, 0))
    for r, platform in enumerate(("satellite", "drone", "ground")):
        for c, v in enumerate(rows.get(platform, [])):
            x, y = 4 + c * (size + 4), top + r * (size + label_h + 4)
            tile = Image.fromarray(v.pixels).resize((size, size), Image.NEAREST)
            sheet.paste(tile, (x, y + label_h))
            draw.text((x, y), v.file_name, fill=(0, 0, 0))
    return sheet


def contact_sheet(out: str, location_id: str, sheet_path: str | None = None) -> str:
    """Render a PNG contact sheet of a written location (read back from `out`); returns where it went."""
    locations = io.read_json(io.join(out, "locations.json"))
    meta = locations[location_id]
    folder = io.join(out, "images", meta["split"], location_id)
    views = []
    for uri in io.listdir(folder):
        name = uri.rsplit("/", 1)[-1]
        platform = platform_from_path(f"{location_id}/{name}", PlatformRules())
        pixels = np.asarray(Image.open(_io.BytesIO(io.read_bytes(uri))).convert("RGB"))
        views.append(View(platform, 0, name, pixels, []))
    title = f"{location_id} ({meta['split']}): " + ", ".join(
        f"{k}={v}" for k, v in meta["attributes"].items() if k != "sides" and v not in (None, False))
    buf = _io.BytesIO()
    sheet_from_views(views, title).save(buf, format="PNG")
    sheet_path = sheet_path or io.join(out, f"contact_{location_id}.png")
    io.write_bytes(sheet_path, buf.getvalue())
    return sheet_path
