"""Window layouts on a wall, shared by the drone (3-D walls) and ground (frontal facade) renderers.

A style is a layout rule, so the same building shows the same kind of windows from every platform that
can see its walls, and the number of window rows is the number of floors.
"""

from __future__ import annotations

import numpy as np

# style -> (target cell width in world units, window width / cell, window height / floor, sill / floor)
_LAYOUT: dict[str, tuple[float, float, float, float]] = {
    "many_small": (0.065, 0.42, 0.45, 0.3),
    "large_glass": (0.16, 0.8, 0.66, 0.16),
    "few_narrow": (0.17, 0.16, 0.62, 0.2),
}


def window_rects(length: float, height: float, floors: int, style: str) -> list[tuple[float, float, float, float]]:
    """(s0, z0, s1, z1) of every window on a wall `length` wide and `height` tall, in the wall's units."""
    cell_w, w_frac, h_frac, sill = _LAYOUT[style]
    cols = max(2 if style == "many_small" else 1, int(round(length / cell_w)))
    cw, fh = length / cols, height / max(floors, 1)
    rects = []
    for f in range(max(floors, 1)):
        z0 = f * fh + sill * fh
        for c in range(cols):
            s0 = c * cw + (1 - w_frac) * cw / 2
            rects.append((s0, z0, s0 + w_frac * cw, z0 + h_frac * fh))
    return rects


def wall_windows(p0: np.ndarray, along: np.ndarray, length: float, height: float, floors: int,
                 style: str) -> list[np.ndarray]:
    """Windows of a 3-D wall as (4, 3) quads; `p0` is the wall's bottom corner, `along` its unit direction."""
    up = np.array([0.0, 0.0, 1.0])
    quads = []
    for s0, z0, s1, z1 in window_rects(length, height, floors, style):
        quads.append(np.array([p0 + along * s0 + up * z0, p0 + along * s1 + up * z0,
                               p0 + along * s1 + up * z1, p0 + along * s0 + up * z1]))
    return quads
