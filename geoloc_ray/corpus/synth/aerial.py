"""Satellite and drone renders of a scene: ground shapes, cast shadows, then faces and trees far-to-near.

Straight down (satellite) the walls have no area and are culled, so facade colour and windows cannot show;
obliquely (drone) the walls facing the camera appear with their windows, and the roof is foreshortened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from geoloc_ray.corpus.synth.camera import Camera
from geoloc_ray.corpus.synth.scene import Box, Scene, Tree
from geoloc_ray.corpus.synth.windows import wall_windows

_HAZE = (176, 184, 188)
_GLASS = (48, 66, 90)


@dataclass
class Face:
    """A planar polygon to paint; walls carry what `wall_windows` needs to put windows on them."""

    pts: np.ndarray  # (K, 3)
    rgb: tuple[int, int, int]
    normal: np.ndarray
    wall: tuple | None = None  # (p0, along, length, height, floors, style)
    outline: tuple[int, int, int] | None = None


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / max(np.linalg.norm(v), 1e-9)


def _newell(pts: np.ndarray) -> np.ndarray:
    nxt = np.roll(pts, -1, axis=0)
    n = np.array([np.sum((pts[:, 1] - nxt[:, 1]) * (pts[:, 2] + nxt[:, 2])),
                  np.sum((pts[:, 2] - nxt[:, 2]) * (pts[:, 0] + nxt[:, 0])),
                  np.sum((pts[:, 0] - nxt[:, 0]) * (pts[:, 1] + nxt[:, 1]))])
    n = _unit(n)
    return n if n[2] >= 0 else -n


def _walls(box: Box, others: list[Box]) -> list[Face]:
    x0, y0, x1, y1, z0, h = box.x0, box.y0, box.x1, box.y1, box.base, box.height
    edges = [((x0, y0), (x1, y0), (0, -1)), ((x1, y0), (x1, y1), (1, 0)),
             ((x1, y1), (x0, y1), (0, 1)), ((x0, y1), (x0, y0), (-1, 0))]
    faces = []
    for (ax, ay), (bx, by), (nx, ny) in edges:
        mx, my = (ax + bx) / 2 + nx * 1e-3, (ay + by) / 2 + ny * 1e-3
        if any(o.x0 < mx < o.x1 and o.y0 < my < o.y1 for o in others):
            continue  # an inner wall of an L-shaped building
        pts = np.array([(ax, ay, z0), (bx, by, z0), (bx, by, z0 + h), (ax, ay, z0 + h)], float)
        length = math.hypot(bx - ax, by - ay)
        along = np.array([(bx - ax) / length, (by - ay) / length, 0.0])
        wall = (pts[0], along, length, h, box.floors, box.windows) if box.windows else None
        faces.append(Face(pts, box.wall_rgb, np.array([nx, ny, 0.0]), wall))
    return faces


def _roof(box: Box) -> list[Face]:
    x0, y0, x1, y1, top = box.x0, box.y0, box.x1, box.y1, box.base + box.height
    if box.roof_shape in ("flat", "dome"):
        pts = np.array([(x0, y0, top), (x1, y0, top), (x1, y1, top), (x0, y1, top)], float)
        return [Face(pts, box.roof_rgb, np.array([0, 0, 1.0]), outline=_edge_colour(box.roof_rgb))]
    swap = (y1 - y0) > (x1 - x0)  # build along x, then swap axes for a roof whose ridge runs north-south
    if swap:
        x0, y0, x1, y1 = y0, x0, y1, x1
    short, yc = y1 - y0, (y0 + y1) / 2
    rise = 0.38 * short
    inset = short / 2 if box.roof_shape == "hipped" else 0.0
    inset = min(inset, (x1 - x0) / 2)
    r0, r1 = (x0 + inset, yc, top + rise), (x1 - inset, yc, top + rise)
    polys = [[(x0, y0, top), (x1, y0, top), r1, r0], [(x1, y1, top), (x0, y1, top), r0, r1]]
    ends = [[(x0, y1, top), (x0, y0, top), r0], [(x1, y0, top), (x1, y1, top), r1]]
    faces = []
    for i, poly in enumerate(polys + ends):
        pts = np.array(poly, float)
        gable = i >= 2 and box.roof_shape == "gabled"
        # A gable end is vertical: its outward normal is along the ridge, not up.
        normal = np.array([-1.0 if i == 2 else 1.0, 0, 0]) if gable else _newell(pts)
        if swap:
            pts, normal = pts[:, [1, 0, 2]], normal[[1, 0, 2]]
        rgb = box.wall_rgb if gable else box.roof_rgb
        faces.append(Face(pts, rgb, normal, outline=None if gable else _edge_colour(rgb)))
    return faces


def _edge_colour(rgb) -> tuple[int, int, int]:
    """Ridge and hip lines in a contrasting tone, so a roof's shape reads even when it is black or white."""
    if sum(rgb) / 3 < 80:
        return tuple(min(255, c + 70) for c in rgb)
    return _tint(rgb, 0.62)


def _shade(normal: np.ndarray, sun: np.ndarray) -> float:
    lit = max(0.0, float(normal @ sun))
    if normal[2] > 0.3:
        # A roof in shade must keep its colour name (shaded orange must not turn brown): a high ambient term.
        return 0.62 + 0.5 * lit
    return 0.62 + 0.42 * lit


def _tint(rgb, k: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * k))) for c in rgb)


def _hull(pts: np.ndarray) -> list[tuple[float, float]]:
    """Convex hull (monotone chain) of 2-D points, as PIL polygon vertices."""
    p = sorted(map(tuple, np.round(pts, 3)))

    def half(seq):
        out = []
        for q in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (q[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (q[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(q)
        return out

    return half(p)[:-1] + half(p[::-1])[:-1]


_SPHERE = np.array([(math.sin(t) * math.cos(f), math.sin(t) * math.sin(f), math.cos(t))
                    for t in np.linspace(0, math.pi / 2, 7) for f in np.linspace(0, 2 * math.pi, 20)])


def _draw_dome(draw: ImageDraw.ImageDraw, cam: Camera, box: Box, sun: np.ndarray) -> None:
    """Nested caps around the sunlit point: radial shading that reads as a dome from any angle."""
    short = min(box.x1 - box.x0, box.y1 - box.y0)
    centre = np.array([(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2, box.base + box.height])
    hi = _unit(sun + np.array([0, 0, 1.0]))
    cos_to_hi = _SPHERE @ hi
    for limit, k in ((-1.1, 0.6), (0.35, 0.76), (0.65, 0.88), (0.85, 1.0), (0.96, 1.12)):
        cap = _SPHERE[cos_to_hi >= limit]
        if len(cap) < 3:
            continue
        uv, _ = cam.project(centre + 0.4 * short * cap)
        draw.polygon(_hull(uv), fill=_tint(box.roof_rgb, k))


def _draw_tree(draw: ImageDraw.ImageDraw, cam: Camera, tree: Tree, sun: np.ndarray) -> None:
    (cx, cy), = cam.project(np.array([[tree.x, tree.y, tree.z]]))[0]
    r = tree.r * cam.pixels_per_unit(np.array([tree.x, tree.y, tree.z]))
    if cam.elevation < math.radians(80):
        (bx, by), = cam.project(np.array([[tree.x, tree.y, 0.0]]))[0]
        draw.line([(bx, by), (cx, cy)], fill=(84, 62, 40), width=max(1, int(r / 4)))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_tint(tree.rgb, 0.8))
    (sx, sy), = cam.project(np.array([[tree.x + sun[0] * tree.r, tree.y + sun[1] * tree.r, tree.z]]))[0]
    dx, dy = (sx - cx) * 0.35, (sy - cy) * 0.35
    draw.ellipse([cx + dx - 0.6 * r, cy + dy - 0.6 * r, cx + dx + 0.6 * r, cy + dy + 0.6 * r], fill=tree.rgb)


def _draw_face(draw: ImageDraw.ImageDraw, cam: Camera, face: Face, sun: np.ndarray) -> None:
    k = _shade(face.normal, sun)
    uv, _ = cam.project(face.pts)
    draw.polygon([tuple(p) for p in uv], fill=_tint(face.rgb, k), outline=face.outline,
                 width=2 if face.outline else 0)
    if face.wall is not None:
        for quad in wall_windows(*face.wall):
            wuv, _ = cam.project(quad)
            draw.polygon([tuple(p) for p in wuv], fill=_tint(_GLASS, 0.8 + 0.4 * k))


def _ground(img: Image.Image, cam: Camera, scene: Scene) -> None:
    draw = ImageDraw.Draw(img)
    for shape in scene.ground:
        uv, _ = cam.project(shape.pts)
        pts = [tuple(p) for p in uv]
        if shape.width > 0:
            width = max(1, int(round(shape.width * cam.pixels_per_unit(shape.pts.mean(axis=0)))))
            draw.line(pts, fill=shape.rgb, width=width)
        else:
            draw.polygon(pts, fill=shape.rgb)


def _shadows(cam: Camera, scene: Scene, sun: np.ndarray) -> Image.Image:
    mask = Image.new("L", (cam.size, cam.size), 0)
    draw = ImageDraw.Draw(mask)
    drop = -sun[:2] / max(sun[2], 0.2)  # ground offset per unit of height
    for box in scene.boxes:
        if box.base > 0:
            continue
        top = box.height * (1.3 if box.roof_shape != "flat" else 1.0)
        foot = np.array([(box.x0, box.y0), (box.x1, box.y0), (box.x1, box.y1), (box.x0, box.y1)])
        uv, _ = cam.project(np.vstack([foot, foot + drop * top]))
        draw.polygon(_hull(uv), fill=255)
    ang = np.linspace(0, 2 * math.pi, 12, endpoint=False)
    for t in scene.trees:
        ring = np.column_stack([np.cos(ang), np.sin(ang)]) * t.r + np.array([t.x, t.y]) + drop * t.z
        uv, _ = cam.project(ring)
        draw.polygon([tuple(p) for p in uv], fill=255)
    return mask


def _objects(cam: Camera, scene: Scene) -> list[tuple[float, object]]:
    """Every face, dome and tree crown with its depth, for the painter's algorithm."""
    culled = cam.elevation > math.radians(85)
    towards = cam.toward_camera
    items: list[tuple[float, object]] = []
    for i, box in enumerate(scene.boxes):
        others = scene.boxes[: scene.wings] if i < scene.wings else []
        faces = _roof(box) + ([] if culled else _walls(box, [o for o in others if o is not box]))
        for face in faces:
            if face.normal[2] < 0.5 and face.normal @ towards <= 0:
                continue
            items.append((float(cam.project(face.pts)[1].mean()), face))
        if box.roof_shape == "dome":
            top = np.array([[(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2, box.base + box.height + 0.05]])
            items.append((float(cam.project(top)[1][0]) - 0.05, box))
    for t in scene.trees:
        items.append((float(cam.project(np.array([[t.x, t.y, t.z]]))[1][0]), t))
    return sorted(items, key=lambda it: -it[0])


def building_bbox(cam: Camera, scene: Scene) -> list[float]:
    """Normalised [cx, cy, w, h] of the building in the image (clipped to the frame)."""
    pts = []
    for box in scene.boxes[: scene.wings]:
        top = box.base + box.height * (1.4 if box.roof_shape != "flat" else 1.0)
        for x in (box.x0, box.x1):
            for y in (box.y0, box.y1):
                pts += [(x, y, box.base), (x, y, top)]
    uv, _ = cam.project(np.array(pts))
    lo, hi = np.clip(uv.min(axis=0), 0, cam.size), np.clip(uv.max(axis=0), 0, cam.size)
    c, wh = (lo + hi) / 2 / cam.size, (hi - lo) / cam.size
    return [round(float(v), 4) for v in (c[0], c[1], wh[0], wh[1])]


def render_aerial(scene: Scene, cam: Camera, sun: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float image of the scene; ground texture and shadows included, no photometric nuisance."""
    img = Image.new("RGB", (cam.size, cam.size), _HAZE)
    _ground(img, cam, scene)
    arr = np.asarray(img, dtype=np.float32)
    blotch = rng.uniform(0.88, 1.12, (6, 6)).astype(np.float32)
    blotch = np.asarray(Image.fromarray(blotch, mode="F").resize((cam.size, cam.size), Image.BILINEAR))
    shadow = np.asarray(_shadows(cam, scene, sun), dtype=np.float32) / 255.0
    arr = arr * blotch[..., None] * (1.0 - 0.42 * shadow[..., None])
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _, item in _objects(cam, scene):
        if isinstance(item, Face):
            _draw_face(draw, cam, item, sun)
        elif isinstance(item, Box):
            _draw_dome(draw, cam, item, sun)
        else:
            _draw_tree(draw, cam, item, sun)
    return np.asarray(img, dtype=np.float32)


def sun_direction(rng: np.random.Generator) -> np.ndarray:
    """A daytime sun in the southern sky (the city is at 30 N), never in line with a ridge: the two slopes of
    a gabled roof (ridges run east-west or north-south) always get different light."""
    az = math.radians(rng.uniform(120, 165) if rng.random() < 0.5 else rng.uniform(195, 240))
    el = math.radians(rng.uniform(35, 65))
    return np.array([math.sin(az) * math.cos(el), math.cos(az) * math.cos(el), math.sin(el)])
