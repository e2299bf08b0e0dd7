"""Reading a built index: manifest, shards and gallery metadata; refuses an index of another model version."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from geoloc_ray import artifacts, io
from geoloc_ray.index.faiss_index import IndexSpec, deserialize, merge_topk, search, to_device

META_COLUMNS = ["image_id", "location_id", "platform", "lat", "lon", "image_uri"]


class IndexMismatchError(RuntimeError):
    """The index was built from different model weights than the ones serving queries."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def latest_build(index_root: str) -> str:
    """URI of the current build (`index/LATEST.json` is switched last, so readers never see half a build)."""
    pointer = artifacts.require(io.join(index_root, artifacts.INDEX_LATEST), "index")
    return io.join(index_root, io.read_json(pointer)["build"])


def read_manifest(build_uri: str) -> dict[str, Any]:
    return io.read_json(io.join(build_uri, "manifest.json"))


def check_model_version(manifest: dict[str, Any], model_version: str) -> None:
    if manifest["model_version"] != model_version:
        raise IndexMismatchError(
            f"index built by model {manifest['model_version']} but serving model {model_version}: "
            "rebuild the index (`geoloc-ray index`) for this model"
        )


def check_expert_order(experts: Sequence[str] | None, model_platforms: Sequence[str], what: str = "index") -> None:
    """Refuse gallery columns in another expert order than the model's gate (its manifest's `platforms`): the
    fused query concat_k(g_k t_k) would meet the wrong experts' image vectors, silently."""
    if experts is None:
        raise IndexMismatchError(f"the {what} does not record its expert order: rebuild it (`geoloc-ray index`)")
    if list(experts) != list(model_platforms):
        raise IndexMismatchError(
            f"the {what} has expert columns in order {list(experts)} but the model's gate weighs "
            f"{list(model_platforms)} (models/<name>/manifest.json `platforms`): set model.platforms to "
            f"{list(model_platforms)} and rebuild the index (`geoloc-ray index`)")


def check_experts_for_model(experts: Sequence[str], model_uri: str, what: str) -> None:
    """`check_expert_order` against the model at `model_uri` (its manifest alone is read)."""
    check_expert_order(experts, io.read_json(io.join(model_uri, "manifest.json"))["platforms"], what)


def check_build(manifest: dict[str, Any], model_manifest: dict[str, Any]) -> None:
    """An index build fits a model: same weights (model_version) and the same expert column order."""
    check_model_version(manifest, model_manifest["model_version"])
    check_expert_order(manifest.get("experts"), model_manifest["platforms"], f"index build {manifest['build']}")


@dataclass
class Shard:
    """One faiss shard; local ids + offset = global gallery row. `device_index` is its GPU copy when this
    process has a GPU (`to_device`); restricted searches (ID selectors) run on the CPU index."""

    index: Any
    offset: int
    device_index: Any = None

    def search(self, queries: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by global id; `params` (see `restricted_params`) limits the search to some local ids."""
        if params is None:
            scores, ids = search(self.index if self.device_index is None else self.device_index, queries, k)
        else:
            k = min(k, self.index.ntotal)
            scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        return scores, np.where(ids >= 0, ids + self.offset, -1)


def restricted_params(index: Any, local_ids: np.ndarray) -> Any:
    """faiss search parameters with an ID selector: the index's own ranking over `local_ids` only (not a
    post-filter of a short list), keeping the nprobe / efSearch the build set."""
    import faiss

    sel = faiss.IDSelectorBatch(np.ascontiguousarray(local_ids, dtype=np.int64))
    ivf, inner = faiss.try_extract_index_ivf(index), faiss.downcast_index(index)
    if ivf is not None:
        params = faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe)
    elif isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=sel, efSearch=inner.hnsw.efSearch)
    else:
        params = faiss.SearchParameters(sel=sel)
    params.referenced_objects = [sel]  # the C++ params hold a bare pointer: keep the selector alive with them
    return params


def load_shard(build_uri: str, manifest: dict[str, Any], number: int) -> Shard:
    entry = manifest["shards"][number]
    data = io.read_bytes(io.join(build_uri, entry["file"]))
    if sha256(data) != entry["sha256"]:
        raise IndexMismatchError(f"{entry['file']}: checksum mismatch (corrupt or partial copy)")
    spec = IndexSpec(**manifest["spec"])
    index = deserialize(data, spec)
    moved = to_device(index, spec)
    return Shard(index, entry["offset"], None if moved is index else moved)


def load_metadata(build_uri: str, manifest: dict[str, Any]):
    return io.read_parquet(io.join(build_uri, manifest["metadata"]))


class GalleryIndex:
    """All shards of a build in one process (eval, submit, benchmarks; Serve spreads shards over replicas)."""

    def __init__(self, build_uri: str):
        self.build_uri = build_uri
        self.manifest = read_manifest(build_uri)
        self.shards = [load_shard(build_uri, self.manifest, i) for i in range(len(self.manifest["shards"]))]
        self.metadata = load_metadata(build_uri, self.manifest)

    @classmethod
    def latest(cls, index_root: str) -> GalleryIndex:
        return cls(latest_build(index_root))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return merge_topk([s.search(queries, k) for s in self.shards], k)
