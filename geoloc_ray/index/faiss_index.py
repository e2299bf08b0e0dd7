"""faiss indexes over fused gallery vectors: one inner-product search gives the exact PE-MoE ranking."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from geoloc_ray.config import IndexConfig

log = logging.getLogger(__name__)


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


def new_index(dim: int, spec: IndexSpec):
    """An empty inner-product index of `spec` (untrained when the kind needs training)."""
    import faiss

    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False  # only polysemous search uses it, and it is the slowest part to build
    return index


def build_index(vectors: np.ndarray, spec: IndexSpec, train_sample: int = 200_000, seed: int = 0):
    """Train (when the index needs it) and add all vectors, ids = row numbers."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = new_index(vectors.shape[1], spec)
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

    on_gpu = hasattr(faiss, "GpuParameterSpace") and "Gpu" in type(index).__name__
    params = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
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


def usable_gpus() -> int:
    """GPUs faiss may use in this process: none in a Ray worker that was assigned none (it would take another
    worker's GPU), else what faiss sees (0 with faiss-cpu)."""
    import faiss

    from geoloc_ray.devices import ray_withheld_gpus

    return 0 if ray_withheld_gpus() or not hasattr(faiss, "get_num_gpus") else faiss.get_num_gpus()


def to_device(index, spec: IndexSpec | None = None):
    """The index on this process's GPU(s) when there are any (faiss-gpu), else unchanged on the CPU. Kinds faiss
    has no GPU version of (HNSW) stay on the CPU."""
    import faiss

    if usable_gpus() == 0:
        return index
    try:
        moved = faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as exc:  # e.g. HNSW: no GPU implementation
        log.warning("faiss index %s stays on the CPU: %s", type(index).__name__, exc)
        return index
    if spec is not None:
        set_search_params(moved, spec)
    return moved


def exact_search(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k (scores, row ids) of every query over the gallery, on the GPU when there is
    one: the one brute-force search that mining, evaluation and the Track 4 submission share."""
    import faiss

    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    index = to_device(index)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(gallery)))
