"""`geoloc-ray synth`: write a procedural world in the GeoText-1652 / University-1652 layout.

out/train.json (long generic captions), out/test.json (short platform queries), out/locations.json
(coordinates, split, ground-truth attributes) and out/images/{train,test}/LOC/... JPEGs.
"""

from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from geoloc_ray import io
from geoloc_ray.config import SynthConfig
from geoloc_ray.corpus.synth.captions import training_caption
from geoloc_ray.corpus.synth.queries import platform_queries
from geoloc_ray.corpus.synth.views import PLATFORM_CODES, View, render_location
from geoloc_ray.corpus.synth.world import Location, sample_world


def text_rng(loc: Location, view: View) -> np.random.Generator:
    """Texts get their own stream per image: phrasing varies across a location's images, reproducibly."""
    return np.random.default_rng([loc.scene_seed, 99, PLATFORM_CODES[view.platform], view.index])


def make_record(loc: Location, view: View, queries_per_image: int) -> dict:
    """One GeoText-style record; `caption` is a string for train and a list of queries for test."""
    image_id = f"{loc.location_id}/{view.file_name}"
    rng = text_rng(loc, view)
    if loc.split == "train":
        sentences = training_caption(loc, rng)
        caption: str | list[str] = " ".join(sentences)
    else:
        sentences = platform_queries(loc, view.platform, queries_per_image, rng)
        caption = list(sentences)
    return {"image_id": image_id, "image": f"{loc.split}/{image_id}", "caption": caption,
            "sentences": sentences, "bboxes": [view.bbox]}


def _clear_previous(out: str) -> None:
    # Only a folder that already holds a synthetic world is cleared: stale images of a bigger earlier world
    # would otherwise be picked up by readers that list folders.
    if io.exists(io.join(out, "locations.json")):
        io.remove(io.join(out, "images"))


def synth_world(out: str, locations: int, seed: int, *, test_fraction: float = 0.34, drone_views: int = 6,
                ground_views: int = 3, image_size: int = 96, queries_per_image: int = 1,
                progress: bool = True) -> dict:
    """Sample, render and write a whole world under `out` (a path or fsspec URI); returns a summary."""
    start = time.perf_counter()
    world = sample_world(locations, seed, test_fraction)
    _clear_previous(out)
    records: dict[str, list[dict]] = {"train": [], "test": []}
    counts = dict.fromkeys(PLATFORM_CODES, 0)
    total = locations * (1 + drone_views + ground_views)
    with tqdm(total=total, desc="synth", unit="img", disable=not progress) as bar:
        for loc in world:
            for view in render_location(loc, image_size, drone_views, ground_views):
                uri = io.join(out, "images", loc.split, loc.location_id, view.file_name)
                io.write_bytes(uri, view.jpeg(loc.scene_seed))
                records[loc.split].append(make_record(loc, view, queries_per_image))
                counts[view.platform] += 1
                bar.update(1)
    paths = {"train": io.join(out, "train.json"), "test": io.join(out, "test.json"),
             "locations": io.join(out, "locations.json"), "images": io.join(out, "images")}
    io.write_json(paths["train"], records["train"])
    io.write_json(paths["test"], records["test"])
    io.write_json(paths["locations"], {loc.location_id: {"lat": loc.lat, "lon": loc.lon, "split": loc.split,
                                                        "attributes": loc.attributes()} for loc in world})
    seconds = time.perf_counter() - start
    return {
        "out": out, "seed": seed, "locations": locations,
        "train_locations": sum(loc.split == "train" for loc in world),
        "test_locations": sum(loc.split == "test" for loc in world),
        "images": counts, "train_records": len(records["train"]), "test_records": len(records["test"]),
        "paths": paths, "seconds": round(seconds, 2),
    }


def synth_from_config(synth: SynthConfig, out: str, progress: bool = True) -> dict:
    """`synth_world` with the `synth:` section of a run config (what `geoloc-ray synth` runs)."""
    return synth_world(out, synth.locations, synth.seed, test_fraction=synth.test_fraction,
                       drone_views=synth.drone_views, ground_views=synth.ground_views,
                       image_size=synth.image_size, queries_per_image=synth.queries_per_image, progress=progress)
