"""Distributed hard-negative mining (FlagEmbedding-style: mining writes `{query, pos, neg}` records).

Each stage-1 expert embeds the training gallery and its own platform's queries: Ray Data runs the embedding on
an actor pool (one pass for all experts) and writes the vectors to `mined/work/`. Ray tasks then do the rest
(`mining_tasks`): one per expert loads its gallery into the object store, one per block of queries finds each
query's nearest images with faiss, drops those of the query's own location (the same place, not negatives) and
writes its part of `mined/<platform>.parquet` (a parquet folder). The driver lists files and sums counts.

A resumable step: `mined/manifest.json`, written last, names the stage-1 model versions the rows were mined
with, so a run that stopped after mining does not mine again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection
from typing import Any

import numpy as np

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config, HardNegativeConfig
from geoloc_ray.index.stream import list_parts
from geoloc_ray.train import mining_tasks
from geoloc_ray.train.mining_tasks import EMBEDDING, Gallery, block_rows, query_blocks

log = logging.getLogger(__name__)

# Queries per mining task: each task copies its experts' galleries into faiss, so blocks are not too small.
QUERIES_PER_TASK = 20_000


def gallery_of(frame, platform: str, hn: HardNegativeConfig) -> Gallery:
    """From a driver frame (one vector column per platform): the gallery `platform`'s expert mines from."""
    g = frame if hn.gallery == "mixed" else frame[frame["platform"] == platform]
    return Gallery(np.stack(g[platform].to_numpy()), g["image_id"].to_numpy(), g["image_uri"].to_numpy(),
                   g["location_id"].to_numpy())


def mined_rows(platform: str, queries, gallery, hn: HardNegativeConfig) -> list[dict[str, Any]]:
    """The rows of one platform from driver frames in one process: the reference the mining tasks must match."""
    q = queries[queries["platform"] == platform].reset_index(drop=True)
    return block_rows(platform, q, np.stack(q[EMBEDDING].to_numpy()), gallery_of(gallery, platform, hn), hn)


def _training_rows(train_uri: str, columns: list[str], exclude: Collection[str] | None):
    from ray.data.expressions import col

    ds = io.read_dataset_parquet(train_uri, columns=columns)
    return ds.filter(expr=~col("location_id").is_in(sorted(exclude))) if exclude else ds


def _statements(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"query": str(t), **{c: row[c] for c in mining_tasks.GALLERY_COLUMNS}} for t in row["texts"]]


def gallery_rows(train_uri: str, exclude: Collection[str] | None = None):
    """The training images (held-out locations excluded) as a lazy Ray Dataset."""
    return _training_rows(train_uri, mining_tasks.GALLERY_COLUMNS, exclude)


def query_rows(train_uri: str, exclude: Collection[str] | None = None):
    """One row per training statement, with its image's location and platform (lazy)."""
    return _training_rows(train_uri, [*mining_tasks.GALLERY_COLUMNS, "texts"], exclude).flat_map(_statements)


def write_embeddings(cfg: Config, experts: dict[str, str], train_uri: str,
                     exclude: Collection[str] | None = None) -> None:
    """Every training image under every expert's image head, each statement under its platform's text head,
    streamed by Ray Data to mining's working folders (never collected here)."""
    from geoloc_ray.embedding import embedding_dataset, text_embedding_dataset

    platforms = list(experts)
    image_heads = {p: (u, [p]) for p, u in experts.items()}
    gallery = embedding_dataset(gallery_rows(train_uri, exclude), image_heads, cfg.index, device=cfg.device)
    queries = text_embedding_dataset(query_rows(train_uri, exclude), {p: (u, p) for p, u in experts.items()},
                                     cfg.index, device=cfg.device)
    for ds, columns, uri in ((gallery, platforms, artifacts.mined_gallery_embeddings(cfg)),
                             (queries, [EMBEDDING], artifacts.mined_query_embeddings(cfg))):
        ds = ds.map_batches(mining_tasks.plain_vectors, fn_kwargs={"columns": columns}, batch_format="pyarrow",
                            num_cpus=0.25)
        io.write_dataset_parquet(ds, uri)


def mine_embeddings(run: Config | str, platforms: list[str], hn: HardNegativeConfig, *,
                    rows_per_task: int = QUERIES_PER_TASK, num_cpus: float = 1.0,
                    num_gpus: float = 0.0) -> dict[str, dict[str, int]]:
    """Mining tasks over the working folders' embeddings -> `mined/<platform>.parquet` part files; the driver
    holds file lists, object refs and counts. `num_gpus` goes to the search tasks (faiss on the GPU it is given).
    """
    import ray

    storage = io.storage_options()
    gallery_parts = list_parts(artifacts.mined_gallery_embeddings(run))
    if not gallery_parts:
        raise ValueError("mining found no training image to mine from (none decodable outside the held-out set)")
    load = ray.remote(mining_tasks.load_gallery).options(num_cpus=num_cpus)
    galleries = [load.remote(gallery_parts, p, hn.gallery, storage) for p in platforms]  # in the store once
    for p in platforms:
        io.remove(artifacts.mined(run, p))  # an older run's rows (or its single file) must not mix in
    search = ray.remote(mining_tasks.mine_block).options(num_cpus=num_cpus, num_gpus=num_gpus)
    blocks = query_blocks(list_parts(artifacts.mined_query_embeddings(run)), rows_per_task)
    counts = ray.get([search.remote(block, platforms, hn, [artifacts.mined_part(run, p, i) for p in platforms],
                                    storage, *galleries) for i, block in enumerate(blocks)])
    summary = {}
    for p in platforms:
        n_queries, n_rows = (sum(c[p][k] for c in counts) for k in ("queries", "rows"))
        if not n_rows:
            raise ValueError(f"mining for {p!r} found no query with {hn.per_query} other-location negatives")
        summary[p] = {"queries": n_queries, "rows": n_rows, "dropped": n_queries - n_rows}
    return summary


def mine_hard_negatives(cfg: Config, experts: dict[str, str], train_uri: str,
                        exclude: Collection[str] | None = None) -> dict[str, Any]:
    """Write `mined/<platform>.parquet` per expert (held-out locations excluded); returns counts per expert."""
    write_embeddings(cfg, experts, train_uri, exclude)
    summary = mine_embeddings(cfg, list(experts), cfg.train.hard_negatives, num_cpus=cfg.index.build_num_cpus,
                              num_gpus=cfg.index.actors.num_gpus)
    io.remove(artifacts.mined_work(cfg))  # GBs of vectors at full scale; the rows are what stays
    log.info("mined hard negatives: %s", summary)
    return summary


def mining_key(model_versions: dict[str, str], hn: HardNegativeConfig, exclude: Collection[str] | None) -> dict:
    """What mined rows depend on: the stage-1 experts' model versions, the mining settings, the held-out set."""
    held_out = hashlib.sha256("\n".join(sorted(exclude or ())).encode()).hexdigest()[:16]
    return {"models": dict(model_versions), "hard_negatives": hn.model_dump(mode="json"), "held_out": held_out}


def is_current(manifest: dict | None, key: dict) -> bool:
    """Whether mined/ (its manifest, written last) was mined with exactly these experts and settings."""
    return manifest is not None and all(manifest.get(name) == value for name, value in key.items())


def mine(cfg: Config, experts: dict[str, str], train_uri: str,
         exclude: set[str] | frozenset[str] | None = None) -> dict[str, Any]:
    """Mine for stage 2 unless mined/ already holds the rows of these stage-1 experts (e.g. a resumed run)."""
    from geoloc_ray.model import read_manifest

    key = mining_key({p: read_manifest(uri)["model_version"] for p, uri in experts.items()},
                     cfg.train.hard_negatives, exclude)
    path = artifacts.mined_manifest(cfg)
    previous = io.read_json(path) if io.exists(path) else None
    if is_current(previous, key):
        log.info("mined hard negatives are up to date with the stage-1 experts %s: reused", key["models"])
        return {"reused": True, "platforms": previous["summary"]}
    io.remove(path)  # rows are about to change: a stop mid-mining must not leave a manifest that still matches
    summary = mine_hard_negatives(cfg, experts, train_uri, exclude)
    io.write_json(path, {**key, "summary": summary})
    return {"reused": False, "platforms": summary}
