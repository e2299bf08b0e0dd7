"""One pinhole camera for the aerial platforms: satellite is the straight-down, north-up limit of a drone.

World frame: x east, y north, z up, the building centred at the origin, the scene about [-1, 1]^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Camera:
    """Looks at `focus` from bearing `azimuth` (radians clockwise from north) and `elevation` above the horizon."""

    azimuth: float
    elevation: float
    distance: float  # pinhole distance in world units; math.inf gives an orthographic view
    scale: float  # pixels per world unit at the focus
    size: int  # canvas side in pixels
    focus: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def forward(self) -> np.ndarray:
        """Horizontal unit vector the camera looks along."""
        return np.array([-math.sin(self.azimuth), -math.cos(self.azimuth)])

    @property
    def toward_camera(self) -> np.ndarray:
        """Unit 3-vector from the scene toward the camera (for back-face culling)."""
        f = self.forward
        ce, se = math.cos(self.elevation), math.sin(self.elevation)
        return np.array([-f[0] * ce, -f[1] * ce, se])

    def project(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(K, 3) world points -> (K, 2) pixel coordinates and (K,) depth (larger = farther)."""
        pts = np.atleast_2d(np.asarray(pts, dtype=np.float64))
        if pts.shape[1] == 2:
            pts = np.column_stack([pts, np.zeros(len(pts))])
        p = pts - np.asarray(self.focus)
        f = self.forward
        h_f = p[:, 0] * f[0] + p[:, 1] * f[1]
        h_r = p[:, 0] * f[1] - p[:, 1] * f[0]
        ce, se = math.cos(self.elevation), math.sin(self.elevation)
        v = h_f * se + p[:, 2] * ce
        depth = h_f * ce - p[:, 2] * se
        if math.isinf(self.distance):
            persp = np.ones_like(depth)
        else:
            # Clamp so points at or behind the camera plane never flip through the image.
            persp = self.distance / np.maximum(self.distance + depth, 0.15 * self.distance)
        c = self.size / 2.0
        uv = np.column_stack([c + self.scale * h_r * persp, c - self.scale * v * persp])
        return uv, depth

    def pixels_per_unit(self, point: np.ndarray) -> float:
        """Local scale at a world point (for widths of lines and radii of tree crowns)."""
        _, depth = self.project(point)
        if math.isinf(self.distance):
            return self.scale
        return self.scale * self.distance / max(self.distance + float(depth[0]), 0.15 * self.distance)


def satellite_camera(size: int, rng: np.random.Generator) -> Camera:
    """North-up, straight down, with a small random offset and zoom (nuisance, as real tiles are not centred)."""
    extent = rng.uniform(1.0, 1.12)
    ox, oy = rng.uniform(-0.08, 0.08, 2)
    return Camera(math.pi, math.pi / 2, math.inf, size / (2 * extent), size, (float(ox), float(oy), 0.0))


def drone_camera(size: int, rng: np.random.Generator, azimuth: float, focus_z: float) -> Camera:
    """Oblique view: higher altitude = steeper and farther (more roof, less facade, smaller building)."""
    altitude = rng.uniform(0.0, 1.0)
    elevation = math.radians(34 + 30 * altitude)
    extent = 0.85 + 0.4 * altitude + rng.uniform(-0.05, 0.05)
    ox, oy = rng.uniform(-0.08, 0.08, 2)
    distance = rng.uniform(3.0, 4.5)
    return Camera(azimuth, elevation, distance, size / (2 * extent), size, (float(ox), float(oy), focus_z))
