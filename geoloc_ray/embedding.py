"""Batch embedding shared by mining, indexing and evaluation: Ray Data callables over a saved model.

Pixels are uint8 (N, H, W, 3) at the tower's input size everywhere outside the model; the conversion to the
tower's normalised float input lives here, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from geoloc_ray import io
from geoloc_ray.config import IndexConfig


def model_pixels(model, pixels: np.ndarray):
    """uint8 pixels -> the model's normalised input tensor (the tower's own preprocessing)."""
    from geoloc_ray.model import image_preprocess

    return image_preprocess(model)(pixels)


def input_size(model) -> int:
    from geoloc_ray.model import image_preprocess

    return image_preprocess(model).size


def image_vectors(model, pixels: np.ndarray, heads: Sequence[str]) -> np.ndarray:
    """concat_k v_k(I) for the given heads, float32 (N, K * D): one trunk pass for all heads."""
    import torch

    with torch.no_grad():
        trunk = model.image_trunk_output(model_pixels(model, pixels).to(model.device))
        return torch.cat([model.image_head(h, trunk) for h in heads], dim=1).cpu().numpy().astype(np.float32)


def text_vectors(model, texts: Sequence[str], head: str, batch_size: int = 256) -> np.ndarray:
    """t_head(q) for many texts, float32 (N, D)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            out.append(model.encode_text(list(texts[i : i + batch_size]), head).cpu().numpy())
    dim = model.model_cfg.embed_dim
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, dim), np.float32)


def corrupted_column(column: str, kind: str, severity: int) -> str:
    return f"{column}@{kind}-{severity}"


class ImageEmbedder:
    """`map_batches` callable: rows with `image_uri` (or `pixels`) -> one embedding column per model.

    `models` maps an output column to (model URI, heads); each image is decoded once for all of them, and
    `corruptions` add a column per (kind, severity) (robustness evaluation). Rows whose image cannot be
    decoded are dropped (and logged): an embedding is never made up.
    """

    def __init__(self, models: dict[str, tuple[str, Sequence[str]]], storage: dict | None = None,
                 torch_threads: int = 1, corruptions: Sequence[tuple[str, int]] = ()):
        import torch

        from geoloc_ray.model import load_model

        io.use_storage_options(storage)
        torch.set_num_threads(torch_threads)
        self.models = {col: (load_model(uri).eval(), list(heads)) for col, (uri, heads) in models.items()}
        self.size = input_size(next(iter(self.models.values()))[0])
        self.corruptions = [tuple(c) for c in corruptions]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from geoloc_ray.eval.corruptions import corrupt
        from geoloc_ray.train.data import decode_pixels

        if "pixels" in batch:
            pixels, keep = batch["pixels"], np.ones(len(batch["pixels"]), dtype=bool)
        else:
            pixels, ok = decode_pixels(batch["image_uri"], self.size)
            keep = np.asarray(ok, dtype=bool)
            pixels = pixels[keep]
        out = {k: np.asarray(v)[keep] for k, v in batch.items() if k != "pixels"}
        views = {None: pixels}
        for kind, severity in self.corruptions:
            views[(kind, severity)] = corrupt(pixels, kind, severity)
        for column, (model, heads) in self.models.items():
            for view, px in views.items():
                name = column if view is None else corrupted_column(column, *view)
                out[name] = image_vectors(model, px, heads) if len(px) else np.zeros(
                    (0, len(heads) * model.model_cfg.embed_dim), np.float32)
        return out


class TextEmbedder:
    """`map_batches` callable: rows with `query` and `platform` -> `embedding` from that platform's expert."""

    def __init__(self, models: dict[str, tuple[str, str]], storage: dict | None = None, torch_threads: int = 1):
        import torch

        from geoloc_ray.model import load_model

        io.use_storage_options(storage)
        torch.set_num_threads(torch_threads)
        self.models = {platform: (load_model(uri).eval(), head) for platform, (uri, head) in models.items()}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        queries = np.asarray([str(q) for q in batch["query"]], dtype=object)
        platforms = np.asarray(batch["platform"])
        out = None
        for platform, (model, head) in self.models.items():
            rows = np.flatnonzero(platforms == platform)
            if len(rows) == 0:
                continue
            vecs = text_vectors(model, list(queries[rows]), head)
            if out is None:
                out = np.zeros((len(queries), vecs.shape[1]), np.float32)
            out[rows] = vecs
        if out is None or len(set(platforms) - set(self.models)):
            raise ValueError(f"no expert for platform(s) {sorted(set(platforms) - set(self.models))}")
        batch["embedding"] = out
        return batch


def _actor_args(ic: IndexConfig) -> dict[str, Any]:
    import ray.data

    return {"compute": ray.data.ActorPoolStrategy(size=ic.num_actors), "num_cpus": ic.actor_num_cpus,
            "num_gpus": ic.actor_num_gpus or None, "batch_format": "numpy"}


def embed_images(ds, models: dict[str, tuple[str, Sequence[str]]], ic: IndexConfig,
                 corruptions: Sequence[tuple[str, int]] = ()):
    """Ray Data actor pool over image rows -> pandas frame with one embedding column per model."""
    ds = ds.map_batches(ImageEmbedder, batch_size=ic.batch_size, **_actor_args(ic),
                        fn_constructor_kwargs={"models": models, "storage": io.storage_options(),
                                               "corruptions": list(corruptions)})
    return ds.to_pandas()


def embed_texts(ds, models: dict[str, tuple[str, str]], ic: IndexConfig):
    """Ray Data actor pool over `query`/`platform` rows -> pandas frame with an `embedding` column."""
    ds = ds.map_batches(TextEmbedder, batch_size=256, **_actor_args(ic),
                        fn_constructor_kwargs={"models": models, "storage": io.storage_options()})
    return ds.to_pandas()
