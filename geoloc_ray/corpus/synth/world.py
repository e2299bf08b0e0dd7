"""The synthetic world's ground truth: one building per location, its visible attributes and surroundings.

Attributes are sampled independently so that no attribute can be guessed from another; what each platform
can see of them is decided later by the renderers and the query writer, never here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

RGB = tuple[int, int, int]

ROOF_COLOURS: dict[str, RGB] = {
    "red": (196, 44, 38),
    "blue": (44, 84, 186),
    "green": (62, 150, 72),
    "grey": (128, 128, 134),
    "white": (234, 234, 228),
    "black": (36, 36, 42),
    "brown": (118, 76, 44),
    "orange": (234, 128, 34),
}
ROOF_SHAPES: tuple[str, ...] = ("flat", "gabled", "dome", "hipped")
FACADE_COLOURS: dict[str, RGB] = {
    "cream": (232, 218, 178),
    "white": (240, 240, 238),
    "grey": (150, 150, 154),
    "brick red": (158, 66, 50),
    "yellow": (222, 192, 82),
    "blue glass": (92, 140, 178),
    "pink": (222, 160, 164),
}
HEIGHT_FLOORS: dict[str, tuple[int, int]] = {"low": (1, 2), "mid": (3, 6), "tall": (8, 12)}
WINDOW_STYLES: tuple[str, ...] = ("many_small", "large_glass", "few_narrow")
FOOTPRINTS: tuple[str, ...] = ("square", "rectangle", "L-shape")
WATER_KINDS: tuple[str, ...] = ("lake", "river")
FIELD_KINDS: tuple[str, ...] = ("grass", "crops")
SIDES: tuple[str, ...] = ("north", "east", "south", "west")
SURROUNDINGS: tuple[str, ...] = ("water", "trees", "road", "parking", "field")
# Surroundings that occupy a whole side (a band or a block); trees are clumps and may share a side.
_SIDE_TAKERS: tuple[str, ...] = ("water", "road", "parking", "field")
_PRESENCE: dict[str, float] = {"water": 0.35, "trees": 0.55, "road": 0.55, "parking": 0.35, "field": 0.35}

# A city-sized box (about 11 x 12 km) with a few denser neighbourhoods.
CITY_BOX: tuple[float, float, float, float] = (30.48, 30.58, 114.28, 114.42)  # lat0, lat1, lon0, lon1


@dataclass
class Location:
    """One building and its surroundings: the ground truth every view and text of the location is made from."""

    location_id: str
    roof_colour: str
    roof_shape: str
    facade_colour: str
    height: str
    floors: int
    windows: str
    footprint: str
    water: str | None = None
    trees: bool = False
    road: bool = False
    parking: bool = False
    field: str | None = None
    sides: dict[str, str] = dataclasses.field(default_factory=dict)  # surrounding -> side of the building it lies on
    lat: float = 0.0
    lon: float = 0.0
    split: str = "train"
    scene_seed: int = 0

    def present(self) -> list[str]:
        """The surroundings this location has, in a fixed order."""
        return [s for s in SURROUNDINGS if getattr(self, s)]

    def attributes(self) -> dict:
        """The ground-truth attribute dict written to locations.json (for tests and debugging only)."""
        return {
            "roof_colour": self.roof_colour, "roof_shape": self.roof_shape,
            "facade_colour": self.facade_colour, "height": self.height, "floors": self.floors,
            "windows": self.windows, "footprint": self.footprint,
            "water": self.water, "trees": self.trees, "road": self.road, "parking": self.parking,
            "field": self.field, "sides": dict(self.sides),
        }


def location_id(index: int) -> str:
    """University-1652 style zero-padded folder name."""
    return f"{index:04d}"


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _sample_surroundings(rng: np.random.Generator) -> dict[str, bool]:
    # Resample until something is present: every real scene has at least one thing around the building,
    # and the captions need something to place relative to it.
    while True:
        present = {s: bool(rng.random() < _PRESENCE[s]) for s in SURROUNDINGS}
        if any(present.values()):
            return present


def _assign_sides(rng: np.random.Generator, present: dict[str, bool]) -> dict[str, str]:
    order = [SIDES[i] for i in rng.permutation(len(SIDES))]
    sides = {}
    for name in _SIDE_TAKERS:
        if present[name]:
            sides[name] = order.pop(0)
    if present["trees"]:
        sides["trees"] = order[0] if order else _pick(rng, SIDES)
    return sides


def sample_location(rng: np.random.Generator, index: int) -> Location:
    """Draw one building; every attribute independently, so none leaks another."""
    height = _pick(rng, HEIGHT_FLOORS)
    lo, hi = HEIGHT_FLOORS[height]
    present = _sample_surroundings(rng)
    return Location(
        location_id=location_id(index),
        roof_colour=_pick(rng, ROOF_COLOURS),
        roof_shape=_pick(rng, ROOF_SHAPES),
        facade_colour=_pick(rng, FACADE_COLOURS),
        height=height,
        floors=int(rng.integers(lo, hi + 1)),
        windows=_pick(rng, WINDOW_STYLES),
        footprint=_pick(rng, FOOTPRINTS),
        water=_pick(rng, WATER_KINDS) if present["water"] else None,
        trees=present["trees"],
        road=present["road"],
        parking=present["parking"],
        field=_pick(rng, FIELD_KINDS) if present["field"] else None,
        sides=_assign_sides(rng, present),
        scene_seed=int(rng.integers(2**31)),
    )


def split_ids(n: int, test_fraction: float, rng: np.random.Generator) -> list[str]:
    """'train'/'test' per location index: test is the last fraction of a seeded shuffle (disjoint, as in U-1652)."""
    n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
    order = rng.permutation(n)
    splits = ["train"] * n
    for i in order[n - n_test:]:
        splits[int(i)] = "test"
    return splits


def scatter_coordinates(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) lat/lon: most buildings in a few neighbourhoods, the rest anywhere in the city box."""
    lat0, lat1, lon0, lon1 = CITY_BOX
    centres = np.column_stack([rng.uniform(lat0, lat1, 4), rng.uniform(lon0, lon1, 4)])
    which = rng.integers(len(centres), size=n)
    clustered = centres[which] + rng.normal(0.0, [0.008, 0.010], size=(n, 2))
    uniform = np.column_stack([rng.uniform(lat0, lat1, n), rng.uniform(lon0, lon1, n)])
    coords = np.where((rng.random(n) < 0.7)[:, None], clustered, uniform)
    return np.clip(coords, [lat0, lon0], [lat1, lon1])


def sample_world(locations: int, seed: int, test_fraction: float) -> list[Location]:
    """The whole world, reproducible from the seed alone."""
    rng = np.random.default_rng([seed, 1652])
    world = [sample_location(rng, i) for i in range(locations)]
    splits = split_ids(locations, test_fraction, rng)
    coords = scatter_coordinates(locations, rng)
    for loc, split, (lat, lon) in zip(world, splits, coords, strict=True):
        loc.split, loc.lat, loc.lon = split, round(float(lat), 6), round(float(lon), 6)
    return world
