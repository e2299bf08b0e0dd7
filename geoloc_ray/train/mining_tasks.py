"""What mining's Ray tasks run, over the embeddings Ray Data wrote under `mined/work/`.

One task per expert reads the training gallery's vectors and returns them: the result sits in the object store
once and every query task maps it (zero-copy). Each query task reads its block of query files, searches exactly,
selects the negatives and writes its own part of `mined/<platform>.parquet` per platform. Plain functions (the
driver wraps them in `ray.remote`), so nothing here imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from geoloc_ray import io
from geoloc_ray.config import HardNegativeConfig
from geoloc_ray.index.faiss_index import exact_search
from geoloc_ray.index.stream import Part, as_fixed_size_list, as_vectors

GALLERY_COLUMNS = ["image_id", "image_uri", "location_id", "platform"]
QUERY_COLUMNS = ["query", *GALLERY_COLUMNS]
EMBEDDING = "embedding"  # a query's vector; the gallery has one vector column per expert, named by its platform


@dataclass(frozen=True)
class Gallery:
    """One expert's view of the training gallery: its image vectors (rows = faiss ids) and what negatives carry."""

    vectors: np.ndarray  # float32 (G, D)
    image_ids: np.ndarray
    image_uris: np.ndarray
    location_ids: np.ndarray


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


def block_rows(platform: str, queries, vectors: np.ndarray, gallery: Gallery,
               hn: HardNegativeConfig) -> list[dict[str, Any]]:
    """Exact top-k of a block of `platform` queries (a frame of QUERY_COLUMNS + their vectors) over the gallery
    -> FlagEmbedding-style records; a query with fewer than `per_query` negatives in reach is dropped, not
    padded."""
    _, neighbours = exact_search(vectors, gallery.vectors, hn.top_k)
    negatives = select_negatives(neighbours, queries["location_id"].to_numpy(), gallery.location_ids, hn)
    rows = []
    for i, negs in enumerate(negatives):
        if len(negs) < hn.per_query:
            continue
        rows.append({
            "query": queries["query"].iat[i], "image_id": queries["image_id"].iat[i],
            "image_uri": queries["image_uri"].iat[i], "location_id": queries["location_id"].iat[i],
            "platform": platform, "neg_ids": [gallery.image_ids[j] for j in negs],
            "neg_uris": [gallery.image_uris[j] for j in negs],
            "neg_location_ids": [gallery.location_ids[j] for j in negs],
        })
    return rows


def plain_vectors(table, columns: list[str]):
    """Vector columns as fixed-size lists (any parquet reader reads them; no Ray tensor type in the files)."""
    for column in columns if table.num_rows else ():
        table = as_fixed_size_list(table, column)
    return table


def _read(parts: list[Part], columns: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([
        pq.read_table(io.strip_protocol(p.uri), columns=columns, filesystem=io.filesystem(p.uri)) for p in parts])


def load_gallery(parts: list[Part], platform: str, which: str, storage: dict | None = None) -> Gallery:
    """`platform`'s expert's gallery: every training image (`mixed`) or its platform's own, in file order."""
    io.use_storage_options(storage)
    table = _read(parts, [*GALLERY_COLUMNS, platform])
    if which != "mixed":
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table.column("platform"), platform))
    if not table.num_rows:
        raise ValueError(f"mining for {platform!r}: the training gallery has no image to mine from")

    def column(name: str) -> np.ndarray:
        return table.column(name).to_numpy(zero_copy_only=False)

    return Gallery(as_vectors(table.column(platform)), column("image_id"), column("image_uri"),
                   column("location_id"))


def mine_block(parts: list[Part], platforms: list[str], hn: HardNegativeConfig, out_uris: list[str],
               storage: dict | None, *galleries: Gallery) -> dict[str, dict[str, int]]:
    """One block of query files: each platform's queries against its expert's gallery, rows to that platform's
    part file (none written when no row is left). Returns the counts per platform."""
    import pandas as pd

    io.use_storage_options(storage)
    table = _read(parts, [*QUERY_COLUMNS, EMBEDDING])
    vectors = as_vectors(table.column(EMBEDDING))
    frame = table.drop_columns([EMBEDDING]).to_pandas()
    counts = {}
    for platform, gallery, uri in zip(platforms, galleries, out_uris, strict=True):
        own = (frame["platform"] == platform).to_numpy()
        queries = frame[own].reset_index(drop=True)
        rows = block_rows(platform, queries, vectors[own], gallery, hn) if own.any() else []
        if rows:
            io.write_parquet(uri, pd.DataFrame(rows))
        counts[platform] = {"queries": int(own.sum()), "rows": len(rows)}
    return counts


def query_blocks(parts: list[Part], rows_per_block: int) -> list[list[Part]]:
    """Consecutive files grouped into blocks of at least `rows_per_block` rows (the last may hold fewer): a task
    per block, not per file, since each task copies its expert's gallery into a faiss index."""
    blocks: list[list[Part]] = []
    rows = rows_per_block
    for p in parts:
        if rows >= rows_per_block:
            blocks.append([])
            rows = 0
        blocks[-1].append(p)
        rows += p.n
    return blocks
