"""Batch embedding shared by mining, indexing, evaluation and the submission: model calls over many inputs and
the Ray Data callables that run them on an actor pool.

Pixels are uint8 (N, H, W, 3) at the tower's input size everywhere outside the model; the conversion to the
tower's normalised float input lives here, once. This module sits below train/eval: what it does to pixels
besides decoding (eval's corruptions) is passed in as callables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from geoloc_ray import io
from geoloc_ray.config import IndexConfig
from geoloc_ray.preprocess.images import decode_pixels

PixelView = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, 3) -> same shape, e.g. a corrupted copy


class QueryVectors(NamedTuple):
    vectors: np.ndarray  # float32 (N, D) for one head, (N, K * D) fused
    gate: np.ndarray | None  # (N, K) gate weights g(q), when asked for


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

    if not len(pixels):
        return np.zeros((0, len(heads) * model.model_cfg.embed_dim), np.float32)
    with torch.no_grad():
        trunk = model.image_trunk_output(model_pixels(model, pixels).to(model.device))
        return torch.cat([model.image_head(h, trunk) for h in heads], dim=1).cpu().numpy().astype(np.float32)


def query_vectors(model, texts: Sequence[str], heads: Sequence[str] | None = None, weights: str | None = "gate",
                  with_gate: bool = False, batch_size: int = 256) -> QueryVectors:
    """The one query-encoding loop: t_h(q) of a single head (`weights=None`), else the fused concat_k(w_k t_k)
    with the gate's (`"gate"`) or equal (`"static"`) weights; `with_gate` adds g(q) from the same trunk pass.

    `heads` defaults to the model's platforms (the gate's order).
    """
    import torch

    names = list(heads) if heads is not None else list(model.platforms)
    if weights is None and len(names) != 1:
        raise ValueError(f"a single-head query vector needs one head, got {names}")
    vecs, gates = [], []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            trunk = model.text_trunk_output(list(texts[start : start + batch_size]))
            if weights is None:
                vecs.append(model.text_head(names[0], trunk).cpu().numpy())
            else:
                vecs.append(model.fused_query(trunk, weights=weights, heads=names).cpu().numpy())
            if with_gate:
                gates.append(model.gate(trunk).cpu().numpy())
    dim = model.model_cfg.embed_dim * (1 if weights is None else len(names))
    out = np.concatenate(vecs).astype(np.float32) if vecs else np.zeros((0, dim), np.float32)
    return QueryVectors(out, np.concatenate(gates) if gates else None)


def view_column(column: str, view: str) -> str:
    """The output column of `column`'s embeddings of a pixel view (e.g. `moe@blur-1`)."""
    return f"{column}@{view}"


class ImageEmbedder:
    """`map_batches` callable: rows with `image_uri` (or `pixels`) -> one embedding column per model.

    `models` maps an output column to (model URI, heads); each image is decoded once for all of them, and each
    of `views` (name -> pixel transform) adds a column per model (`view_column`). Rows whose image cannot be
    decoded are dropped (and logged): an embedding is never made up.
    """

    def __init__(self, models: dict[str, tuple[str, Sequence[str]]], storage: dict | None = None,
                 torch_threads: int = 1, views: Mapping[str, PixelView] | None = None):
        import torch

        from geoloc_ray.model import load_model

        io.use_storage_options(storage)
        torch.set_num_threads(torch_threads)
        self.models = {col: (load_model(uri).eval(), list(heads)) for col, (uri, heads) in models.items()}
        self.size = input_size(next(iter(self.models.values()))[0])
        self.views = dict(views or {})

    def _decoded(self, batch: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Pixels of the decodable rows, and those rows' other columns."""
        if "pixels" in batch:
            pixels, keep = batch["pixels"], np.ones(len(batch["pixels"]), dtype=bool)
        else:
            pixels, ok = decode_pixels(batch["image_uri"], self.size)
            keep = np.asarray(ok, dtype=bool)
            pixels = pixels[keep]
        return pixels, {k: np.asarray(v)[keep] for k, v in batch.items() if k != "pixels"}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        pixels, out = self._decoded(batch)
        # A batch whose images all failed to decode still yields (empty) columns; views need not handle it.
        views = {None: pixels} | {name: view(pixels) if len(pixels) else pixels for name, view in self.views.items()}
        for column, (model, heads) in self.models.items():
            for name, px in views.items():
                out[column if name is None else view_column(column, name)] = image_vectors(model, px, heads)
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
        unknown = sorted(set(platforms) - set(self.models))
        if unknown or not len(platforms):
            raise ValueError(f"no expert for platform(s) {unknown}")
        out = None
        for platform, (model, head) in self.models.items():
            rows = np.flatnonzero(platforms == platform)
            if len(rows):
                vecs = query_vectors(model, list(queries[rows]), [head], weights=None).vectors
                out = np.zeros((len(queries), vecs.shape[1]), np.float32) if out is None else out
                out[rows] = vecs
        batch["embedding"] = out
        return batch


def _actor_args(ic: IndexConfig) -> dict[str, Any]:
    import ray.data

    return {"compute": ray.data.ActorPoolStrategy(size=ic.num_actors), "num_cpus": ic.actor_num_cpus,
            "num_gpus": ic.actor_num_gpus or None, "batch_format": "numpy"}


def embed_images(ds, models: dict[str, tuple[str, Sequence[str]]], ic: IndexConfig,
                 views: Mapping[str, PixelView] | None = None):
    """Ray Data actor pool over image rows -> pandas frame with one embedding column per model (and view)."""
    ds = ds.map_batches(ImageEmbedder, batch_size=ic.batch_size, **_actor_args(ic),
                        fn_constructor_kwargs={"models": models, "storage": io.storage_options(),
                                               "views": dict(views or {})})
    return ds.to_pandas()


def embed_texts(ds, models: dict[str, tuple[str, str]], ic: IndexConfig):
    """Ray Data actor pool over `query`/`platform` rows -> pandas frame with an `embedding` column."""
    ds = ds.map_batches(TextEmbedder, batch_size=256, **_actor_args(ic),
                        fn_constructor_kwargs={"models": models, "storage": io.storage_options()})
    return ds.to_pandas()
