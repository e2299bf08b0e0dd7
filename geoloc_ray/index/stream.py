"""Index pieces built from the gallery embeddings on storage, never from the whole gallery in one process.

Ray Data writes the embeddings as a parquet folder (one file per block); global row r is row r of the files'
concatenation in name order. Training reads a sample, each shard reads only the files holding its rows (one file
at a time), the metadata is copied file by file: every step's memory is bounded by a shard or a file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from geoloc_ray import io
from geoloc_ray.index.faiss_index import IndexSpec, deserialize, new_index, serialize
from geoloc_ray.index.store import META_COLUMNS, sha256

EMBEDDING = "embedding"


@dataclass(frozen=True)
class Part:
    """One parquet file of the embeddings folder and where its rows sit in the gallery."""

    uri: str
    offset: int
    n: int


def list_parts(folder: str) -> list[Part]:
    """The folder's non-empty parquet files in name order, with row offsets (from the footers alone)."""
    import pyarrow.parquet as pq

    parts, offset = [], 0
    for uri in io.glob(io.join(folder, "*.parquet")):
        with io.open_uri(uri) as f:
            n = pq.ParquetFile(f).metadata.num_rows
        if n:
            parts.append(Part(uri, offset, n))
            offset += n
    return parts


def gallery_size(parts: list[Part]) -> int:
    return parts[-1].offset + parts[-1].n if parts else 0


def vector_dim(parts: list[Part]) -> int:
    """The vectors' dimension, from the first file's schema (no data read)."""
    import pyarrow.parquet as pq

    with io.open_uri(parts[0].uri) as f:
        return int(pq.ParquetFile(f).schema_arrow.field(EMBEDDING).type.list_size)


def _read(uri: str, columns: list[str]):
    import pyarrow.parquet as pq

    return pq.read_table(io.strip_protocol(uri), columns=columns, filesystem=io.filesystem(uri))


def as_vectors(column) -> np.ndarray:
    """float32 (N, D) from a fixed-size-list (what we write) or Ray's tensor column (what Ray Data makes)."""
    chunks = column.chunks if hasattr(column, "chunks") else [column]
    arrays = [c.to_numpy() if hasattr(c.type, "shape") else
              c.flatten().to_numpy(zero_copy_only=False).reshape(len(c), c.type.list_size) for c in chunks]
    return np.ascontiguousarray(np.concatenate(arrays) if arrays else np.zeros((0, 0)), dtype=np.float32)


def as_fixed_size_list(table, column: str = EMBEDDING):
    """The table with `column` as a plain fixed-size list<float32>: readable by any parquet reader, no Ray type."""
    import pyarrow as pa

    vectors = as_vectors(table.column(column))
    flat = pa.array(vectors.reshape(-1), pa.float32())
    return table.set_column(table.schema.get_field_index(column), column,
                            pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))


def part_vectors(part: Part) -> np.ndarray:
    return as_vectors(_read(part.uri, [EMBEDDING]).column(EMBEDDING))


def iter_rows(parts: list[Part], start: int, stop: int) -> Iterator[np.ndarray]:
    """The vectors of global rows [start, stop), one file at a time; files outside the range are not read."""
    for p in parts:
        lo, hi = max(start, p.offset), min(stop, p.offset + p.n)
        if lo < hi:
            yield part_vectors(p)[lo - p.offset : hi - p.offset]


def sample_rows(parts: list[Part], size: int, seed: int) -> np.ndarray:
    """`size` gallery vectors drawn uniformly without replacement (all when the gallery is smaller)."""
    n = gallery_size(parts)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(size, n), replace=False))
    picked = [part_vectors(p)[sel - p.offset] for p in parts
              if len(sel := rows[(rows >= p.offset) & (rows < p.offset + p.n)])]
    return np.concatenate(picked)


def train_index(parts: list[Part], spec: IndexSpec, dim: int, sample: int, seed: int,
                storage: dict | None = None) -> bytes | None:
    """The trained, empty index every shard starts from (None when `spec` needs no training, e.g. Flat)."""
    io.use_storage_options(storage)
    index = new_index(dim, spec)
    if index.is_trained:
        return None
    index.train(sample_rows(parts, sample, seed))
    return serialize(index)


def build_shard(parts: list[Part], start: int, stop: int, spec: IndexSpec, dim: int, trained: bytes | None,
                uri: str, storage: dict | None = None) -> dict[str, Any]:
    """Add global rows [start, stop) to a fresh (or the trained) index, file by file; write it to `uri`."""
    io.use_storage_options(storage)
    index = deserialize(trained, spec) if trained is not None else new_index(dim, spec)
    for chunk in iter_rows(parts, start, stop):
        index.add(chunk)
    data = serialize(index)
    io.write_bytes(uri, data)
    return {"offset": start, "n": int(index.ntotal), "sha256": sha256(data)}


def write_metadata(parts: list[Part], uri: str, storage: dict | None = None) -> None:
    """The gallery's META_COLUMNS as one parquet file at `uri`, copied file by file (a streaming writer)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    io.use_storage_options(storage)
    schema = pa.schema([(c, pa.float64() if c in ("lat", "lon") else pa.string()) for c in META_COLUMNS])
    with io.open_uri(uri, "wb") as f, pq.ParquetWriter(f, schema) as writer:
        for p in parts:
            writer.write_table(_read(p.uri, META_COLUMNS).cast(schema))
