"""What eval's Ray tasks run: exact search of a block of queries over the gallery vectors on storage, streamed
one file (and one vector column) at a time, keeping only a running top-k per query.

A task returns per query the rank of the first image of its location and of its own image, per variant and
gallery view (and the routing weights of the fused variants): everything the metrics need, and nothing whose
size grows with the gallery. Plain functions (the driver wraps them in `ray.remote`), so nothing here imports
Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from geoloc_ray import io
from geoloc_ray.embedding import view_column
from geoloc_ray.eval.metrics import first_hit_rank, first_per_group
from geoloc_ray.eval.queries import gate_column, head_column
from geoloc_ray.eval.routing import ORACLE, oracle_weights, routed_query
from geoloc_ray.index.faiss_index import exact_search
from geoloc_ray.index.stream import Part, as_vectors

QUERY_META = ["qid", "image_id", "location_id", "platform"]
GALLERY_META = ["image_id", "location_id"]


@dataclass(frozen=True)
class Probe:
    """One variant of one model as a task searches it: its query heads and routing, the columns of the model's
    gallery vector it scores, and the gallery views (None = clean) it is scored on."""

    name: str
    heads: tuple[str, ...]
    weights: str | None  # None (one head), "static", "oracle", "fixed" (see `fixed`), or a gate: see `gate`
    columns: tuple[int, ...]
    views: tuple[str | None, ...]
    places: bool = False
    gate: tuple[str, tuple[str, ...]] | None = None  # (model whose gate column routes it, that column's order)
    fixed: tuple[float, ...] | None = None  # the same weights for every query (an oracle_mix grid point)


def _read(uri: str, columns: list[str]):
    import pyarrow.parquet as pq

    return pq.read_table(io.strip_protocol(uri), columns=columns, filesystem=io.filesystem(uri))


def _read_parts(parts: list[Part], columns: list[str]):
    import pyarrow as pa

    return pa.concat_tables([_read(p.uri, columns) for p in parts])


def _column(table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def probe_queries(p: Probe, model: str, table) -> tuple[np.ndarray, np.ndarray | None]:
    """A probe's query vectors (one head, or concat_k(w_k t_k)) and its (N, K) weights when it routes."""
    parts = [as_vectors(table.column(head_column(model, h))) for h in p.heads]
    if p.weights is None:
        return parts[0], None
    n, k = table.num_rows, len(p.heads)
    if p.weights == "static":
        weights = np.full((n, k), 1.0 / k, np.float32)
    elif p.fixed is not None:
        weights = np.tile(np.asarray(p.fixed, np.float32), (n, 1))
    elif p.weights == ORACLE:
        weights = oracle_weights(_column(table, "platform").tolist(), p.heads)
    elif p.gate is not None:
        source, order = p.gate
        weights = as_vectors(table.column(gate_column(source)))[:, [order.index(h) for h in p.heads]]
    else:
        raise ValueError(f"variant {p.name!r}: weights {p.weights!r} need a gate column")
    return routed_query(parts, weights), weights


def query_columns(model: str, probes: list[Probe]) -> list[str]:
    """The query file columns a task of `model`'s probes reads."""
    heads = dict.fromkeys(h for p in probes for h in p.heads)
    gates = dict.fromkeys(p.gate[0] for p in probes if p.gate is not None)
    return [*QUERY_META, *(head_column(model, h) for h in heads), *(gate_column(g) for g in gates)]


class TopK:
    """A running exact top-k over gallery files: each file's best k merged with the best so far."""

    def __init__(self, n: int, k: int):
        self.k = k
        self.scores = np.zeros((n, 0), np.float32)
        self.images = np.zeros((n, 0), object)
        self.locations = np.zeros((n, 0), object)

    def add(self, scores: np.ndarray, images: np.ndarray, locations: np.ndarray) -> None:
        s = np.concatenate([self.scores, scores], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, : self.k]  # ties: the earlier row first, as faiss
        self.scores = np.take_along_axis(s, order, axis=1)
        self.images = np.take_along_axis(np.concatenate([self.images, images], axis=1), order, axis=1)
        self.locations = np.take_along_axis(np.concatenate([self.locations, locations], axis=1), order, axis=1)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images, locations, valid) of the ranked lists, as wide as the gallery's results (<= k)."""
        return self.images, self.locations, np.ones(self.images.shape, bool)


class TopPlaces(TopK):
    """A running top-k of distinct locations (each its best image): every location's best image lies in one
    file, where fewer than k locations beat it, so each file's own top-k places hold every answer."""

    def __init__(self, n: int, k: int):
        super().__init__(n, k)
        self.scores = np.full((n, k), -np.inf, np.float32)
        self.images = np.full((n, k), None, object)
        self.locations = np.full((n, k), None, object)

    def add(self, scores: np.ndarray, images: np.ndarray, locations: np.ndarray) -> None:
        s = np.concatenate([self.scores, scores], axis=1)
        imgs = np.concatenate([self.images, images], axis=1)
        locs = np.concatenate([self.locations, locations], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")
        for q, row in enumerate(order):
            picked, seen = [], set()
            for j in row:
                if s[q, j] == -np.inf or len(picked) == self.k:
                    break
                if locs[q, j] not in seen:
                    seen.add(locs[q, j])
                    picked.append(j)
            pad = self.k - len(picked)
            self.scores[q] = np.concatenate([s[q, picked], np.full(pad, -np.inf, np.float32)])
            self.images[q] = np.concatenate([imgs[q, picked], np.full(pad, None, object)])
            self.locations[q] = np.concatenate([locs[q, picked], np.full(pad, None, object)])

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.images, self.locations, self.scores > -np.inf


def places_search(queries: np.ndarray, vectors: np.ndarray, locations: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k distinct locations per query (each its best image's row id; -1 when the gallery has fewer):
    the search goes deeper for the queries whose top images are too few places, never truncating a top-k."""
    n = len(vectors)
    out = np.full((len(queries), k), -1, dtype=np.int64)
    todo, depth = np.arange(len(queries)), min(n, 8 * k)
    while len(todo):
        picked = first_per_group(exact_search(queries[todo], vectors, depth)[1], locations, k)
        out[todo] = picked
        if depth >= n:
            break
        todo, depth = todo[(picked < 0).any(axis=1)], min(n, 4 * depth)
    return out


def _file_places(queries: np.ndarray, vectors: np.ndarray, locations: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One file's top-k places: (scores with -inf where none, row ids with -1)."""
    ids = places_search(queries, vectors, locations, k)
    safe = np.clip(ids, 0, None)
    scores = np.einsum("nd,nkd->nk", queries, vectors[safe]).astype(np.float32)
    return np.where(ids >= 0, scores, -np.inf), ids


def _take(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.where(ids >= 0, values[np.clip(ids, 0, None)], None)


def hit_ranks(images: np.ndarray, locations: np.ndarray, valid: np.ndarray, query_images: np.ndarray,
              query_locations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the 0-based rank of the first image of its location and of its own image (width if none)."""
    placeholder = np.zeros(valid.shape, np.int64)  # first_hit_rank reads only the width
    loc = first_hit_rank(placeholder, (locations == query_locations[:, None]) & valid)
    img = first_hit_rank(placeholder, (images == query_images[:, None]) & valid)
    return loc.astype(np.int32), img.astype(np.int32)


def search_block(query_parts: list[Part], gallery_parts: list[Part], model: str, probes: list[Probe], max_k: int,
                 storage: dict | None = None) -> dict[str, Any]:
    """One block of queries, every probe of `model` over every gallery file: per query its ids, hit ranks per
    (probe, view) and each routed probe's weights."""
    io.use_storage_options(storage)
    table = _read_parts(query_parts, query_columns(model, probes))
    qids = _column(table, "qid")
    q_images, q_locations = _column(table, "image_id"), _column(table, "location_id")
    encoded = {p.name: probe_queries(p, model, table) for p in probes}
    del table
    tops = {(p.name, view): (TopPlaces if p.places else TopK)(len(qids), max_k) for p in probes for view in p.views}
    views = list(dict.fromkeys(v for p in probes for v in p.views))
    for part in gallery_parts:
        meta = _read(part.uri, GALLERY_META)
        images, locations = _column(meta, "image_id"), _column(meta, "location_id")
        for view in views:
            column = model if view is None else view_column(model, view)
            vectors = as_vectors(_read(part.uri, [column]).column(column))
            for p in (p for p in probes if view in p.views):
                sub = np.ascontiguousarray(vectors[:, list(p.columns)])
                qv = encoded[p.name][0]
                if p.places:
                    scores, ids = _file_places(qv, sub, locations, max_k)
                else:
                    scores, ids = exact_search(qv, sub, max_k)
                tops[(p.name, view)].add(scores, _take(images, ids), _take(locations, ids))
    ranks = {key: hit_ranks(*top.result(), q_images, q_locations) for key, top in tops.items()}
    return {"qid": qids, "ranks": ranks, "weights": {n: w for n, (_, w) in encoded.items() if w is not None}}


def gallery_stats(parts: list[Part], query_locations: list[str], storage: dict | None = None) -> dict[str, Any]:
    """Gallery size, distinct locations and the images of each query location (chance recall), file by file."""
    io.use_storage_options(storage)
    n, locations, counts = 0, set(), dict.fromkeys(query_locations, 0)
    for part in parts:
        column = _column(_read(part.uri, ["location_id"]), "location_id")
        n += len(column)
        values, c = np.unique(column, return_counts=True)
        locations.update(values.tolist())
        for loc, m in zip(values.tolist(), c.tolist(), strict=True):
            if loc in counts:
                counts[loc] += m
    return {"gallery": n, "locations": len(locations), "counts": counts}
