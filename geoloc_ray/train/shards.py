"""A train worker's data shard as batches, epoch by epoch: generators over Ray Data's `DataIterator`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


def _rows(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def streamed(shard: Any, batch_size: int, seed: int, local_shuffle: bool = True) -> Iterator[Batch]:
    """Stream the shard from Ray Data, with a local shuffle unless the rows come shuffled already (a streamed
    decode: `data.TrainData.shuffled`); a contrastive step needs at least two rows.

    A local shuffle buffer holds views of whole decoded blocks: on a streamed decode it kept them in the object
    store long after their rows were used, and the store grew with the dataset (docs/BENCHMARKS.md, issue 21)."""
    shuffle = {"local_shuffle_buffer_size": 4 * batch_size, "local_shuffle_seed": seed} if local_shuffle else {}
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", **shuffle):
        if _rows(batch) >= 2:
            yield batch


def from_memory(columns: Batch, batch_size: int, seed: int) -> Iterator[Batch]:
    """The kept shard in a new order every epoch (a fixed partition per worker, as a DistributedSampler's)."""
    n = _rows(columns)
    order = np.random.default_rng(seed).permutation(n)
    for i in range(0, n - 1, batch_size):
        idx = order[i : i + batch_size]
        if len(idx) >= 2:
            yield {k: v[idx] for k, v in columns.items()}


def kept_while_small(batches: Iterator[Batch], limit_bytes: int, keep: list[Batch]) -> Iterator[Batch]:
    """Pass `batches` through, collecting them into `keep`; `keep` ends empty when they exceed `limit_bytes`."""
    size, full = 0, limit_bytes <= 0
    for batch in batches:
        if not full:
            size += sum(v.nbytes for v in batch.values())
            full = size > limit_bytes
            if full:
                keep.clear()
            else:
                keep.append(batch)
        yield batch


class ShardEpochs:
    """The shard's batches for one epoch: streamed until one whole epoch fitted in `keep_bytes`, then from memory.

    On a small node the streaming competes with the step for the same cores, so a shard that fits is read once.
    """

    def __init__(self, shard: Any, batch_size: int, seed: int, keep_bytes: int, local_shuffle: bool = True):
        self.shard, self.batch_size, self.seed, self.keep_bytes = shard, batch_size, seed, keep_bytes
        self.local_shuffle = local_shuffle
        self.kept: Batch | None = None

    def batches(self, epoch: int) -> Iterator[Batch]:
        if self.kept is not None:
            yield from from_memory(self.kept, self.batch_size, self.seed + epoch)
            return
        keep: list[Batch] = []
        batches = streamed(self.shard, self.batch_size, self.seed + epoch, self.local_shuffle)
        yield from kept_while_small(batches, self.keep_bytes, keep)
        if keep:
            self.kept = {k: np.concatenate([b[k] for b in keep]) for k in keep[0]}


def all_rows(shard: Any, columns: list[str]) -> Batch:
    """The whole shard in memory, in its own order (the gate kinds' rows: small, read once)."""
    parts = list(shard.iter_batches(batch_format="numpy", batch_size=256))
    if not parts:
        return {c: np.empty(0, dtype=object) for c in columns}
    return {c: np.concatenate([np.asarray(p[c]) for p in parts]) for c in columns}


def shuffled(rng: np.random.Generator, n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Row indices of one epoch in a fresh order from the worker's generator, a batch (of 2+ rows) at a time."""
    order = rng.permutation(n)
    for i in range(0, n - 1, batch_size):
        yield order[i : i + batch_size]


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """The batches of `rows` rows every source above yields: full ones, then the rest when it has 2+ rows."""
    return rows // batch_size + (1 if rows % batch_size >= 2 else 0)
