"""faiss indexes over fused gallery vectors: one inner-product search gives the exact PE-MoE ranking."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from geoloc_ray.config import IndexConfig


@dataclass(frozen=True)
class IndexSpec:
    factory: str  # a faiss index_factory string
    nprobe: int | None = None
    ef_search: int | None = None


def choose_spec(n: int, dim: int, cfg: IndexConfig) -> IndexSpec:
    """Exact below `exact_below` vectors (auto), else IVF / HNSW / IVF-PQ as configured."""
    kind = cfg.kind
    if kind == "auto":
        kind = "flat" if n < cfg.exact_below else "ivf"
    nlist = cfg.nlist or max(1, min(int(4 * math.sqrt(max(n, 1))), n // 39 or 1))
    if kind == "flat":
        return IndexSpec("Flat")
    if kind == "hnsw":
        return IndexSpec(f"HNSW{cfg.hnsw_m},Flat", ef_search=cfg.ef_search)
    if kind == "ivf":
        return IndexSpec(f"IVF{nlist},Flat", nprobe=min(cfg.nprobe, nlist))
    if kind == "ivfpq":
        if dim % cfg.pq_m:
            raise ValueError(f"index.pq_m={cfg.pq_m} must divide the fused dimension {dim}")
        return IndexSpec(f"IVF{nlist},PQ{cfg.pq_m}", nprobe=min(cfg.nprobe, nlist))
    raise ValueError(f"unknown index kind {kind!r}")


def build_index(vectors: np.ndarray, spec: IndexSpec, train_sample: int = 200_000, seed: int = 0):
    """Train (when the index needs it) and add all vectors, ids = row numbers."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.index_factory(vectors.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False  # only polysemous search uses it, and it is the slowest part to build
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors if len(vectors) <= train_sample else vectors[rng.choice(len(vectors), train_sample, False)]
        index.train(sample)
    index.add(vectors)
    set_search_params(index, spec)
    return index


def set_search_params(index, spec: IndexSpec) -> None:
    """faiss's own parameter setter works through wrappers (IVF inside PreTransform, HNSW, ...)."""
    import faiss

    params = faiss.ParameterSpace()
    if spec.nprobe is not None:
        params.set_index_parameter(index, "nprobe", spec.nprobe)
    if spec.ef_search is not None:
        params.set_index_parameter(index, "efSearch", spec.ef_search)


def serialize(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes, spec: IndexSpec):
    import faiss

    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    set_search_params(index, spec)
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, global ids) into the global top-k per query (missing = id -1)."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(ids < 0, -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def shard_rows(n: int, shards: int) -> list[np.ndarray]:
    """Row numbers of each shard: contiguous ranges, so a shard's local id + offset = global id."""
    bounds = np.linspace(0, n, shards + 1).astype(int)
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(shards)]


def exact_search(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k (scores, row ids) of every query over the gallery: the one brute-force search
    that mining, evaluation and the Track 4 submission share."""
    import faiss

    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(gallery)))
