"""The index stage: Ray Data embeds the gallery with every expert's image head -> sharded faiss + manifest."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config
from geoloc_ray.index.faiss_index import build_index, choose_spec, serialize, shard_rows
from geoloc_ray.index.store import META_COLUMNS, sha256


def gallery_dataset(cfg: Config):
    """Prepared rows of the configured split(s): the images that queries are answered from."""
    splits = ["train", "test"] if cfg.index.split == "all" else [cfg.index.split]
    uris = [artifacts.prepared(cfg, s) for s in splits]
    datasets = [io.read_dataset_parquet(u, columns=META_COLUMNS) for u in uris]
    return datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])


def write_build(cfg: Config, frame, model_manifest: dict[str, Any], model_uri: str) -> dict[str, Any]:
    """Write shards + metadata + manifest under a new build folder, then switch `LATEST.json` to it."""
    vectors = np.stack(frame["embedding"].to_numpy()).astype(np.float32)
    parts = shard_rows(len(vectors), cfg.index.shards)
    # Each shard is its own faiss index: size the index (exact or not, IVF lists) for a shard, not the gallery.
    spec = choose_spec(max(len(r) for r in parts), vectors.shape[1], cfg.index)
    build_id = f"build-{time.strftime('%Y%m%d-%H%M%S')}-{model_manifest['model_version'][:8]}"
    build_uri = artifacts.index_build(cfg, build_id)
    shards = []
    for number, rows in enumerate(parts):
        data = serialize(build_index(vectors[rows], spec, seed=cfg.seed))
        name = f"shard-{number:03d}.faiss"
        io.write_bytes(io.join(build_uri, name), data)
        shards.append({"file": name, "offset": int(rows[0]) if len(rows) else 0, "n": len(rows),
                       "sha256": sha256(data)})
    io.write_parquet(io.join(build_uri, "gallery.parquet"), frame[META_COLUMNS].reset_index(drop=True))
    manifest = {
        "build": build_id, "model_uri": model_uri, "model_version": model_manifest["model_version"],
        "heads": model_manifest.get("heads"), "dim": int(vectors.shape[1]), "n": int(len(vectors)),
        "spec": {"factory": spec.factory, "nprobe": spec.nprobe, "ef_search": spec.ef_search},
        "shards": shards, "metadata": "gallery.parquet", "split": cfg.index.split,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    io.write_json(io.join(build_uri, "manifest.json"), manifest)
    io.write_json(artifacts.index_latest(cfg), {"build": build_id})
    return manifest


def run_index(cfg: Config) -> dict[str, Any]:
    """Index the gallery with the assembled PE-MoE model (`artifacts.MOE`)."""
    from geoloc_ray.embedding import embed_images
    from geoloc_ray.runtime import init_ray

    artifacts.apply_storage_options(cfg)
    init_ray(cfg)
    model_uri = artifacts.model_dir(cfg, artifacts.MOE)
    model_manifest = io.read_json(artifacts.require(artifacts.model_manifest(cfg, artifacts.MOE), "train"))
    frame = embed_images(gallery_dataset(cfg), {"embedding": (model_uri, list(cfg.model.platforms))}, cfg.index)
    if frame.empty:
        raise ValueError("the gallery is empty (no decodable images in the indexed split)")
    manifest = write_build(cfg, frame, model_manifest, model_uri)
    return {k: manifest[k] for k in ("build", "n", "dim", "spec", "model_version")} | {
        "shards": len(manifest["shards"])}
