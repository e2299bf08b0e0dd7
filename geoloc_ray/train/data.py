"""Training datasets as Ray Data pipelines: prepared/refined rows -> decoded pixels, sharded to train workers.

Rows carry `pixels` (H, W, 3 uint8 at the tower's input size) so workers do no I/O; satellite augmentation
is applied per step in the worker (it must differ every epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from geoloc_ray import io
from geoloc_ray.preprocess.images import decode_pixels

PAIR_COLUMNS = ["image_id", "platform", "location_id", "texts", "pixels"]


def _has_text(batch: dict[str, Any]) -> np.ndarray:
    """Rows with at least one statement: a row refined to no text can be no query. Dropped here, before Ray Data
    splits the rows among the workers, so no worker filters its own shard down to fewer steps than the others."""
    return np.array([len(t) > 0 for t in batch["texts"]], dtype=bool)


def with_text(batch):
    """Rows that still have a statement (pyarrow batches: the `texts` lists stay Arrow lists, not pickles)."""
    import pyarrow.compute as pc

    return batch.filter(pc.fill_null(pc.greater(pc.list_value_length(batch["texts"]), 0), False))


def decode_batch(batch: dict[str, Any], *, size: int, storage: dict | None = None) -> dict[str, Any]:
    io.use_storage_options(storage)
    has_text = _has_text(batch)
    pixels, ok = decode_pixels(list(np.asarray(batch["image_uri"])[has_text]), size)
    keep = np.zeros(len(has_text), dtype=bool)
    keep[has_text] = np.asarray(ok, dtype=bool)
    pixels = pixels[np.asarray(ok, dtype=bool)]
    out = {k: np.asarray(v)[keep] for k, v in batch.items() if k in PAIR_COLUMNS and k != "texts"}
    texts = np.empty(int(keep.sum()), dtype=object)  # lists, not arrays: Arrow stores them as list<string>
    texts[:] = [[str(t) for t in row] for row, k in zip(batch["texts"], keep, strict=True) if k]
    out["texts"] = texts
    out["pixels"] = pixels
    return out


def decode_triplet_batch(batch: dict[str, Any], *, size: int, storage: dict | None = None) -> dict[str, Any]:
    """Mined rows (query, pos, negs by URI) -> pixels for the positive and each hard negative."""
    io.use_storage_options(storage)
    pos_uris = [str(u) for u in batch["image_uri"]]
    neg_uris = [[str(u) for u in uris] for uris in batch["neg_uris"]]
    # each image once: the rows of a batch share their images (a query per statement, negatives from one gallery)
    unique = sorted({*pos_uris, *(u for uris in neg_uris for u in uris)})
    pixels, decoded = decode_pixels(unique, size)
    at = {u: i for i, u in enumerate(unique)}
    pos = pixels[[at[u] for u in pos_uris]]
    keep = np.array([decoded[at[p]] and all(decoded[at[u]] for u in uris)
                     for p, uris in zip(pos_uris, neg_uris, strict=True)], dtype=bool)
    negs = (np.stack([pixels[[at[u] for u in uris]] for uris in neg_uris]) if neg_uris
            else np.zeros((0, 1, size, size, 3), np.uint8))
    return {
        "query": np.asarray(batch["query"])[keep],
        "location_id": np.asarray(batch["location_id"])[keep],
        "platform": np.asarray(batch["platform"])[keep],
        "pixels": pos[keep],
        "neg_pixels": negs[keep],
        "neg_location_ids": np.stack([np.asarray(x, dtype=str) for x in batch["neg_location_ids"]])[keep],
    }


def split_locations(location_ids, fraction: float) -> set[str]:
    """A stable held-out set of locations (by hash, so it does not depend on order or on the run)."""
    import hashlib

    return {loc for loc in set(map(str, location_ids))
            if int(hashlib.sha1(loc.encode()).hexdigest()[:8], 16) % 10_000 < fraction * 10_000}


@dataclass(frozen=True)
class Source:
    """The rows a job trains on: a parquet URI, optionally restricted to platforms and locations."""

    uri: str
    platforms: tuple[str, ...] | None = None
    locations: frozenset[str] | None = None  # only these locations (the gate's held-out tuning set)
    exclude: frozenset[str] | None = None  # never these (the held-out locations, for every head)


def _only(ds, source: Source):
    from ray.data.expressions import col

    if source.platforms:
        ds = ds.filter(expr=col("platform").is_in(list(source.platforms)))
    if source.locations is not None:
        ds = ds.filter(expr=col("location_id").is_in(sorted(source.locations)))
    if source.exclude:
        ds = ds.filter(expr=~col("location_id").is_in(sorted(source.exclude)))
    return ds


def pairs_dataset(source: Source, size: int, materialize: bool = True):
    """Images + their texts for contrastive training (and the fused gate's held-out gallery)."""
    ds = _only(io.read_dataset_parquet(source.uri), source)
    ds = ds.map_batches(decode_batch, batch_format="numpy", num_cpus=0.5,
                        fn_kwargs={"size": size, "storage": io.storage_options()})
    return ds.materialize() if materialize else ds


def texts_dataset(source: Source, size: int):
    """Each image's statements and platform, for the gate: no pixels, so `size` is not used."""
    ds = io.read_dataset_parquet(source.uri, columns=["texts", "platform", "location_id"])
    return _only(ds, source).map_batches(with_text, batch_format="pyarrow", num_cpus=0.5).materialize()


def triplets_dataset(source: Source, size: int, materialize: bool = True):
    """FlagEmbedding-style {query, pos, neg} records written by mining, with pixels attached."""
    ds = _only(io.read_dataset_parquet(source.uri), source)
    ds = ds.map_batches(decode_triplet_batch, batch_format="numpy", num_cpus=0.5,
                        fn_kwargs={"size": size, "storage": io.storage_options()})
    return ds.materialize() if materialize else ds
