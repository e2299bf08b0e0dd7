"""The procedural world: GeoText/University-1652 layout, platform visibility rules, determinism, texts."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geoloc_ray.config import PlatformRules, SynthConfig
from geoloc_ray.corpus.records import location_from_image_id, platform_from_path
from geoloc_ray.corpus.synth import (
    Location,
    contact_sheet,
    render_location,
    sample_world,
    synth_from_config,
    synth_world,
)
from geoloc_ray.corpus.synth.captions import training_caption
from geoloc_ray.corpus.synth.queries import platform_queries
from geoloc_ray.corpus.synth.world import FACADE_COLOURS, ROOF_COLOURS
from geoloc_ray.preprocess.text import default_directional_phrases

KW = dict(test_fraction=0.34, drone_views=2, ground_views=2, image_size=64, queries_per_image=2, progress=False)
N_LOC = 6
CLEANED = [re.compile(p, re.IGNORECASE) for p in default_directional_phrases()]  # what preprocessing drops
DIRECTIONAL = CLEANED + [  # queries are stricter: no direction or relative position at all
    re.compile(r"\b(?:left|right|north|south|east|west|front|behind|top|bottom|above|below)\b", re.IGNORECASE)]
COLOUR_WORDS = {w for name in list(ROOF_COLOURS) + list(FACADE_COLOURS) for w in name.split()} - {"glass"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "world"
    return out, synth_world(str(out), N_LOC, seed=3, **KW)


def _load(out: Path) -> tuple[list[dict], list[dict], dict]:
    return (json.loads((out / "train.json").read_text()), json.loads((out / "test.json").read_text()),
            json.loads((out / "locations.json").read_text()))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower()))


def _is_directional(text: str, patterns=DIRECTIONAL) -> bool:
    return any(p.search(text) for p in patterns)


def test_layout_and_record_keys(world):
    out, summary = world
    train, test, locs = _load(out)
    assert summary["train_records"] == len(train) and summary["test_records"] == len(test)
    assert len(train) + len(test) == N_LOC * (1 + KW["drone_views"] + KW["ground_views"])
    assert sorted(locs) == [f"{i:04d}" for i in range(N_LOC)]
    for split, records in (("train", train), ("test", test)):
        for r in records:
            assert set(r) == {"image_id", "image", "caption", "sentences", "bboxes"}
            assert r["image"] == f"{split}/{r['image_id']}"
            assert (out / "images" / r["image"]).is_file()
            assert locs[location_from_image_id(r["image_id"])]["split"] == split
            (box,) = r["bboxes"]
            assert len(box) == 4 and all(0 <= v <= 1 for v in box) and box[2] > 0.05 and box[3] > 0.05
            if split == "train":
                assert isinstance(r["caption"], str) and r["caption"] == " ".join(r["sentences"])
            else:
                assert isinstance(r["caption"], list) and len(r["caption"]) == KW["queries_per_image"]
    for meta in locs.values():
        assert 30 < meta["lat"] < 31 and 114 < meta["lon"] < 115
        assert {"roof_colour", "facade_colour", "floors", "sides"} <= set(meta["attributes"])


def test_file_names_follow_university1652_platform_rules(world):
    out, _ = world
    train, test, _ = _load(out)
    per_loc: dict[str, list[str]] = {}
    for r in train + test:
        loc, name = r["image_id"].split("/")
        per_loc.setdefault(loc, []).append(platform_from_path(r["image_id"], PlatformRules()))
        intended = "satellite" if name == f"{loc}.jpg" else "drone" if name.startswith("image-") else "ground"
        assert platform_from_path(r["image"], PlatformRules()) == intended
        assert re.fullmatch(rf"{loc}\.jpg|image-\d\d\.jpeg|street-\d\d\.jpg", name)
    for platforms in per_loc.values():
        assert platforms.count("satellite") == 1
        assert platforms.count("drone") == KW["drone_views"]
        assert platforms.count("ground") == KW["ground_views"]


def test_train_and_test_locations_are_disjoint(world):
    out, summary = world
    train, test, locs = _load(out)
    train_locs = {location_from_image_id(r["image_id"]) for r in train}
    test_locs = {location_from_image_id(r["image_id"]) for r in test}
    assert train_locs and test_locs and not train_locs & test_locs
    assert train_locs | test_locs == set(locs)
    assert len(test_locs) == summary["test_locations"] == round(0.34 * N_LOC)
    assert {p.name for p in (out / "images" / "test").iterdir()} == test_locs


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    out, _ = world
    again = tmp_path / "again"
    synth_world(str(again), N_LOC, seed=3, **KW)
    for name in ("train.json", "test.json", "locations.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes()
    images = sorted(p.relative_to(out) for p in (out / "images").rglob("*.jp*g"))
    assert images and all((out / p).read_bytes() == (again / p).read_bytes() for p in images)
    other = tmp_path / "other"
    synth_world(str(other), N_LOC, seed=4, **KW)
    assert (other / "train.json").read_bytes() != (out / "train.json").read_bytes()
    assert (other / "locations.json").read_bytes() != (out / "locations.json").read_bytes()
    sat = "0000/0000.jpg"
    a, b = (next((w / "images").glob(f"*/{sat}")).read_bytes() for w in (out, other))
    assert a != b


def test_all_images_decode_at_the_requested_size(world):
    out, _ = world
    for path in (out / "images").rglob("*.jp*g"):
        with Image.open(path) as img:
            img.load()
            assert img.size == (KW["image_size"],) * 2 and img.mode == "RGB"


def _check_query(q: str, platform: str, attrs: dict) -> None:
    words = _words(q)
    assert 8 <= len(q.split()) <= 25, q
    assert not _is_directional(q), q
    roof_words, facade_words = set(attrs["roof_colour"].split()), set(attrs["facade_colour"].split())
    # Colours that belong to a surrounding ("a blue lake", "green trees") say nothing about the building.
    colours = _words(re.sub(r"\b(?:blue|green) (?:lake|trees|field)\b", "", q.lower())) & COLOUR_WORDS
    if platform == "satellite":
        assert not words & {"facade", "walls", "windows", "floors", "floor", "tall", "glass", "high-rise",
                            "low-rise", "mid-rise", "medium-height"}, q
        assert not any(w.endswith("-storey") for w in words), q
        assert colours <= roof_words, q
    elif platform == "ground":
        assert not words & {"roof", "rooftop", "lake", "river", "parking", "field", "crop", "crops",
                            "grass", "grassy", "domed", "gabled", "hipped", "l-shaped", "square"}, q
        assert colours <= facade_words, q
    else:
        assert colours <= roof_words | facade_words, q
    present = {"lake": attrs["water"] == "lake", "river": attrs["water"] == "river", "trees": attrs["trees"],
               "road": attrs["road"], "parking": attrs["parking"], "field": attrs["field"] is not None}
    for word, there in present.items():
        assert there or word not in words, (q, word)


def test_written_queries_are_short_undirected_and_platform_visible(world):
    out, _ = world
    _, test, locs = _load(out)
    assert test
    for r in test:
        attrs = locs[location_from_image_id(r["image_id"])]["attributes"]
        platform = platform_from_path(r["image_id"], PlatformRules())
        for q in r["caption"]:
            _check_query(q, platform, attrs)


def test_queries_over_many_locations_respect_visibility():
    """Pure text check over a larger world, so every template and attribute combination is exercised."""
    cues = 0
    for loc in sample_world(150, seed=11, test_fraction=0.3):
        for platform in ("satellite", "drone", "ground"):
            rng = np.random.default_rng([loc.scene_seed, 5])
            for q in platform_queries(loc, platform, 3, rng):
                _check_query(q, platform, loc.attributes())
                cues += any(c in q for c in ("satellite", "aerial", "overhead", "drone", "UAV", "street"))
    assert 0.25 < cues / (150 * 3 * 3) < 0.8  # about half the queries name the platform


def test_training_captions_are_long_generic_and_directional(world):
    out, _ = world
    train, _, locs = _load(out)
    assert train
    by_loc: dict[str, set[str]] = {}
    for r in train:
        attrs = locs[location_from_image_id(r["image_id"])]["attributes"]
        sentences = r["sentences"]
        assert 5 <= len(sentences) <= 9
        directional = [s for s in sentences if _is_directional(s, CLEANED)]
        assert 1 <= len(directional) <= 3, sentences
        # Generic: facade and roof are both described whatever the platform shows.
        assert attrs["roof_colour"] in r["caption"] and attrs["facade_colour"] in r["caption"]
        by_loc.setdefault(location_from_image_id(r["image_id"]), set()).add(r["caption"])
    for loc, captions in by_loc.items():
        assert len(captions) == 1 + KW["drone_views"] + KW["ground_views"], loc  # phrased per image


def test_only_directional_sentences_use_directions():
    """Cleaning drops directional sentences; the attribute sentences must survive it."""
    for loc in sample_world(60, seed=2, test_fraction=0.3):
        sentences = training_caption(loc, np.random.default_rng(loc.scene_seed))
        for s in sentences:
            if _is_directional(s, CLEANED):
                assert any(w in s.lower() for w in ("lake", "river", "trees", "road", "parking", "field")), s


def _hue_fraction(pixels: np.ndarray, hue: tuple[float, float], min_sat: float, value: tuple[float, float]) -> float:
    hsv = np.asarray(Image.fromarray(pixels).convert("HSV"), dtype=np.float32) / 255.0
    h, s, v = hsv[..., 0] * 360, hsv[..., 1], hsv[..., 2]
    lo, hi = hue
    in_hue = (h >= lo) & (h <= hi) if lo <= hi else (h >= lo) | (h <= hi)
    return float(np.mean(in_hue & (s >= min_sat) & (v >= value[0]) & (v <= value[1])))


ORANGE = dict(hue=(19.0, 37.0), min_sat=0.62, value=(0.55, 1.0))
BRICK = dict(hue=(352.0, 17.0), min_sat=0.45, value=(0.38, 0.85))


def _orange_roof_brick_walls(**kw) -> Location:
    base = dict(location_id="0000", roof_colour="orange", roof_shape="gabled", facade_colour="brick red",
                height="mid", floors=4, windows="many_small", footprint="rectangle", trees=True, road=True,
                sides={"road": "south", "trees": "east"}, scene_seed=12345)
    return Location(**{**base, **kw})


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_roof_colour_is_seen_from_above_never_from_the_street(seed):
    """Orange roof, brick-red walls: the orange detector must fire on aerial views and stay silent on street
    views, while the same kind of detector finds the brick-red facade there (so silence is not blindness)."""
    views = render_location(_orange_roof_brick_walls(scene_seed=seed), 96, 4, 3)
    by = {p: [v.pixels for v in views if v.platform == p] for p in ("satellite", "drone", "ground")}
    assert _hue_fraction(by["satellite"][0], **ORANGE) > 0.03
    drone = [_hue_fraction(p, **ORANGE) for p in by["drone"]]
    assert min(drone) > 0.004 and np.mean(drone) > 0.015  # a dim, shaded view may look more brown
    for pixels in by["ground"]:
        assert _hue_fraction(pixels, **ORANGE) < 0.003
        assert _hue_fraction(pixels, **BRICK) > 0.05
    # Straight down the walls have no area: the facade colour is absent from the satellite view.
    assert _hue_fraction(by["satellite"][0], **BRICK) < 0.005


def test_roof_colour_absent_from_street_views_across_a_world():
    checked = []
    for loc in sample_world(200, seed=9, test_fraction=0.3):
        if loc.roof_colour != "orange" or loc.facade_colour in ("yellow", "pink", "brick red"):
            continue
        views = render_location(loc, 64, 1, 2)
        assert _hue_fraction(views[0].pixels, **ORANGE) > 0.01
        assert all(_hue_fraction(v.pixels, **ORANGE) < 0.003 for v in views if v.platform == "ground")
        checked.append(loc.height)
    # Low and mid buildings show their top edge in street views: that is where a leaked roof would appear.
    assert len(checked) >= 5 and sum(h != "tall" for h in checked) >= 3


def test_views_of_a_location_differ():
    views = render_location(_orange_roof_brick_walls(), 64, 4, 3)
    pixels = [v.pixels.astype(np.float32) for v in views]
    for i in range(len(pixels)):
        for j in range(i + 1, len(pixels)):
            assert np.abs(pixels[i] - pixels[j]).mean() > 8, (views[i].file_name, views[j].file_name)


def test_contact_sheet_is_a_png(world, tmp_path):
    out, _ = world
    path = contact_sheet(str(out), "0001", str(tmp_path / "sheet.png"))
    with Image.open(io.BytesIO(Path(path).read_bytes())) as img:
        assert img.format == "PNG" and img.width > 2 * KW["image_size"]


def test_writes_through_fsspec_uris():
    from geoloc_ray import io as gio

    out = "memory://synth-test/world"
    summary = synth_world(out, 3, seed=1, **{**KW, "drone_views": 1, "ground_views": 1})
    train = gio.read_json(f"{out}/train.json")
    test = gio.read_json(f"{out}/test.json")
    assert len(train) + len(test) == 3 * 3 == sum(summary["images"].values())
    for r in train + test:
        with Image.open(io.BytesIO(gio.read_bytes(f"{out}/images/{r['image']}"))) as img:
            assert img.size == (KW["image_size"],) * 2
    gio.remove("memory://synth-test")


def test_rewriting_a_smaller_world_leaves_no_stale_images(tmp_path):
    small = {**KW, "drone_views": 1, "ground_views": 1}
    synth_world(str(tmp_path), 8, seed=1, **small)
    synth_world(str(tmp_path), 3, seed=1, **small)
    folders = {p.name for split in ("train", "test") for p in (tmp_path / "images" / split).glob("*")}
    assert folders == set(json.loads((tmp_path / "locations.json").read_text()))


def test_synth_from_config_uses_every_field(tmp_path):
    cfg = SynthConfig(locations=4, test_fraction=0.5, drone_views=1, ground_views=2, image_size=40,
                      queries_per_image=3, seed=7)
    summary = synth_from_config(cfg, str(tmp_path), progress=False)
    assert summary["images"] == {"satellite": 4, "drone": 4, "ground": 8} and summary["test_locations"] == 2
    test = json.loads((tmp_path / "test.json").read_text())
    assert all(len(r["caption"]) == 3 for r in test)
    with Image.open(next((tmp_path / "images").rglob("*.jpg"))) as img:
        assert img.size == (40, 40)
