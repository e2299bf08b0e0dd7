"""The index stage: Ray Data embeds the gallery with every expert's image head and streams the vectors to the
build folder; Ray tasks then train (on a sample) and fill the faiss shards from storage; the driver coordinates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config, IndexConfig
from geoloc_ray.index import stream
from geoloc_ray.index.faiss_index import choose_spec
from geoloc_ray.index.store import META_COLUMNS, check_expert_order

METADATA = "gallery.parquet"


def gallery_dataset(cfg: Config):
    """Prepared rows of the configured split(s): the images that queries are answered from."""
    splits = ["train", "test"] if cfg.index.split == "all" else [cfg.index.split]
    uris = [artifacts.prepared(cfg, s) for s in splits]
    datasets = [io.read_dataset_parquet(u, columns=META_COLUMNS) for u in uris]
    return datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])


def new_build(cfg: Config, model_manifest: dict[str, Any]) -> tuple[str, str]:
    """(build id, build folder URI) of a new build of this model."""
    build_id = f"build-{time.strftime('%Y%m%d-%H%M%S')}-{model_manifest['model_version'][:8]}"
    return build_id, artifacts.index_build(cfg, build_id)


def write_embeddings(ds, build_uri: str) -> None:
    """Stream an embedding dataset (META_COLUMNS + `embedding`) to the build folder, block by block."""
    ds = ds.select_columns([*META_COLUMNS, stream.EMBEDDING]).map_batches(
        stream.as_fixed_size_list, batch_format="pyarrow", num_cpus=0.25)
    io.write_dataset_parquet(ds, artifacts.index_embeddings(build_uri))


def _runner(remote: bool, num_cpus: float) -> tuple[Callable, Callable]:
    """(submit, gather): Ray tasks off the driver, or plain calls here (small in-memory builds, tests)."""
    if not remote:
        return (lambda fn, *args: fn(*args)), (lambda results: results)
    import ray

    tasks: dict[Callable, Any] = {}

    def submit(fn: Callable, *args: Any):
        task = tasks.setdefault(fn, ray.remote(fn).options(num_cpus=num_cpus))
        return task.remote(*args)

    return submit, ray.get


def build_from_embeddings(ic: IndexConfig, build_id: str, build_uri: str, experts: Sequence[str],
                          model_manifest: dict[str, Any], model_uri: str, seed: int = 0,
                          remote: bool = True) -> dict[str, Any]:
    """Shards + metadata + manifest from the build's embeddings folder; the driver holds only file lists."""
    check_expert_order(experts, model_manifest["platforms"], "gallery embedding (config model.platforms)")
    parts = stream.list_parts(artifacts.index_embeddings(build_uri))
    n = stream.gallery_size(parts)
    if not n:
        raise ValueError("the gallery is empty (no decodable images in the indexed split)")
    dim = stream.vector_dim(parts)
    bounds = np.linspace(0, n, ic.shards + 1).astype(int)
    # Each shard is its own faiss index: size the index (exact or not, IVF lists) for a shard, not the gallery.
    spec = choose_spec(int(np.diff(bounds).max()), dim, ic)
    submit, gather = _runner(remote, ic.build_num_cpus)
    storage = io.storage_options()
    trained = submit(stream.train_index, parts, spec, dim, ic.train_sample, seed, storage)  # one object, all shards
    names = [f"shard-{i:03d}.faiss" for i in range(ic.shards)]
    shards = [submit(stream.build_shard, parts, int(bounds[i]), int(bounds[i + 1]), spec, dim, trained,
                     io.join(build_uri, name), storage) for i, name in enumerate(names)]
    done = gather([*shards, submit(stream.write_metadata, parts, io.join(build_uri, METADATA), storage)])
    manifest = {
        "build": build_id, "model_uri": model_uri, "model_version": model_manifest["model_version"],
        "heads": model_manifest.get("heads"), "experts": list(experts), "dim": dim, "n": n,
        "spec": {"factory": spec.factory, "nprobe": spec.nprobe, "ef_search": spec.ef_search},
        "shards": [{"file": name, **entry} for name, entry in zip(names, done[:-1], strict=True)],
        "metadata": METADATA, "embeddings": "embeddings", "split": ic.split,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    io.write_json(io.join(build_uri, "manifest.json"), manifest)
    return manifest


def write_build(cfg: Config, frame, model_manifest: dict[str, Any], model_uri: str,
                experts: Sequence[str] | None = None) -> dict[str, Any]:
    """A build from an in-memory frame (META_COLUMNS + `embedding`), through the same storage path, in this
    process; then switch `LATEST.json` to it. For small galleries (tests, fixtures)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    build_id, build_uri = new_build(cfg, model_manifest)
    vectors = np.stack(frame["embedding"].to_numpy()).astype(np.float32)
    table = pa.Table.from_pandas(frame[META_COLUMNS].reset_index(drop=True), preserve_index=False)
    table = table.append_column(stream.EMBEDDING, pa.FixedSizeListArray.from_arrays(
        pa.array(vectors.reshape(-1)), vectors.shape[1]))
    part = io.join(artifacts.index_embeddings(build_uri), "part-000000.parquet")
    with io.open_uri(part, "wb") as f:
        pq.write_table(table, f)
    manifest = build_from_embeddings(cfg.index, build_id, build_uri, experts or list(cfg.model.platforms),
                                     model_manifest, model_uri, cfg.seed, remote=False)
    io.write_json(artifacts.index_latest(cfg), {"build": build_id})
    return manifest


def run_index(cfg: Config) -> dict[str, Any]:
    """Index the gallery with the assembled PE-MoE model (`artifacts.MOE`), its experts in the gate's order."""
    from geoloc_ray.embedding import embedding_dataset
    from geoloc_ray.runtime import connect

    connect(cfg)
    model_uri = artifacts.model_dir(cfg, artifacts.MOE)
    model_manifest = io.read_json(artifacts.require(artifacts.model_manifest(cfg, artifacts.MOE), "train"))
    experts = list(cfg.model.platforms)
    check_expert_order(experts, model_manifest["platforms"], "config model.platforms")  # before any GPU work
    build_id, build_uri = new_build(cfg, model_manifest)
    write_embeddings(embedding_dataset(gallery_dataset(cfg), {"embedding": (model_uri, experts)}, cfg.index,
                                       device=cfg.device), build_uri)
    manifest = build_from_embeddings(cfg.index, build_id, build_uri, experts, model_manifest, model_uri, cfg.seed)
    io.write_json(artifacts.index_latest(cfg), {"build": build_id})
    return {k: manifest[k] for k in ("build", "n", "dim", "spec", "model_version")} | {
        "shards": len(manifest["shards"])}
