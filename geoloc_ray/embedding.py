"""Batch embedding shared by mining, indexing, evaluation and the submission: model calls over many inputs and
the Ray Data callables that run them on an actor pool.

Pixels are uint8 (N, H, W, 3) at the tower's input size everywhere outside the model; the conversion to the
tower's normalised float input lives here, once. This module sits below train/eval: what it does to pixels
besides decoding (eval's corruptions) is passed in as callables.

The actor classes run on the device the config's `device` resolves to (`geoloc_ray.devices`: under `auto`, the GPU
from geoloc_ray.devices import resolve_device, to_device
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np

from geoloc_ray import io
from geoloc_ray.config import IndexConfig
from geoloc_ray.devices import resolve_device, to_device
from geoloc_ray.model.shared_trunk import share_image_trunks, trunk_module
from geoloc_ray.preprocess.images import decode_pixels

PixelView = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, 3) -> same shape, e.g. a corrupted copy


class QueryVectors(NamedTuple):
    vectors: np.ndarray  # float32 (N, D) for one head, (N, K * D) fused
    gate: np.ndarray | None  # (N, K) gate weights g(q), when asked for


def model_pixels(model, pixels: np.ndarray):
    """uint8 pixels -> the model's normalised input tensor on the model's device: the uint8 array crosses (pinned
    and non-blocking on CUDA, a quarter of float32's bytes) and the tower's own preprocessing runs there."""
    import torch

    from geoloc_ray.model import image_preprocess

    return image_preprocess(model)(to_device(torch.from_numpy(np.ascontiguousarray(pixels)), model.device))


def input_size(model) -> int:
    from geoloc_ray.model import image_preprocess

    return image_preprocess(model).size


def autocast(device: str, bf16: bool):
    """bf16 autocast on a GPU when asked; on the CPU a no-op (fp32, the outputs the CPU path always gave)."""
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.startswith("cuda") else nullcontext()


def compile_image_path(model, heads: Sequence[str]) -> None:
    """torch.compile the image trunk and the heads' image parts in place (GPU actors with `index.compile`)."""
    import torch

    model.image_trunk = torch.compile(model.image_trunk)
    for h in heads:
        model.heads[h].image = torch.compile(model.heads[h].image)


def image_vectors(model, pixels: np.ndarray, heads: Sequence[str], bf16: bool = False,
                  trunks: dict | None = None) -> np.ndarray:
    """concat_k v_k(I) for the given heads, float32 (N, K * D): one trunk pass for all heads.

    `trunks` (one dict per pixel batch) keeps each trunk's output for the next model sharing that trunk
    (`geoloc_ray.model.shared_trunk`): several models' heads over one trunk pass."""
    import torch

    if not len(pixels):
        return np.zeros((0, len(heads) * model.model_cfg.embed_dim), np.float32)
    device = model.device
    key = id(trunk_module(model.image_trunk))
    with torch.no_grad(), autocast(device.type, bf16):
        trunk = None if trunks is None else trunks.get(key)
        if trunk is None:
            trunk = model.image_trunk_output(model_pixels(model, pixels))  # uint8 to the device, normalised there
            if trunks is not None:
                trunks[key] = trunk
        return torch.cat([model.image_head(h, trunk) for h in heads], dim=1).float().cpu().numpy()


TEXT_BATCH = 256  # texts per trunk call when a caller names none (`index.text_batch_size` in the Ray Data stages)


def query_vectors(model, texts: Sequence[str], heads: Sequence[str] | None = None, weights: str | None = "gate",
                  with_gate: bool = False, batch_size: int = TEXT_BATCH) -> QueryVectors:
    """Queries under one encoding: t_h(q) of a single head (`weights=None`), else the fused concat_k(w_k t_k)
    with the gate's (`"gate"`) or equal (`"static"`) weights; `with_gate` adds g(q) from the same trunk pass.
    Built on `head_query_vectors` (one loop over the queries); a caller that needs several encodings of the same
    queries (eval's variants) calls that directly. `heads` defaults to the model's platforms (the gate's order).
    """
    import torch

    from geoloc_ray.model import fusion

    names = model.expert_names(heads)
    if weights is None and len(names) != 1:
        raise ValueError(f"a single-head query vector needs one head, got {names}")
    if weights not in (None, "gate", "static"):
        raise ValueError(f"weights must be 'gate', 'static' or None, got {weights!r}")
    if weights == "gate" and names != model.platforms:
        raise ValueError(f"the gate weighs {model.platforms} in that order; got heads {names}")
    parts, gate = head_query_vectors(model, texts, names, with_gate=with_gate or weights == "gate",
                                     batch_size=batch_size)
    if weights is None:
        return QueryVectors(parts[names[0]], gate if with_gate else None)
    w = torch.from_numpy(gate) if weights == "gate" else fusion.static_weights(len(texts), len(names))
    fused = fusion.fuse_query([torch.from_numpy(parts[h]) for h in names], w.float())
    return QueryVectors(fused.numpy().astype(np.float32, copy=False), gate if with_gate else None)


def head_query_vectors(model, texts: Sequence[str], heads: Sequence[str], with_gate: bool = False,
                       batch_size: int = TEXT_BATCH) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Each head's unit query vectors t_h(q) (and g(q)) from ONE trunk pass: every query variant of one model (a
    head alone, or fused under any weights) is built from these; eval's ten variants had run the trunk eight times."""
    import torch

    names = list(heads)
    vecs: dict[str, list[np.ndarray]] = {h: [] for h in names}
    gates = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            trunk = model.text_trunk_output(list(texts[start : start + batch_size]))
            for h in names:
                vecs[h].append(model.text_head(h, trunk).float().cpu().numpy())
            if with_gate:
                gates.append(model.gate(trunk).float().cpu().numpy())
    dim = model.model_cfg.embed_dim
    out = {h: np.concatenate(v).astype(np.float32) if v else np.zeros((0, dim), np.float32) for h, v in vecs.items()}
    gate = (np.concatenate(gates) if gates else np.zeros((0, len(model.platforms)), np.float32)) if with_gate else None
    return out, gate


def view_column(column: str, view: str) -> str:
    """The output column of `column`'s embeddings of a pixel view (e.g. `moe@blur-1`)."""
    return f"{column}@{view}"


class _Embedder:
    """Model loading shared by the actor classes: onto the device `device` (the config's) resolves to here, in
    eval mode."""

    def __init__(self, storage: dict | None, torch_threads: int, bf16: bool, device: str = "auto"):
        import torch

        io.use_storage_options(storage)
        torch.set_num_threads(torch_threads)
        self.device, self.bf16 = resolve_device(device), bf16

    def _load(self, uri: str):
        """The model on this actor's device; on a GPU with `bf16`, its weights in bf16 too (autocast alone leaves
        fp32 weights to be cast at every layer: about 2.6x slower for EVA02-L, docs/BENCHMARKS.md)."""
        import torch

        from geoloc_ray.model import load_model

        model = load_model(uri, device=self.device).eval()
        return model.to(torch.bfloat16) if self.bf16 and self.device == "cuda" else model


class ImageEmbedder(_Embedder):
    """`map_batches` callable: rows with `image_uri` (or `pixels`) -> one embedding column per model.

    `models` maps an output column to (model URI, heads); each image is decoded once for all of them, and each of
    `views` (name -> pixel transform) adds a column per model (`view_column`). Rows with `pixels` (what
    `decode_images` made in a CPU stage before it: `embedding_dataset`) go straight to the device; rows with only
    `image_uri` (direct calls) are decoded here, on `decode_threads` threads. Rows whose image cannot be decoded
    are dropped (and logged): an embedding is never made up.
    """

    def __init__(self, models: dict[str, tuple[str, Sequence[str]]], storage: dict | None = None,
                 torch_threads: int = 1, views: Mapping[str, PixelView] | None = None, bf16: bool = True,
                 compile: bool = False, decode_threads: int = 1, device: str = "auto"):
        from concurrent.futures import ThreadPoolExecutor

        super().__init__(storage, torch_threads, bf16, device)
        self.models = {col: (self._load(uri), list(heads)) for col, (uri, heads) in models.items()}
        share_image_trunks([model for model, _ in self.models.values()])  # one trunk pass for models sharing it
        if compile and self.device == "cuda":
            for model, heads in self.models.values():
                compile_image_path(model, heads)
        self.size = input_size(next(iter(self.models.values()))[0])
        self.views = dict(views or {})
        self.decode_threads = decode_threads
        self._pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") if decode_threads > 1 else None

    def _decode(self, uris: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """decode_pixels over the uris, split across the decode threads (PIL releases the GIL while decoding)."""
        if self._pool is None or len(uris) < 2:
            return decode_pixels(uris, self.size)
        chunks = [c for c in np.array_split(np.asarray(uris, dtype=object), self.decode_threads) if len(c)]
        parts = list(self._pool.map(lambda c: decode_pixels(list(c), self.size), chunks))
        return np.concatenate([p[0] for p in parts]), [ok for p in parts for ok in p[1]]

    def _decoded(self, batch: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Pixels of the decodable rows, and those rows' other columns."""
        if "pixels" in batch:
            pixels, keep = batch["pixels"], np.ones(len(batch["pixels"]), dtype=bool)
        else:
            pixels, ok = self._decode(list(batch["image_uri"]))
            keep = np.asarray(ok, dtype=bool)
            pixels = pixels[keep]
        return pixels, {k: np.asarray(v)[keep] for k, v in batch.items() if k != "pixels"}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        pixels, out = self._decoded(batch)
        # A batch whose images all failed to decode still yields (empty) columns; views need not handle it.
        views = {None: pixels} | {name: view(pixels) if len(pixels) else pixels for name, view in self.views.items()}
        for name, px in views.items():
            trunks: dict = {}  # this view's trunk outputs, reused by every model sharing the trunk
            for column, (model, heads) in self.models.items():
                out[column if name is None else view_column(column, name)] = image_vectors(model, px, heads, self.bf16,
                                                                                         trunks)
        return out


class TextEmbedder(_Embedder):
    """`map_batches` callable: rows with `query` and `platform` -> `embedding` from that platform's expert, its
    trunk called on `batch_size` texts at a time."""

    def __init__(self, models: dict[str, tuple[str, str]], storage: dict | None = None, torch_threads: int = 1,
                 bf16: bool = True, device: str = "auto", batch_size: int = TEXT_BATCH):
        super().__init__(storage, torch_threads, bf16, device)
        self.models = {platform: (self._load(uri), head) for platform, (uri, head) in models.items()}
        self.batch_size = batch_size

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
                with autocast(self.device, self.bf16):
                    vecs = query_vectors(model, list(queries[rows]), [head], weights=None,
                                         batch_size=self.batch_size).vectors
                out = np.zeros((len(queries), vecs.shape[1]), np.float32) if out is None else out
                out[rows] = vecs
        batch["embedding"] = out
        return batch


def _actor_args(ic: IndexConfig) -> dict[str, Any]:
    import ray.data

    return {"compute": ray.data.ActorPoolStrategy(size=ic.actors.count), "num_cpus": ic.actors.num_cpus,
            "num_gpus": ic.actors.num_gpus or None, "batch_format": "numpy"}


def _runtime_kwargs(ic: IndexConfig, device: str) -> dict[str, Any]:
    return {"storage": io.storage_options(), "torch_threads": ic.torch_threads, "bf16": ic.bf16, "device": device}


def decode_images(batch: dict[str, Any], size: int, storage: dict | None = None) -> dict[str, Any]:
    """`map_batches` function of the CPU stage before the embedding actors: `image_uri` -> uint8 `pixels` at the
    tower's input size; rows whose image cannot be decoded are dropped (decode_pixels logs them)."""
    io.use_storage_options(storage)
    pixels, ok = decode_pixels(list(batch["image_uri"]), size)
    keep = np.asarray(ok, dtype=bool)
    return {**{k: np.asarray(v)[keep] for k, v in batch.items()}, "pixels": pixels[keep]}


def models_input_size(models: Mapping[str, tuple[str, Any]]) -> int:
    """The one input size of the models' image towers (from their manifests), which the decode stage resizes to."""
    from geoloc_ray.model import image_preprocess, read_manifest

    sizes = {uri: image_preprocess(read_manifest(uri)).size for uri, _ in models.values()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the models' image towers take different input sizes {sizes}: embed them in separate passes")
    return next(iter(sizes.values()))


def embedding_dataset(ds, models: dict[str, tuple[str, Sequence[str]]], ic: IndexConfig,
                      views: Mapping[str, PixelView] | None = None, device: str = "auto"):
    """The lazy Ray Dataset of image rows + one embedding column per model (and view): stream it to storage.
    Images are decoded and resized by CPU tasks (one CPU each; Ray Data runs as many as the cluster's CPUs allow,
    docs/BENCHMARKS.md sizes a GPU node's CPUs by it), the actors take uint8 batches. `device` is the config's root
    `device` (each actor resolves it where it runs)."""
    pixels = ds.map_batches(decode_images, batch_size=ic.actors.batch_size, num_cpus=1, batch_format="numpy",
                            fn_kwargs={"size": models_input_size(models), "storage": io.storage_options()})
    return pixels.map_batches(ImageEmbedder, batch_size=ic.actors.batch_size, **_actor_args(ic),
                              fn_constructor_kwargs={"models": models, "views": dict(views or {}),
                                                     "compile": ic.compile, **_runtime_kwargs(ic, device)})


def embed_images(ds, models: dict[str, tuple[str, Sequence[str]]], ic: IndexConfig,
                 views: Mapping[str, PixelView] | None = None, device: str = "auto"):
    """`embedding_dataset` collected as a pandas frame (test-gallery sized callers: eval, submit)."""
    return embedding_dataset(ds, models, ic, views, device).to_pandas()


def text_embedding_dataset(ds, models: dict[str, tuple[str, str]], ic: IndexConfig, device: str = "auto"):
    """The lazy Ray Dataset of `query`/`platform` rows + an `embedding` column (its platform's expert), in batches
    of `index.text_batch_size`."""
    return ds.map_batches(TextEmbedder, batch_size=ic.text_batch_size, **_actor_args(ic),
                          fn_constructor_kwargs={"models": models, "batch_size": ic.text_batch_size,
                                                 **_runtime_kwargs(ic, device)})


def embed_texts(ds, models: dict[str, tuple[str, str]], ic: IndexConfig, device: str = "auto"):
    """`text_embedding_dataset` collected as a pandas frame."""
    return text_embedding_dataset(ds, models, ic, device).to_pandas()
