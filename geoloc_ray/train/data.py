"""Training datasets as Ray Data pipelines: prepared/refined/mined rows -> decoded pixels, sharded to train workers.

What the object store holds before a fit is the rows as ids (image URIs, statements: hundreds of bytes a row);
the images are decoded in a Ray Data map stage on CPUs while the batches stream to the workers, a bounded
window of decoded blocks at a time, never the whole dataset (at 384 px a mined row's positive and 4 negatives
are ~2.2 MB: O(10^5) rows would be hundreds of GB). Decoded rows carry `pixels` (H, W, 3 uint8 at the tower's
input size) so workers do no I/O; satellite augmentation is applied per step in the worker (it must differ every
epoch). A corrupt image drops its row in the map stage (logged by `decode_pixels`); Ray Train's
`streaming_split(equal=True)` splits after it, so every worker still gets the same number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from geoloc_ray import io
from geoloc_ray.preprocess.images import decode_pixels

PAIR_COLUMNS = ["image_id", "platform", "location_id", "texts", "pixels"]
PAIR_ID_COLUMNS = ["image_id", "image_uri", "platform", "location_id", "texts"]  # what a pairs row is before decoding
TRIPLET_ID_COLUMNS = ["query", "image_uri", "location_id", "platform", "neg_uris", "neg_location_ids"]
DECODE_CPUS = 0.5  # per decode task (fractional: a 2-CPU node runs the train worker and a decode task side by side)
DECODED_BLOCK_BYTES = 64 * 2**20  # one decode task's output block: the unit the object store holds while streaming
DECODE_BLOCK_MAX_ROWS = 1024  # small images: still several decode tasks over a dataset (Ray Data's old default batch)


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
    """A stable held-out set of locations (by hash, so it does not depend on order or on the run). A fraction
    above 0 of two or more locations holds out at least one (the lowest hash): in a small world the set came out
    empty by chance, and the fused gate tuning, which trains on it, silently did not run."""
    import hashlib

    keys = {loc: int(hashlib.sha1(loc.encode()).hexdigest()[:8], 16) % 10_000 for loc in set(map(str, location_ids))}
    held = {loc for loc, key in keys.items() if key < fraction * 10_000}
    if not held and fraction > 0 and len(keys) > 1:
        held = {min(keys, key=lambda loc: (keys[loc], loc))}
    return held


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


@dataclass(frozen=True)
class TrainData:
    """A fit's rows: the Ray Dataset handed to Ray Train (`datasets={"train": ...}`) and the count the driver
    schedules by. `rows` is counted on the undecoded ids (decoding is never run for it); a corrupt image drops its
    row later, so the workers may take a step fewer than scheduled (`parallel.agreed` ends the epoch for all)."""

    dataset: Any
    rows: int
    ids: Any = None  # the materialised ids the decode streams from (None: the dataset is itself materialised)

    @property
    def shuffled(self) -> bool:
        """A streamed decode's ids were shuffled globally and its blocks come in a new order every epoch: the
        workers read it without a local shuffle buffer (which kept whole decoded blocks in the object store)."""
        return self.ids is not None


def images_per_row(kind: str, negatives: int = 0) -> int:
    """Images one row decodes to: a pairs row its image, a mined row its positive and `negatives` negatives."""
    return 1 + negatives if kind == "triplets" else 1


def decode_block_rows(images: int, size: int) -> int:
    """Rows per decode batch (and per ids block), so that a decoded block is about `DECODED_BLOCK_BYTES`: at 384 px
    ~150 pairs rows or ~30 mined rows (positive + 4 negatives). Small ids blocks also spread the decode over
    several tasks at once instead of one task walking a whole parquet file."""
    return max(1, min(DECODE_BLOCK_MAX_ROWS, DECODED_BLOCK_BYTES // (images * size * size * 3)))


def _ids(ds, rows_per_block: int):
    """The undecoded rows in the object store, in blocks the decode map takes one at a time."""
    return ds.repartition(target_num_rows_per_block=rows_per_block).materialize()


# A training set decoded to at most this many bytes is decoded once before its fit, as before issue 21; larger ones
# stream. A small set then costs little object store, and a fixed instance whose CPUs all went to train workers
# (the demo's 2 cores, 3 fits at once) leaves Ray Data no CPU budget to decode while the fits wait for it.
MATERIALIZE_UP_TO_BYTES = 1 << 30


def _new_block_order_every_epoch(ids):
    """The ids' blocks in another order at every execution (each Ray Train epoch), reproducibly from seed 0."""
    from ray.data import RandomSeedConfig

    return ids.randomize_block_order(seed=RandomSeedConfig(seed=0, reseed_after_execution=True))


def _decoded(ids, fn, size: int, rows_per_block: int, materialize: bool | None, images: int = 1) -> TrainData:
    """`materialize` None: decide by the decoded size (`MATERIALIZE_UP_TO_BYTES`)."""
    rows = ids.count()
    if materialize is None:
        materialize = rows * images * size * size * 3 <= MATERIALIZE_UP_TO_BYTES
    if not materialize:  # streamed: rows shuffled once as ids (bytes each), blocks reordered every epoch
        ids = ids.random_shuffle(seed=0).repartition(target_num_rows_per_block=rows_per_block).materialize()
    decode = ids if materialize else _new_block_order_every_epoch(ids)
    ds = decode.map_batches(fn, batch_format="numpy", batch_size=rows_per_block, num_cpus=DECODE_CPUS,
                            fn_kwargs={"size": size, "storage": io.storage_options()})
    if materialize:  # every pixel in the object store before the fit (small sets; benchmarks)
        ds = ds.materialize()
        return TrainData(ds, ds.count())
    return TrainData(ds, rows, ids)


def pairs_dataset(source: Source, size: int, materialize: bool | None = None) -> TrainData:
    """Images + their texts for contrastive training (and the fused gate's held-out gallery): ids in the object
    store, pixels decoded as the batches stream. Rows without a statement are dropped before counting."""
    ds = _only(io.read_dataset_parquet(source.uri).select_columns(PAIR_ID_COLUMNS), source)
    rows_per_block = decode_block_rows(1, size)
    ids = _ids(ds.map_batches(with_text, batch_format="pyarrow", num_cpus=DECODE_CPUS), rows_per_block)
    return _decoded(ids, decode_batch, size, rows_per_block, materialize)


def texts_dataset(source: Source, size: int) -> TrainData:
    """Each image's statements and platform, for the gate: no pixels (so `size` is not used), materialised."""
    ds = io.read_dataset_parquet(source.uri).select_columns(["texts", "platform", "location_id"])
    ds = _only(ds, source).map_batches(with_text, batch_format="pyarrow", num_cpus=DECODE_CPUS).materialize()
    return TrainData(ds, ds.count())


def triplets_dataset(source: Source, size: int, materialize: bool | None = None) -> TrainData:
    """FlagEmbedding-style {query, pos, neg} records written by mining: the mined rows (image URIs) in the object
    store, the positive's and each hard negative's pixels decoded as the batches stream."""
    ds = _only(io.read_dataset_parquet(source.uri).select_columns(TRIPLET_ID_COLUMNS), source)
    images = images_per_row("triplets", _negatives(source.uri))
    rows_per_block = decode_block_rows(images, size)
    return _decoded(_ids(ds, rows_per_block), decode_triplet_batch, size, rows_per_block, materialize, images)


def _negatives(uri: str) -> int:
    """Hard negatives per mined row, from the parquet's first row (mining writes the same number in every row)."""
    import pyarrow.parquet as pq

    for fragment in pq.ParquetDataset(io.strip_protocol(uri), filesystem=io.filesystem(uri)).fragments:
        table = fragment.head(1, columns=["neg_uris"])
        if table.num_rows:
            return len(table.column("neg_uris")[0].as_py())
    return 0
