"""All views of one location (satellite, drone, ground) with University-1652 file names and building boxes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from geoloc_ray.corpus.synth.aerial import building_bbox, render_aerial, sun_direction
from geoloc_ray.corpus.synth.camera import drone_camera, satellite_camera
from geoloc_ray.corpus.synth.ground import render_ground
from geoloc_ray.corpus.synth.nuisance import downsample, encode_jpeg, photometric
from geoloc_ray.corpus.synth.scene import FLOOR_H, Scene, build_scene
from geoloc_ray.corpus.synth.world import Location

PLATFORM_CODES: dict[str, int] = {"satellite": 0, "drone": 1, "ground": 2}
SUPERSAMPLE = 2


@dataclass
class View:
    """One rendered image of a location."""

    platform: str
    index: int  # 1-based within the platform
    file_name: str  # University-1652 name inside the location folder
    pixels: np.ndarray  # (size, size, 3) uint8
    bbox: list[float]  # normalised [cx, cy, w, h] of the building

    def jpeg(self, seed: int) -> bytes:
        return encode_jpeg(self.pixels, view_rng(seed, self.platform, self.index, salt=3))


def file_name(location_id: str, platform: str, index: int) -> str:
    """Satellite `LOC.jpg`, drone `image-NN.jpeg`, ground `street-NN.jpg` (the U-1652 platform rules)."""
    if platform == "satellite":
        return f"{location_id}.jpg"
    if platform == "drone":
        return f"image-{index:02d}.jpeg"
    return f"street-{index:02d}.jpg"


def view_rng(seed: int, platform: str, index: int, salt: int = 0) -> np.random.Generator:
    """Each image has its own stream: images do not depend on the order or number of other images."""
    return np.random.default_rng([seed, PLATFORM_CODES[platform], index, salt])


def _finish(canvas: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    return photometric(downsample(canvas, size), rng)


def render_satellite(loc: Location, scene: Scene, size: int) -> View:
    rng = view_rng(loc.scene_seed, "satellite", 1)
    cam = satellite_camera(size * SUPERSAMPLE, rng)
    canvas = render_aerial(scene, cam, sun_direction(rng), rng)
    return View("satellite", 1, file_name(loc.location_id, "satellite", 1), _finish(canvas, size, rng),
                building_bbox(cam, scene))


def render_drone(loc: Location, scene: Scene, size: int, index: int, count: int) -> View:
    rng = view_rng(loc.scene_seed, "drone", index)
    # Spread the views around the building (like the U-1652 drone orbit), with jitter.
    base = view_rng(loc.scene_seed, "drone", 0).uniform(0, 2 * math.pi)
    azimuth = base + 2 * math.pi * (index - 1) / count + rng.uniform(-0.3, 0.3)
    cam = drone_camera(size * SUPERSAMPLE, rng, azimuth, loc.floors * FLOOR_H * 0.4)
    canvas = render_aerial(scene, cam, sun_direction(rng), rng)
    return View("drone", index, file_name(loc.location_id, "drone", index), _finish(canvas, size, rng),
                building_bbox(cam, scene))


def render_street(loc: Location, scene: Scene, size: int, index: int) -> View:
    rng = view_rng(loc.scene_seed, "ground", index)
    canvas, bbox = render_ground(loc, scene, size * SUPERSAMPLE, rng)
    return View("ground", index, file_name(loc.location_id, "ground", index), _finish(canvas, size, rng), bbox)


def render_location(loc: Location, size: int, drone_views: int, ground_views: int) -> list[View]:
    """Every view of a location, satellite first, in file-name order."""
    scene = build_scene(loc)
    views = [render_satellite(loc, scene, size)]
    views += [render_drone(loc, scene, size, i, drone_views) for i in range(1, drone_views + 1)]
    views += [render_street(loc, scene, size, i) for i in range(1, ground_views + 1)]
    return views
