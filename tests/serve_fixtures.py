"""A trained-looking run without training, and a Serve deployment of it, for the serve tests and benches.

`make_tiny_run` saves a random-headed PE-MoE model (MiniLM text tower + the tiny ViT) as `models/moe`, writes
~30 small JPEGs and three index builds with `write_build`: A (the first 24 images), B (all 30, LATEST) and a
build whose manifest names another model version (must be refused).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PLATFORMS = ["satellite", "drone", "ground"]
REPO = Path(__file__).resolve().parent.parent


@dataclass
class TinyRun:
    artifacts: Path
    model_uri: str
    model_version: str
    frame: Any  # pandas: image_id, location_id, platform, lat, lon, image_uri, embedding (all 30 images)
    build_a: str  # first 24 images
    build_b: str  # all images (LATEST)
    build_bad: str  # a build whose manifest names another model version
    shards: int

    def vectors(self, build: str) -> tuple[np.ndarray, list[str]]:
        rows = self.frame if build == self.build_b else self.frame.iloc[:24]
        return np.stack(rows["embedding"].to_numpy()).astype(np.float32), list(rows["image_id"])


def _image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A background colour with a few random rectangles: distinct images, cheap to make."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 8, 2)
        w, h = rng.integers(6, size // 2, 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, 3)
    return img


def _gallery(root: Path, n: int, size: int, seed: int = 0):
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows, pixels = [], []
    for i in range(n):
        loc, platform = f"{i // 3:04d}", PLATFORMS[i % 3]
        path = root / "images" / loc / f"{platform}-{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(rng, size)).save(path, "JPEG", quality=95)
        pixels.append(np.asarray(Image.open(path).convert("RGB")))  # embed what the file decodes to
        known = i % 5 != 4  # some locations without coordinates
        rows.append({"image_id": f"{loc}/{path.name}", "location_id": loc, "platform": platform,
                     "lat": 30.0 + i / 100 if known else float("nan"),
                     "lon": 120.0 + i / 100 if known else float("nan"), "image_uri": str(path)})
    return pd.DataFrame(rows), np.stack(pixels)


def _next_second() -> None:
    """Build ids have one-second resolution: make the next build's id differ."""
    time.sleep(1.05 - (time.time() % 1.0))


def make_tiny_run(root: Path, n_images: int = 30, shards: int = 2) -> TinyRun:
    from geoloc_ray import artifacts
    from geoloc_ray.config import Config, IndexConfig
    from geoloc_ray.embedding import image_vectors, input_size
    from geoloc_ray.index.build import write_build
    from geoloc_ray.model import build_model, save_model

    cfg = Config(artifacts=str(root / "artifacts"), index=IndexConfig(shards=shards))
    model = build_model(cfg.model, heads=PLATFORMS, gate=True, seed=0).eval()
    model_uri = artifacts.model_dir(cfg, artifacts.MOE)
    manifest = save_model(model, model_uri, cfg)
    frame, pixels = _gallery(root / "gallery", n_images, input_size(model))
    frame["embedding"] = list(image_vectors(model, pixels, PLATFORMS))
    build_a = write_build(cfg, frame.iloc[:24].reset_index(drop=True), manifest, model_uri)["build"]
    bad = write_build(cfg, frame, {**manifest, "model_version": "0" * 16}, model_uri)["build"]
    _next_second()
    build_b = write_build(cfg, frame, manifest, model_uri)["build"]
    return TinyRun(root / "artifacts", model_uri, manifest["model_version"], frame, build_a, build_b, bad, shards)


def app_config(run: TinyRun, build: str, **args: Any) -> dict:
    """The repository's serve_config.yaml pointed at `run`, with fixed replicas (no autoscaling on 2 CPUs)."""
    import yaml

    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    app = raw["applications"][0]
    app["args"] = {**app.get("args", {}), "artifacts": str(run.artifacts), "index_build": build, **args}
    app["deployments"] = [{"name": f"IndexShard_{i}", "user_config": {"index_build": build}}
                          for i in range(run.shards)]
    return {"applications": [app]}


def deploy(config: dict, port: int | None = None) -> None:
    """What `serve run serve_config.yaml` / `serve deploy` do: a declarative deploy (user_config updates
    then reconfigure replicas in place instead of replacing them)."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    client = serve_start(http_options={"host": "127.0.0.1", "port": port} if port else None)
    client.deploy_apps(ServeDeploySchema.model_validate(config))


def wait_running(app: str, timeout_s: float = 240.0) -> None:
    from ray import serve

    deadline = time.time() + timeout_s
    status = None
    while time.time() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"app {app} {status.status}: {status.message}\n{status.deployments}")
        time.sleep(0.5)
    raise TimeoutError(f"app {app} not RUNNING after {timeout_s}s: {status}")
