"""What crosses deployment boundaries, and the pure steps the ingress runs on it (testable without Ray).

Degradation: when an expert does not answer, the gate is renormalised over the experts that did and the
missing expert's block of the fused query is zero, so the ranking is the PE-MoE score of the remaining experts.
Shards return their hits with metadata, so a merged answer never mixes one build's ids with another's rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from geoloc_ray.model.outputs import TextTrunkOutput


@dataclass
class EncodedQuery:
    """The query encoder's answer for one query: its trunk output and the gate's weights."""

    trunk: TextTrunkOutput  # one query, padding trimmed
    gate: list[float]  # in `platforms` order
    platforms: list[str]
    model_version: str


@dataclass
class ExpertVector:
    """One expert's unit query embedding t_k(q)."""

    platform: str
    vector: np.ndarray  # (D,) float32
    model_version: str


@dataclass
class ShardHits:
    """One shard's top-k for one query: scores and the hit rows' gallery metadata."""

    shard: int
    build: str
    model_version: str
    scores: list[float]
    rows: list[dict[str, Any]] = field(default_factory=list)


def renormalised_weights(gate: Sequence[float], answered: Sequence[bool]) -> list[float]:
    """Gate weights over the experts that answered (summing to 1); the others get 0."""
    kept = [float(g) if ok else 0.0 for g, ok in zip(gate, answered, strict=True)]
    total = sum(kept)
    if total <= 0:
        # The gate gave ~0 to every answering expert: weigh them equally rather than return nothing.
        n = sum(bool(a) for a in answered)
        return [1.0 / n if ok else 0.0 for ok in answered] if n else kept
    return [w / total for w in kept]


def fused_vector(gate: Sequence[float], platforms: Sequence[str], answers: Mapping[str, np.ndarray | None],
                 dim: int) -> tuple[np.ndarray, list[float]]:
    """concat_k(w_k t_k) through the model library's `fuse_query`; a missing expert's block is zero."""
    import torch

    from geoloc_ray.model.fusion import fuse_query

    answered = [answers.get(p) is not None for p in platforms]
    weights = renormalised_weights(gate, answered)
    parts = [torch.tensor(np.asarray(answers[p], np.float32)).reshape(1, -1) if ok else torch.zeros(1, dim)
             for p, ok in zip(platforms, answered, strict=True)]
    fused = fuse_query(parts, torch.tensor([weights], dtype=torch.float32))
    return fused[0].numpy().astype(np.float32), weights


def merge_hits(hits: Sequence[ShardHits], k: int) -> list[tuple[float, dict[str, Any]]]:
    """Global top-k over every shard's hits (faiss_index.merge_topk over candidate positions).

    While an index swap is rolling over the shards, two shards may hold the same image (their builds cut the
    gallery differently): an image is kept once, at its best score.
    """
    from geoloc_ray.index.faiss_index import merge_topk

    parts, rows, base = [], [], 0
    for h in hits:
        n = len(h.scores)
        parts.append((np.asarray(h.scores, np.float32).reshape(1, n), np.arange(base, base + n).reshape(1, n)))
        rows.extend(h.rows)
        base += n
    if not rows:
        return []
    scores, ids = merge_topk(parts, len(rows))
    out, seen = [], set()
    for score, i in zip(scores[0], ids[0], strict=True):
        if i >= 0 and rows[i]["image_id"] not in seen and len(out) < k:
            seen.add(rows[i]["image_id"])
            out.append((float(score), rows[i]))
    return out


def one_per_location(ranked: Sequence[tuple[float, dict[str, Any]]]) -> list[tuple[float, dict[str, Any]]]:
    """Keep each location's first (best) image of a ranked list: the places, in the order of their best image."""
    seen: set[str] = set()
    places = []
    for score, row in ranked:
        if str(row["location_id"]) not in seen:
            seen.add(str(row["location_id"]))
            places.append((score, row))
    return places


def pick(hits: Sequence[ShardHits], depth: int, needed: int,
         group_by: str) -> tuple[list[tuple[float, dict[str, Any]]], bool]:
    """The first `needed` results of the merged ranking of `depth` images per shard (one per location with
    group_by location), and whether that is final: `needed` found, or the shards hold nothing more.

    Only the merged top-`depth` is used: beyond it the shards' lists no longer add up to the global ranking.
    """
    ranked = merge_hits(hits, depth)
    if group_by == "location":
        ranked = one_per_location(ranked)
    exhausted = all(len(h.scores) < depth for h in hits)
    return ranked[:needed], len(ranked) >= needed or exhausted


def finite_or_none(value: Any) -> float | None:
    """lat/lon are NaN (or None) when the corpus has no coordinates for a location."""
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
