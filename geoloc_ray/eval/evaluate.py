"""The eval stage: the ablation ladder (unified, aligned, static_ensemble, moe) on the mixed test gallery, and
routing diagnostics (moe's experts under the oracle and the platform-label gate, each expert alone).

Gallery embeddings come from Ray Data (one pass for every model and corruption); queries are encoded in the
driver; ranking is exact inner-product search, so the numbers measure the models, not an ANN index.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config
from geoloc_ray.embedding import QueryVectors, embed_images, head_query_vectors, view_column
from geoloc_ray.eval.corruptions import corrupt
from geoloc_ray.eval.metrics import (
    chance_recall,
    first_per_group,
    location_ranks,
    per_query_table,
    recall_curve,
    retrieval_metrics,
)
from geoloc_ray.eval.routing import (
    ORACLE,
    PLATFORM_GATE,
    gate_summary,
    gate_weights,
    oracle_weights,
    routed_query,
)
from geoloc_ray.index.faiss_index import exact_search
from geoloc_ray.index.store import check_experts_for_model


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # models/<model>
    heads: tuple[str, ...]
    # None: single head; "static", "gate" (the model's own), "oracle" or "platform_gate" (routing.py): fused
    weights: str | None
    places: bool = False  # one image per location (its best): k distinct places, as `group_by: location` serves


def variants(cfg: Config) -> list[Variant]:
    """The configured variants (ladder rungs, routing diagnostics); names are the metrics.json contract."""
    experts = tuple(cfg.model.platforms)
    table = {
        "unified": Variant("unified", artifacts.UNIFIED, ("unified",), None),
        "aligned": Variant("aligned", artifacts.ALIGNED, ("aligned",), None),
        "static_ensemble": Variant("static_ensemble", artifacts.MOE, experts, "static"),
        "moe": Variant("moe", artifacts.MOE, experts, "gate"),
        "moe_places": Variant("moe_places", artifacts.MOE, experts, "gate", places=True),
        "oracle_gate": Variant("oracle_gate", artifacts.MOE, experts, ORACLE),
        "platform_gate": Variant("platform_gate", artifacts.MOE, experts, PLATFORM_GATE),
        **{f"expert_{p}": Variant(f"expert_{p}", artifacts.MOE, (p,), None) for p in experts},
    }
    unknown = [v for v in cfg.eval.variants if v not in table]
    if unknown:
        raise ValueError(f"eval.variants {unknown}: no such expert in model.platforms {experts}")
    return [table[v] for v in cfg.eval.variants]


def load_queries(cfg: Config):
    """One row per test query: its text, the image it describes, that image's location and platform; ordered by
    image (the parquet's file order may differ from run to run), so query n is the same query in every run."""
    import pandas as pd

    test = io.read_parquet(artifacts.prepared(cfg, "test")).sort_values("image_id", kind="stable")
    rows = [{"query": str(q), "image_id": r.image_id, "location_id": r.location_id, "platform": r.platform}
            for r in test.itertuples() for q in r.texts]
    if not rows:
        raise ValueError("the test split has no queries (test records need captions)")
    return pd.DataFrame(rows)


def _recall(ranked: np.ndarray, gallery, queries, ks: list[int]) -> dict[str, Any]:
    return retrieval_metrics(ranked, gallery["image_id"].to_numpy(), gallery["location_id"].to_numpy(),
                             queries["image_id"].to_numpy(), queries["location_id"].to_numpy(), ks)


def _metrics_block(ranked: np.ndarray, gallery, queries, ks: list[int]) -> dict[str, Any]:
    """Image- and location-level recall over all queries, and per query platform."""
    block = _recall(ranked, gallery, queries, ks)
    block["per_platform"] = {}
    for platform in sorted(queries["platform"].unique()):
        sel = (queries["platform"] == platform).to_numpy()
        block["per_platform"][platform] = _recall(ranked[sel], gallery, queries[sel], ks)
        block["per_platform"][platform]["queries"] = int(sel.sum())
    return block


def gallery_heads(chosen: list[Variant]) -> dict[str, list[str]]:
    """One gallery column per model, covering the heads of all its variants (in first-seen order)."""
    heads: dict[str, list[str]] = {}
    for v in chosen:
        model_heads = heads.setdefault(v.model, [])
        model_heads.extend(h for h in v.heads if h not in model_heads)
    return heads


def corruption_view(kind: str, severity: int) -> str:
    return f"{kind}-{severity}"


def embed_gallery(cfg: Config, models: dict[str, tuple[str, list[str]]], corruptions: list[tuple[str, int]]):
    """The test images under every model, clean and under each corruption (one Ray Data pass)."""
    ds = io.read_dataset_parquet(artifacts.prepared(cfg, "test"),
                                 columns=["image_id", "image_uri", "location_id", "platform"])
    views = {corruption_view(k, s): partial(corrupt, kind=k, severity=s) for k, s in corruptions}
    return embed_images(ds, models, cfg.index, views, device=cfg.device)


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


def _rank(v: Variant, qvecs: np.ndarray, vectors: np.ndarray, gallery, max_k: int) -> np.ndarray:
    if v.places:
        return places_search(qvecs, vectors, gallery["location_id"].to_numpy(), max_k)
    return exact_search(qvecs, vectors, max_k)[1]


def score_variant(v: Variant, model, queries, gallery, model_heads: list[str], ks: list[int],
                  corruptions: list[tuple[str, int]], qv: Any = None) -> dict[str, Any]:
    """One variant's metrics block, recall curve, per-query location ranks, gate summary (routed variants) and
    corrupted-gallery blocks.

    `qv`: the variant's query vectors when already encoded (moe_places reuses moe's)."""
    max_k = max([*ks, 10])
    if qv is None:
        qv = encode_queries(v, model, queries)
    cols = _columns_for(v, model_heads, model.model_cfg.embed_dim)
    ranked = _rank(v, qv.vectors, np.stack(gallery[v.model].to_numpy())[:, cols], gallery, max_k)
    locations, query_locations = gallery["location_id"].to_numpy(), queries["location_id"].to_numpy()
    out: dict[str, Any] = {
        "metrics": _metrics_block(ranked, gallery, queries, ks),
        "curve": recall_curve(ranked, locations, query_locations, max_k),
        "ranks": location_ranks(ranked, locations, query_locations),
        "gate": None if qv.gate is None else gate_summary(qv.gate, queries, list(v.heads)),
        "corruptions": {},
    }
    for kind, severity in corruptions:
        damaged = np.stack(gallery[view_column(v.model, corruption_view(kind, severity))].to_numpy())[:, cols]
        out["corruptions"][(kind, severity)] = _recall(_rank(v, qv.vectors, damaged, gallery, max_k),
                                                       gallery, queries, ks)
    return out


def encode_queries(v: Variant, model, queries, cache: dict | None = None, gate_model: Any = None) -> QueryVectors:
    """A variant's query vectors, with its routing weights when it routes. Every variant of one model is built
    from that model's per-head query vectors, encoded once (`cache`, shared by the model's variants): a head
    alone, or concat_k(w_k t_k) under static, its own gate's, the oracle's or the platform gate's weights."""
    cache = {} if cache is None else cache
    key = (v.heads, v.weights)
    if key not in cache:
        parts, own_gate = _head_vectors(model, queries, cache)
        if v.weights is None:
            cache[key] = QueryVectors(parts[v.heads[0]], None)
        else:
            weights = _routing(v, model, queries, own_gate, gate_model)
            cache[key] = QueryVectors(routed_query([parts[h] for h in v.heads], weights), weights)
    return cache[key]


def _head_vectors(model, queries, cache: dict) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    key = (tuple(model.head_names), "heads")
    if key not in cache:
        cache[key] = head_query_vectors(model, queries["query"].tolist(), model.head_names,
                                        with_gate=model.gate is not None)
    return cache[key]


def _routing(v: Variant, model, queries, own_gate: np.ndarray | None, gate_model: Any) -> np.ndarray:
    """(N, K) weights over `v.heads` for a fused variant."""
    n, k = len(queries), len(v.heads)
    if v.weights == "static":
        return np.full((n, k), 1.0 / k, np.float32)
    if v.weights == "gate":
        if own_gate is None:
            raise ValueError(f"variant {v.name!r} routes with the model's gate, but {v.model} has none")
        return own_gate[:, [model.gate.platforms.index(h) for h in v.heads]]
    if v.weights == ORACLE:
        return oracle_weights(queries["platform"].tolist(), v.heads)
    if v.weights == PLATFORM_GATE:
        return gate_weights(gate_model, queries["query"].tolist(), v.heads)
    raise ValueError(f"variant {v.name!r}: unknown weights {v.weights!r}")


def run_eval(cfg: Config) -> dict[str, Any]:
    """Write eval/metrics.json, eval/results.md and the plots; returns the metrics."""
    from geoloc_ray.eval.report import is_diagnostic, write_report
    from geoloc_ray.model import load_model
    from geoloc_ray.runtime import init_ray, use_storage

    use_storage(cfg)  # before the model checks read storage; Ray only once they pass
    chosen = variants(cfg)
    heads = gallery_heads(chosen)
    model_uris = {m: artifacts.model_dir(cfg, m) for m in heads}
    for m in model_uris:
        artifacts.require(artifacts.model_manifest(cfg, m), "train")
    if artifacts.MOE in model_uris:  # gallery columns follow model.platforms, the gate its manifest's order
        check_experts_for_model(cfg.model.platforms, model_uris[artifacts.MOE], "eval gallery (model.platforms)")
    init_ray(cfg)
    queries = load_queries(cfg)
    corruptions = [(k, s) for k in cfg.eval.corruptions for s in cfg.eval.severities]
    gallery = embed_gallery(cfg, {m: (uri, heads[m]) for m, uri in model_uris.items()}, corruptions)
    gate_model = _platform_gate_model(cfg, chosen)
    results: dict[str, Any] = {"variants": {}, "corruptions": {}, "curves": {}}
    gates, ranks = {}, {}
    for model_name, uri in model_uris.items():
        model = load_model(uri).eval()
        encoded: dict[tuple, Any] = {}
        for v in [v for v in chosen if v.model == model_name]:
            qv = encode_queries(v, model, queries, encoded, gate_model)
            scored = score_variant(v, model, queries, gallery, heads[model_name], list(cfg.eval.ks),
                                   [] if is_diagnostic(v.name) else corruptions, qv)  # they probe routing
            results["variants"][v.name], results["curves"][v.name] = scored["metrics"], scored["curve"]
            ranks[v.name] = scored["ranks"]
            if scored["gate"] is not None and not v.places:
                gates[v.name] = scored["gate"]
            for (kind, severity), block in scored["corruptions"].items():
                results["corruptions"].setdefault(kind, {}).setdefault(str(severity), {})[v.name] = block
    if gates:  # moe's gate at the top (as before), every routing's weight matrix under by_variant
        results["gate"] = {**gates.get("moe", next(iter(gates.values()))), "by_variant": gates}
    results["meta"] = _meta(queries, gallery, list(cfg.eval.ks))
    io.write_parquet(artifacts.per_query(cfg), per_query_table(queries, ranks))
    write_report(cfg, results)
    return results


def _platform_gate_model(cfg: Config, chosen: list[Variant]) -> Any:
    """models/gate (trunk + the gate trained on platform labels) when a variant routes with it, else None."""
    if not any(v.weights == PLATFORM_GATE for v in chosen):
        return None
    from geoloc_ray.model import load_model

    uri = artifacts.model_dir(cfg, artifacts.GATE)
    artifacts.require(artifacts.model_manifest(cfg, artifacts.GATE), "train")
    return load_model(uri, heads=[]).eval()


def _meta(queries, gallery, ks: list[int]) -> dict[str, Any]:
    locations, query_locations = gallery["location_id"].to_numpy(), queries["location_id"].to_numpy()
    return {
        "queries": len(queries), "gallery": len(gallery), "locations": int(gallery["location_id"].nunique()),
        "queries_per_platform": queries["platform"].value_counts().to_dict(),
        "chance": {f"R@{k}": round(chance_recall(locations, query_locations, k), 3) for k in ks},
    }


def _columns_for(v: Variant, model_heads: list[str], dim: int) -> np.ndarray:
    """Which columns of the model's concatenated gallery vector belong to this variant's heads, in order."""
    return np.concatenate([np.arange(model_heads.index(h) * dim, (model_heads.index(h) + 1) * dim)
                           for h in v.heads])
