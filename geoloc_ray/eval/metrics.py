"""Recall@K text->image (in percent) and the challenge Score = (R@1 + R@10) / 2."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def first_hit_rank(ranked: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Per query, the 0-based rank of the first relevant item among `ranked` (len if none).

    `relevant[q, j]` says whether ranked item j of query q counts as a hit.
    """
    hit = relevant.astype(bool)
    any_hit = hit.any(axis=1)
    first = hit.argmax(axis=1)
    return np.where(any_hit, first, ranked.shape[1])


def recall_at(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    out = {f"R@{k}": float(100.0 * np.mean(ranks < k)) if len(ranks) else 0.0 for k in ks}
    if "R@1" in out and "R@10" in out:
        out["score"] = (out["R@1"] + out["R@10"]) / 2
    return out


def retrieval_metrics(
    ranked_ids: np.ndarray,
    gallery_images: np.ndarray,
    gallery_locations: np.ndarray,
    query_images: np.ndarray,
    query_locations: np.ndarray,
    ks: Sequence[int],
) -> dict[str, dict[str, float]]:
    """Image level: the query's own image is retrieved. Location level: any image of its location (the
    GeoText/Track 4 local evaluation)."""
    safe = np.clip(ranked_ids, 0, None)
    valid = ranked_ids >= 0
    image_hit = (gallery_images[safe] == query_images[:, None]) & valid
    loc_hit = (gallery_locations[safe] == query_locations[:, None]) & valid
    return rank_metrics(first_hit_rank(ranked_ids, loc_hit), first_hit_rank(ranked_ids, image_hit), ks)


def rank_metrics(location_ranks: np.ndarray, image_ranks: np.ndarray, ks: Sequence[int]
                 ) -> dict[str, dict[str, float]]:
    """`retrieval_metrics` from each query's first-hit ranks alone (what eval's search tasks return)."""
    return {"location": recall_at(np.asarray(location_ranks), ks), "image": recall_at(np.asarray(image_ranks), ks)}


def location_ranks(ranked_ids: np.ndarray, gallery_locations: np.ndarray, query_locations: np.ndarray
                   ) -> np.ndarray:
    """Per query, the 0-based rank of the first image of its location (len if none): the per-query hits
    behind location-level recall, kept so a multi-seed ladder can resample queries."""
    safe = np.clip(ranked_ids, 0, None)
    hit = (gallery_locations[safe] == query_locations[:, None]) & (ranked_ids >= 0)
    return first_hit_rank(ranked_ids, hit)


def recall_curve(ranked_ids: np.ndarray, gallery_locations: np.ndarray, query_locations: np.ndarray,
                 max_k: int) -> list[float]:
    """Location-level R@1..R@max_k, for the recall@K plot."""
    return rank_curve(location_ranks(ranked_ids, gallery_locations, query_locations), max_k)


def rank_curve(ranks: np.ndarray, max_k: int) -> list[float]:
    """Location-level R@1..R@max_k from each query's first-hit rank."""
    return [float(100.0 * np.mean(ranks < k)) for k in range(1, max_k + 1)]


def chance_recall(gallery_locations: np.ndarray, query_locations: np.ndarray, k: int) -> float:
    """Expected location-level R@k of a random ranking (sampling without replacement), in percent."""
    counts = {loc: int(c) for loc, c in zip(*np.unique(gallery_locations, return_counts=True), strict=True)}
    return chance_recall_from_counts(len(gallery_locations), counts, query_locations, k)


def chance_recall_from_counts(n: int, counts: dict, query_locations: np.ndarray, k: int) -> float:
    """`chance_recall` from the gallery's size and its image count per location (no gallery array needed)."""
    from math import comb

    probs = [1.0 - comb(n - counts.get(q, 0), k) / comb(n, k) for q in query_locations]
    return float(100.0 * np.mean(probs)) if probs else 0.0


def first_per_group(ranked_ids: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """Per query, the first k ranked ids of distinct groups (each location's best image), padded with -1.

    A later image of an already chosen location is skipped, so the k answers are k different places.
    """
    out = np.full((len(ranked_ids), k), -1, dtype=np.int64)
    for q, row in enumerate(ranked_ids):
        seen: set = set()
        for i in row[row >= 0]:
            if groups[i] not in seen:
                out[q, len(seen)] = i
                seen.add(groups[i])
                if len(seen) == k:
                    break
    return out


def hit_column(variant: str, k: int) -> str:
    """The per_query.parquet column of a variant's location-level hit@k (eval writes it, the ladder reads it)."""
    return f"{variant}:hit@{k}"


def per_query_table(queries, ranks: dict[str, np.ndarray], ks: Sequence[int] = (1, 10)):
    """One row per query (id, its image, location, platform and text) with each variant's location-level hit@k:
    what a multi-seed ladder resamples."""
    import pandas as pd

    table = pd.DataFrame({"query_id": [f"q{i:06d}" for i in range(len(queries))],
                          **{c: queries[c].to_numpy() for c in ("image_id", "location_id", "platform", "query")
                             if c in queries}})
    for variant, r in ranks.items():
        for k in ks:
            table[hit_column(variant, k)] = np.asarray(r) < k
    return table
