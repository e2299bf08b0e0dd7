"""The 3-D layout of one location, shared by its satellite and drone views so they agree with each other.

A scene is flat ground shapes (drawn first, in order), boxes (building wings, small props) and tree crowns.
Everything is seeded by the location alone: the views only add camera and lighting nuisance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from geoloc_ray.corpus.synth.world import FACADE_COLOURS, RGB, ROOF_COLOURS, Location

FLOOR_H = 0.055  # world units per floor
_SIDE_VEC = {"north": (0, 1), "east": (1, 0), "south": (0, -1), "west": (-1, 0)}
_BACKGROUNDS: tuple[RGB, ...] = ((140, 154, 110), (164, 156, 124), (150, 158, 122))
_TREE_GREENS: tuple[RGB, ...] = ((38, 92, 40), (46, 104, 44), (32, 80, 38), (52, 98, 46))
_CAR_COLOURS: tuple[RGB, ...] = ((225, 225, 225), (40, 40, 44), (150, 152, 158), (60, 70, 110), (110, 40, 40))


@dataclass
class Shape:
    """A flat thing on the ground: a filled polygon, or a polyline when `width` > 0 (world units)."""

    pts: np.ndarray  # (K, 2)
    rgb: RGB
    width: float = 0.0


@dataclass
class Box:
    """An axis-aligned box standing on z=`base`; building wings carry a roof shape, props are plain."""

    x0: float
    y0: float
    x1: float
    y1: float
    height: float
    roof_rgb: RGB
    wall_rgb: RGB
    roof_shape: str = "flat"
    base: float = 0.0
    windows: str | None = None  # window style on the walls, None for props
    floors: int = 0


@dataclass
class Tree:
    x: float
    y: float
    z: float  # crown centre height
    r: float
    rgb: RGB


@dataclass
class Scene:
    ground: list[Shape] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    trees: list[Tree] = field(default_factory=list)
    wings: int = 1  # the first `wings` boxes are the building


def _side_frame(side: str) -> tuple[np.ndarray, np.ndarray]:
    """Outward normal and tangent of a side of the building."""
    n = np.array(_SIDE_VEC[side], dtype=float)
    return n, np.array([n[1], -n[0]])


def side_rect(side: str, off0: float, off1: float, s0: float, s1: float) -> np.ndarray:
    """Rectangle on a side of the building: `off` outward from the centre, `s` along the side."""
    n, t = _side_frame(side)
    return np.array([n * a + t * b for a, b in ((off0, s0), (off1, s0), (off1, s1), (off0, s1))])


def footprint_rects(loc: Location, rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    """The building's wings as (x0, y0, x1, y1), centred on the origin."""
    if loc.footprint == "square":
        s = rng.uniform(0.4, 0.5) / 2
        return [(-s, -s, s, s)]
    if loc.footprint == "rectangle":
        a, b = rng.uniform(0.56, 0.66) / 2, rng.uniform(0.26, 0.34) / 2
        return [(-a, -b, a, b)] if rng.random() < 0.5 else [(-b, -a, b, a)]
    size, w = rng.uniform(0.52, 0.62), rng.uniform(0.2, 0.25)
    h = size / 2
    # An L: one wing along x at the bottom, one along y at the left; then mirrored at random.
    rects = [(-h, -h, h, -h + w), (-h, -h + w, -h + w, h)]
    sx, sy = (1 if rng.random() < 0.5 else -1), (1 if rng.random() < 0.5 else -1)
    out = []
    for x0, y0, x1, y1 in rects:
        xs, ys = sorted((x0 * sx, x1 * sx)), sorted((y0 * sy, y1 * sy))
        out.append((xs[0], ys[0], xs[1], ys[1]))
    return out


def _building(loc: Location, rng: np.random.Generator) -> list[Box]:
    height = loc.floors * FLOOR_H
    roof, wall = ROOF_COLOURS[loc.roof_colour], FACADE_COLOURS[loc.facade_colour]
    return [Box(*r, height, roof, wall, loc.roof_shape, windows=loc.windows, floors=loc.floors)
            for r in footprint_rects(loc, rng)]


def _road(side: str, rng: np.random.Generator) -> list[Shape]:
    off = rng.uniform(0.5, 0.6)
    n, t = _side_frame(side)
    mid = off + 0.08
    line = np.array([n * mid + t * s for s in (-2.0, 2.0)])
    return [Shape(side_rect(side, off - 0.03, off + 0.19, -2.0, 2.0), (176, 172, 164)),  # pavements
            Shape(side_rect(side, off, off + 0.16, -2.0, 2.0), (84, 84, 88)),
            Shape(line, (236, 236, 230), width=0.012)]


def _lake(side: str, rng: np.random.Generator) -> np.ndarray:
    n, t = _side_frame(side)
    centre = n * rng.uniform(0.78, 0.86) + t * rng.uniform(-0.2, 0.2)
    ang = np.linspace(0, 2 * np.pi, 28, endpoint=False)
    wobble = 1 + 0.12 * np.sin(3 * ang + rng.uniform(0, 6)) + rng.uniform(-0.05, 0.05, ang.size)
    ra, rb = rng.uniform(0.42, 0.56), rng.uniform(0.22, 0.28)
    return centre + (np.outer(np.cos(ang) * ra, t) + np.outer(np.sin(ang) * rb, n)) * wobble[:, None]


def _river(side: str, rng: np.random.Generator) -> np.ndarray:
    n, t = _side_frame(side)
    s = np.linspace(-2.0, 2.0, 24)
    mid = rng.uniform(0.72, 0.8) + 0.05 * np.sin(3 * s + rng.uniform(0, 6))
    half = rng.uniform(0.1, 0.13)
    near = [n * (m - half) + t * a for m, a in zip(mid, s, strict=True)]
    far = [n * (m + half) + t * a for m, a in zip(mid[::-1], s[::-1], strict=True)]
    return np.array(near + far)


def _water(kind: str, side: str, rng: np.random.Generator) -> list[Shape]:
    poly = _lake(side, rng) if kind == "lake" else _river(side, rng)
    centre = poly.mean(axis=0)
    bank = centre + (poly - centre) * 1.06
    return [Shape(bank, (118, 128, 96)), Shape(poly, (52, 104, 162))]


def _parking(side: str, rng: np.random.Generator) -> list[Shape]:
    n, t = _side_frame(side)
    off0, s0 = rng.uniform(0.46, 0.52), rng.uniform(-0.6, -0.3)
    length, depth = rng.uniform(0.7, 0.9), 0.36
    shapes = [Shape(side_rect(side, off0, off0 + depth, s0, s0 + length), (96, 96, 102))]
    stall = 0.075
    stalls = int(length / stall)
    for a0, a1 in ((off0 + 0.02, off0 + 0.16), (off0 + 0.2, off0 + 0.34)):  # two rows of stalls
        for k in range(stalls + 1):
            s = s0 + 0.02 + k * stall
            shapes.append(Shape(np.array([n * a0 + t * s, n * a1 + t * s]), (236, 236, 236), width=0.008))
            if k < stalls and rng.random() < 0.6:
                car = side_rect(side, a0 + 0.015, a1 - 0.015, s + 0.014, s + stall - 0.014)
                shapes.append(Shape(car, _CAR_COLOURS[int(rng.integers(len(_CAR_COLOURS)))]))
    return shapes


def _field(kind: str, side: str, rng: np.random.Generator) -> list[Shape]:
    n, t = _side_frame(side)
    off0, s0, s1 = rng.uniform(0.46, 0.52), rng.uniform(-0.9, -0.6), rng.uniform(0.6, 0.9)
    base, stripe = ((104, 172, 62), (124, 188, 80)) if kind == "grass" else ((186, 164, 72), (132, 126, 58))
    shapes = [Shape(side_rect(side, off0, 1.3, s0, s1), base)]
    step = 0.09 if kind == "grass" else 0.045
    for s in np.arange(s0 + step / 2, s1, step):
        shapes.append(Shape(np.array([n * off0 + t * s, n * 1.3 + t * s]), stripe, width=step / 2))
    return shapes


def _occupied(shapes: list[Shape]) -> list[tuple[float, float, float, float]]:
    return [(*s.pts.min(axis=0), *s.pts.max(axis=0)) for s in shapes if s.width == 0]


def _trees(side: str, rng: np.random.Generator, taken: list[tuple[float, float, float, float]]) -> list[Tree]:
    n, t = _side_frame(side)
    want, trees = int(rng.integers(5, 10)), []
    for _ in range(80):
        p = n * rng.uniform(0.38, 0.95) + t * rng.uniform(-0.85, 0.85)
        r = rng.uniform(0.06, 0.085)
        clear = all(not (a - r < p[0] < c + r and b - r < p[1] < d + r) for a, b, c, d in taken)
        spaced = all(np.hypot(p[0] - q.x, p[1] - q.y) > 1.4 * r for q in trees)
        if clear and spaced:
            green = _TREE_GREENS[int(rng.integers(len(_TREE_GREENS)))]
            trees.append(Tree(float(p[0]), float(p[1]), float(rng.uniform(0.12, 0.2)), float(r), green))
        if len(trees) >= want:
            break
    return trees


def _distractors(rng: np.random.Generator, building: list[Box], taken) -> tuple[list[Shape], list[Box]]:
    """Footpaths, a shed, rooftop units: real scenes are never only the attributes we name."""
    paths, props = [], []
    for _ in range(int(rng.integers(0, 3))):
        a = rng.uniform(0, 2 * np.pi)
        end = np.array([np.cos(a), np.sin(a)]) * rng.uniform(0.7, 1.1)
        paths.append(Shape(np.array([end * 0.35, end]), (196, 186, 160), width=0.02))
    if rng.random() < 0.5:
        for _ in range(10):
            x, y = rng.uniform(-0.95, 0.95, 2)
            box = (x, y, x + 0.08, y + 0.06)
            if all(box[2] < a or box[0] > c or box[3] < b or box[1] > d for a, b, c, d in taken):
                props.append(Box(*box, 0.04, (112, 106, 98), (150, 144, 132)))
                break
    top = building[0]
    if top.roof_shape == "flat" and rng.random() < 0.7:
        for _ in range(int(rng.integers(1, 3))):
            x = rng.uniform(top.x0 + 0.03, top.x1 - 0.09)
            y = rng.uniform(top.y0 + 0.03, top.y1 - 0.07)
            props.append(Box(x, y, x + 0.06, y + 0.04, 0.025, (196, 198, 200), (170, 172, 174), base=top.height))
    return paths, props


def build_scene(loc: Location) -> Scene:
    """Lay out the location in 3-D; depends on the location alone so all its aerial views agree."""
    rng = np.random.default_rng([loc.scene_seed, 7])
    bg = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    scene = Scene(ground=[Shape(np.array([(-4, -4), (4, -4), (4, 4), (-4, 4)], float), bg)])
    building = _building(loc, rng)
    features: list[Shape] = []
    if loc.field:
        features += _field(loc.field, loc.sides["field"], rng)
    if loc.water:
        features += _water(loc.water, loc.sides["water"], rng)
    if loc.parking:
        features += _parking(loc.sides["parking"], rng)
    if loc.road:
        features += _road(loc.sides["road"], rng)
    taken = _occupied(features) + [(b.x0, b.y0, b.x1, b.y1) for b in building]
    paths, props = _distractors(rng, building, taken)
    scene.ground += paths + features
    scene.boxes = building + props
    scene.wings = len(building)
    if loc.trees:
        scene.trees = _place_trees(loc.sides["trees"], rng, taken + [(b.x0, b.y0, b.x1, b.y1) for b in props])
    return scene


def _place_trees(side: str, rng: np.random.Generator, taken) -> list[Tree]:
    # Trees sharing a side with a field or a lake may not fit there: spill to the other sides so a location
    # whose ground truth says "trees" always shows some.
    trees = _trees(side, rng, taken)
    for other in (s for s in _SIDE_VEC if s != side):
        if len(trees) >= 3:
            break
        trees += _trees(other, rng, taken + [(t.x - t.r, t.y - t.r, t.x + t.r, t.y + t.r) for t in trees])[:3]
    return trees
