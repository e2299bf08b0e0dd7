"""Distributed hard-negative mining (FlagEmbedding-style: mining writes `{query, pos, neg}` records).

Each stage-1 expert embeds the training gallery and its own platform's queries; Ray Data runs the embedding
on an actor pool (one pass for all experts), faiss finds each query's nearest images, and images of the
query's own location are dropped (they are the same place, not negatives). A resumable step: `mined/` holds
one parquet per platform and a manifest naming the stage-1 model versions it was mined with, so a run that
stopped after mining does not mine again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection
from typing import Any

import numpy as np

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config, HardNegativeConfig
from geoloc_ray.index.faiss_index import exact_search

log = logging.getLogger(__name__)


def select_negatives(neighbours: np.ndarray, query_locations: np.ndarray, gallery_locations: np.ndarray,
                     cfg: HardNegativeConfig) -> list[list[int]]:
    """Per query (rows of faiss-ranked gallery ids): up to `per_query` ids never of the query's location.

    `skip_top` leaves out the very nearest other-location images (likely unlabelled positives).
    """
    out = []
    for q, row in enumerate(neighbours):
        valid = [int(i) for i in row if i >= 0 and gallery_locations[i] != query_locations[q]]
        out.append(valid[cfg.skip_top : cfg.skip_top + cfg.per_query])
    return out


def _training_rows(train_uri: str, columns: list[str], exclude: set[str] | None):
    from ray.data.expressions import col

    ds = io.read_dataset_parquet(train_uri, columns=columns)
    return ds.filter(expr=~col("location_id").is_in(sorted(exclude))) if exclude else ds


def embed_training_gallery(cfg: Config, experts: dict[str, str], train_uri: str, exclude: set[str] | None = None):
    """Every training image under every expert's image head: one column per platform."""
    from geoloc_ray.embedding import embed_images

    ds = _training_rows(train_uri, ["image_id", "image_uri", "location_id", "platform"], exclude)
    return embed_images(ds, {p: (uri, [p]) for p, uri in experts.items()}, cfg.index)


def embed_training_queries(cfg: Config, experts: dict[str, str], train_uri: str, exclude: set[str] | None = None):
    """Each training text under its own platform's expert text head."""
    from geoloc_ray.embedding import embed_texts

    ds = _training_rows(train_uri, ["image_id", "image_uri", "location_id", "platform", "texts"], exclude)
    ds = ds.flat_map(lambda r: [{"query": str(t), "image_id": r["image_id"], "image_uri": r["image_uri"],
                                 "location_id": r["location_id"], "platform": r["platform"]} for t in r["texts"]])
    return embed_texts(ds, {p: (u, p) for p, u in experts.items()}, cfg.index)


def mined_rows(platform: str, queries, gallery, hn: HardNegativeConfig) -> list[dict[str, Any]]:
    """Exact top-k over the gallery (mixed, or the platform's own images) -> records with negatives."""
    q = queries[queries["platform"] == platform].reset_index(drop=True)
    g = gallery if hn.gallery == "mixed" else gallery[gallery["platform"] == platform]
    g = g.reset_index(drop=True)
    _, neighbours = exact_search(np.stack(q["embedding"].to_numpy()), np.stack(g[platform].to_numpy()), hn.top_k)
    g_locs = g["location_id"].to_numpy()
    rows = []
    for i, negs in enumerate(select_negatives(neighbours, q["location_id"].to_numpy(), g_locs, hn)):
        if len(negs) < hn.per_query:
            continue  # not enough other-location images in reach: drop the query rather than pad
        rows.append({
            "query": q["query"].iat[i], "image_id": q["image_id"].iat[i], "image_uri": q["image_uri"].iat[i],
            "location_id": q["location_id"].iat[i], "platform": platform,
            "neg_ids": [g["image_id"].iat[j] for j in negs], "neg_uris": [g["image_uri"].iat[j] for j in negs],
            "neg_location_ids": [g_locs[j] for j in negs],
        })
    return rows


def mine_hard_negatives(cfg: Config, experts: dict[str, str], train_uri: str,
                        exclude: set[str] | frozenset[str] | None = None) -> dict[str, Any]:
    """Write `mined/<platform>.parquet` per expert (held-out locations excluded); returns counts per expert."""
    import pandas as pd

    hn = cfg.train.hard_negatives
    gallery = embed_training_gallery(cfg, experts, train_uri, exclude)
    queries = embed_training_queries(cfg, experts, train_uri, exclude)
    summary = {}
    for platform in experts:
        rows = mined_rows(platform, queries, gallery, hn)
        if not rows:
            raise ValueError(f"mining for {platform!r} found no query with {hn.per_query} other-location negatives")
        io.write_parquet(artifacts.mined(cfg, platform), pd.DataFrame(rows))
        n_queries = int((queries["platform"] == platform).sum())
        summary[platform] = {"queries": n_queries, "rows": len(rows), "dropped": n_queries - len(rows)}
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
    summary = mine_hard_negatives(cfg, experts, train_uri, exclude)
    io.write_json(path, {**key, "summary": summary})
    return {"reused": False, "platforms": summary}
