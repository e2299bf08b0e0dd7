"""Test helpers shared by several test files."""

from __future__ import annotations

import json
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jpeg(path: Path, color=(200, 40, 40), size: int = 32) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path, "JPEG")


def make_geotext_corpus(root: Path, *, corrupt: bool = True, malformed: bool = True) -> dict:
    """A minimal University-1652-style corpus: 2 train + 1 test location, 3 platforms each."""
    train, test = [], []
    long_caption = (
        "The building has a red gabled roof. Its facade is cream with many small windows. "
        "To the north of the building there is a lake. A road runs on the left side. It is a tall building."
    )
    for split, locs, out in (("train", ["0001", "0002"], train), ("test", ["0003"], test)):
        for loc in locs:
            for name in (f"{loc}.jpg", "image-01.jpeg", "street-01.jpg"):
                write_jpeg(root / "images" / split / loc / name)
                rec = {"image_id": f"{loc}/{name}", "image": f"{split}/{loc}/{name}", "sentences": [],
                       "bboxes": [[0.5, 0.5, 0.4, 0.4]]}
                rec["caption"] = long_caption if split == "train" else [f"a red roof at {loc} seen from above"]
                out.append(rec)
    if corrupt:
        bad = root / "images" / "train" / "0002" / "image-02.jpeg"
        bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
        train.append({"image_id": "0002/image-02.jpeg", "image": "train/0002/image-02.jpeg",
                      "caption": long_caption, "sentences": [], "bboxes": []})
        train.append({"image_id": "0002/image-03.jpeg", "image": "train/0002/image-03.jpeg",
                      "caption": long_caption, "sentences": [], "bboxes": []})  # missing file
    if malformed:
        train.append({"image_id": "0001/image-09.jpeg", "caption": 42})  # no 'image', caption not text
    (root / "train.json").write_text(json.dumps(train, indent=1))
    (root / "test.json").write_text(json.dumps(test, indent=1))
    coords = {loc: {"lat": 30.0 + i, "lon": 120.0 + i} for i, loc in enumerate(["0001", "0002", "0003"])}
    (root / "locations.json").write_text(json.dumps(coords))
    return {"train": train, "test": test}


def assert_close_scaled(actual, expected, rel: float = 1e-6) -> None:
    """Equal up to `rel` of the expected output's scale: two call paths may pick different CPU kernels (oneDNN
    chooses by shape and CPU), so bitwise equality is not a property; a wrong layer is off by far more."""
    import torch

    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * max(scale, 1e-12))


def prepared_world_with_model(root: Path, *, locations: int, seed: int, model_name: str, settings: dict):
    """A small synthetic world, prepared, and a random-weight model with every expert head and a gate saved as
    models/<model_name>: what the index and mining tests run their stage on. Returns (config, model, its URI)."""
    from geoloc_ray import artifacts
    from geoloc_ray.config import config_from_dict
    from geoloc_ray.corpus.synth.build import synth_world
    from geoloc_ray.model import build_model, save_model
    from geoloc_ray.preprocess.prepare import run_prepare

    synth_world(str(root / "world"), locations=locations, seed=seed, drone_views=2, ground_views=1, image_size=64,
                progress=False)
    cfg = config_from_dict({"data": {"root": str(root / "world")}, "artifacts": str(root / "art"), **settings})
    run_prepare(cfg)
    model = build_model(cfg.model, heads=list(cfg.model.platforms), gate=True, seed=0).eval()
    uri = artifacts.model_dir(cfg, model_name)
    save_model(model, uri, cfg)
    return cfg, model, uri
