"""Street-level render: standing on the street (the road side when there is one), facing one facade.

What is visible is what a pedestrian sees: facade colour, window style, the number of floors, sky, the
pavement and road, trees in front. The roof is at most a thin neutral edge: its colour is never drawn.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from geoloc_ray.corpus.synth.scene import FLOOR_H, Scene
from geoloc_ray.corpus.synth.windows import window_rects
from geoloc_ray.corpus.synth.world import FACADE_COLOURS, SIDES, Location

_GLASS = (48, 66, 90)
_ROOF_EDGE = (58, 58, 62)
_TREE_GREENS = ((38, 92, 40), (46, 104, 44), (32, 80, 38))
_STREET_CARS = ((225, 225, 225), (40, 40, 44), (150, 152, 158), (60, 70, 110))


def _tint(rgb, k: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * k))) for c in rgb)


def _sky(draw: ImageDraw.ImageDraw, n: int, horizon: int, rng: np.random.Generator) -> None:
    top, low = (((96, 150, 214), (176, 204, 232)) if rng.random() < 0.7
                else ((166, 174, 186), (206, 210, 214)))
    for y in range(horizon + 1):
        t = y / max(horizon, 1)
        draw.line([(0, y), (n, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, low, strict=True)))
    for _ in range(int(rng.integers(0, 3))):
        cx, cy, r = rng.uniform(0, n), rng.uniform(0, horizon * 0.5), rng.uniform(0.05, 0.12) * n
        draw.ellipse([cx - 2 * r, cy - r * 0.6, cx + 2 * r, cy + r * 0.6], fill=(236, 238, 240))


def _background_blocks(draw: ImageDraw.ImageDraw, n: int, base: int, rng: np.random.Generator) -> None:
    """Distant buildings in hazy greys: distractors that carry no attribute of the location."""
    for _ in range(int(rng.integers(0, 4))):
        x, w, h = rng.uniform(-0.1, 1.0) * n, rng.uniform(0.1, 0.3) * n, rng.uniform(0.15, 0.45) * n
        g = int(rng.uniform(150, 190))
        draw.rectangle([x, base - h, x + w, base], fill=(g, g + 4, g + 10))


def _street(draw: ImageDraw.ImageDraw, n: int, base: int, road: bool, rng: np.random.Generator) -> None:
    g = int(rng.uniform(160, 184))
    draw.rectangle([0, base, n, n], fill=(g, g - 2, g - 8))
    if not road:
        return
    top = int(base + rng.uniform(0.07, 0.12) * n)
    draw.rectangle([0, top - max(2, n // 60), n, top], fill=(200, 198, 192))  # kerb
    draw.rectangle([0, top, n, n], fill=(78, 78, 82))
    y, dash = top + (n - top) * rng.uniform(0.45, 0.65), n * 0.12
    for x in np.arange(rng.uniform(-dash, 0), n, 2 * dash):
        draw.rectangle([x, y, x + dash, y + max(2, n // 70)], fill=(232, 232, 226))
    if rng.random() < 0.5:
        _car(draw, rng.uniform(0.1, 0.9) * n, top + 0.1 * n, rng.uniform(0.25, 0.32) * n, rng)


def _car(draw: ImageDraw.ImageDraw, cx: float, bottom: float, w: float, rng: np.random.Generator) -> None:
    """A side view of a car: body, cabin with windows, two wheels."""
    body = _STREET_CARS[int(rng.integers(len(_STREET_CARS)))]
    h = 0.32 * w
    draw.rounded_rectangle([cx - w / 2, bottom - h, cx + w / 2, bottom - 0.12 * w], radius=w / 14, fill=body)
    draw.polygon([(cx - 0.3 * w, bottom - h), (cx - 0.18 * w, bottom - 1.55 * h), (cx + 0.2 * w, bottom - 1.55 * h),
                  (cx + 0.32 * w, bottom - h)], fill=body)
    draw.polygon([(cx - 0.24 * w, bottom - h), (cx - 0.15 * w, bottom - 1.45 * h), (cx + 0.17 * w, bottom - 1.45 * h),
                  (cx + 0.26 * w, bottom - h)], fill=(70, 88, 108))
    for wx in (cx - 0.3 * w, cx + 0.3 * w):
        draw.ellipse([wx - 0.1 * w, bottom - 0.2 * w, wx + 0.1 * w, bottom], fill=(28, 28, 30))


def _windows(draw, rng, style: str, floors: int, length: float, to_px) -> None:
    for s0, z0, s1, z1 in window_rects(length, floors * FLOOR_H, floors, style):
        quad = [to_px(s0, z0), to_px(s1, z0), to_px(s1, z1), to_px(s0, z1)]
        draw.polygon(quad, fill=_tint(_GLASS, rng.uniform(0.8, 1.5)))


def _facade(draw, loc: Location, rng, box: tuple[float, float, float], length: float, base: int) -> list[float]:
    """Draw the facade (and maybe a receding side wall); returns its pixel box [x0, y0, x1, y1]."""
    x0, k, n = box  # left edge in px, px per world unit, canvas size
    height = loc.floors * FLOOR_H * k
    x1, top = x0 + length * k, base - height
    wall = FACADE_COLOURS[loc.facade_colour]
    extent = [x0, top, x1, base]
    if rng.random() < 0.6:  # a second wall receding in perspective, left or right
        sw, dt, db = rng.uniform(0.08, 0.2) * n, rng.uniform(0.04, 0.1) * n, rng.uniform(0.01, 0.03) * n
        edge, sign = (x1, 1) if rng.random() < 0.5 else (x0, -1)
        side_len = rng.uniform(0.3, 0.6)

        def side_px(s, z, edge=edge, sign=sign, sw=sw, dt=dt, db=db, side_len=side_len):
            f = s / side_len
            yb, yt = base - f * db, top + f * dt
            return (edge + sign * f * sw, yb - z / (loc.floors * FLOOR_H) * (yb - yt))

        draw.polygon([side_px(0, 0), side_px(side_len, 0), side_px(side_len, loc.floors * FLOOR_H),
                      side_px(0, loc.floors * FLOOR_H)], fill=_tint(wall, 0.74))
        _windows(draw, rng, loc.windows, loc.floors, side_len, side_px)
        extent = [min(x0, edge - sw), top, max(x1, edge + sw), base]
    draw.rectangle([x0, top, x1, base], fill=wall)
    _windows(draw, rng, loc.windows, loc.floors, length, lambda s, z: (x0 + s * k, base - z * k))
    fh = FLOOR_H * k
    door_x = x0 + (x1 - x0) * rng.uniform(0.3, 0.7)
    draw.rectangle([door_x - 0.3 * fh, base - 0.85 * fh, door_x + 0.3 * fh, base], fill=(70, 56, 46))
    if top > 0:
        draw.rectangle([x0 - 2, top - max(2, n // 50), x1 + 2, top + 1], fill=_ROOF_EDGE)
    return extent


def _tree(draw: ImageDraw.ImageDraw, n: int, base: int, rng: np.random.Generator) -> None:
    x, y = rng.uniform(0.05, 0.95) * n, base + rng.uniform(0.0, 0.08) * n
    trunk, r = rng.uniform(0.15, 0.3) * n, rng.uniform(0.09, 0.15) * n
    draw.rectangle([x - n / 90, y - trunk, x + n / 90, y], fill=(88, 64, 42))
    green = _TREE_GREENS[int(rng.integers(len(_TREE_GREENS)))]
    for _ in range(4):
        dx, dy, rr = rng.uniform(-0.6, 0.6) * r, rng.uniform(-0.5, 0.4) * r, rng.uniform(0.6, 0.9) * r
        cx, cy = x + dx, y - trunk - 0.3 * r + dy
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=_tint(green, rng.uniform(0.85, 1.2)))


def _people_and_posts(draw: ImageDraw.ImageDraw, n: int, base: int, rng: np.random.Generator) -> None:
    if rng.random() < 0.5:
        x = rng.uniform(0.05, 0.95) * n
        draw.rectangle([x, base - 0.45 * n, x + n / 120 + 1, base + 0.04 * n], fill=(60, 62, 66))
        draw.rectangle([x - n / 40, base - 0.46 * n, x + n / 40, base - 0.44 * n], fill=(60, 62, 66))
    for _ in range(int(rng.integers(0, 3))):
        x, y, h = rng.uniform(0.05, 0.95) * n, base + rng.uniform(0.01, 0.06) * n, rng.uniform(0.1, 0.15) * n
        shirt = tuple(int(v) for v in rng.uniform(40, 200, 3))
        draw.rectangle([x - h / 8, y - h * 0.8, x + h / 8, y - h * 0.35], fill=shirt)
        draw.rectangle([x - h / 10, y - h * 0.35, x + h / 10, y], fill=(50, 50, 60))
        draw.ellipse([x - h / 10, y - h, x + h / 10, y - h * 0.8], fill=(180, 140, 110))


def wall_length(scene: Scene, side: str) -> float:
    """Width of the building as seen from `side` (its extent along that side)."""
    wings = scene.boxes[: scene.wings]
    if side in ("north", "south"):
        return max(b.x1 for b in wings) - min(b.x0 for b in wings)
    return max(b.y1 for b in wings) - min(b.y0 for b in wings)


def render_ground(loc: Location, scene: Scene, size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """(size, size, 3) float street view and the facade's normalised [cx, cy, w, h]."""
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    base = int(size * rng.uniform(0.7, 0.82))
    _sky(draw, size, base, rng)
    _background_blocks(draw, size, base, rng)
    side = loc.sides["road"] if loc.road else SIDES[int(rng.integers(len(SIDES)))]
    length = wall_length(scene, side)
    # Low buildings are photographed from closer up, so their facade still fills a good part of the frame.
    k = size * rng.uniform(0.1, 0.15) * (1.6 if loc.floors <= 2 else 1.0) / FLOOR_H
    length = min(length, 1.3 * size / k)
    x0 = size / 2 - length * k / 2 + rng.uniform(-0.15, 0.15) * size
    _street(draw, size, base, loc.road, rng)
    ext = _facade(draw, loc, rng, (x0, k, size), length, base)
    if loc.trees:
        for _ in range(int(rng.integers(1, 4))):
            _tree(draw, size, base, rng)
    _people_and_posts(draw, size, base, rng)
    lo = np.clip([ext[0], ext[1]], 0, size)
    hi = np.clip([ext[2], ext[3]], 0, size)
    bbox = [(lo[0] + hi[0]) / 2 / size, (lo[1] + hi[1]) / 2 / size, (hi[0] - lo[0]) / size, (hi[1] - lo[1]) / size]
    return np.asarray(img, dtype=np.float32), [round(float(v), 4) for v in bbox]
