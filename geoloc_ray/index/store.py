"""Reading a built index: manifest, shards and gallery metadata; refuses an index of another model version."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from geoloc_ray import artifacts, io
from geoloc_ray.index.faiss_index import IndexSpec, deserialize, merge_topk, search

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


@dataclass
class Shard:
    """One faiss shard; local ids + offset = global gallery row."""

    index: Any
    offset: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = search(self.index, queries, k)
        return scores, np.where(ids >= 0, ids + self.offset, -1)


def load_shard(build_uri: str, manifest: dict[str, Any], number: int) -> Shard:
    entry = manifest["shards"][number]
    data = io.read_bytes(io.join(build_uri, entry["file"]))
    if sha256(data) != entry["sha256"]:
        raise IndexMismatchError(f"{entry['file']}: checksum mismatch (corrupt or partial copy)")
    return Shard(deserialize(data, IndexSpec(**manifest["spec"])), entry["offset"])


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
