"""The eval stage: the ablation ladder (unified, aligned, static_ensemble, moe) on the mixed test gallery, and
routing diagnostics (moe's experts under the oracle and the platform-label gate, each expert alone).

Off the driver (`eval/distributed.py`): Ray Data embeds the gallery (one frozen-trunk pass per image and view for
every model) and the queries (one text-trunk pass for every model) on actor pools and writes the vectors to
storage; Ray tasks search them exactly, file by file, and return each query's hit ranks. The driver holds the
query table and those ranks, never a gallery. The in-process functions here (`score_variant`, `encode_queries`)
are the reference the distributed path is tested against; ranking is exact inner-product search, so the numbers
measure the models, not an ANN index.
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
    chance_recall_from_counts,
    first_hit_rank,
    per_query_table,
    rank_curve,
    rank_metrics,
)
from geoloc_ray.eval.routing import (
    ORACLE,
    ORACLE_MIX,
    PLATFORM_GATE,
    gate_summary,
    gate_weights,
    mix_grid,
    oracle_mix,
    oracle_weights,
    routed_query,
)
from geoloc_ray.eval.search import places_search
from geoloc_ray.index.faiss_index import exact_search
from geoloc_ray.index.store import check_experts_for_model


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # models/<model>
    heads: tuple[str, ...]
    # None: single head; "static", "gate" (the model's own), "oracle", "oracle_mix" or "platform_gate"
    # (routing.py): fused
    weights: str | None
    places: bool = False  # one image per location (its best): k distinct places, as `group_by: location` serves
    grid: tuple[tuple[float, ...], ...] = ()  # oracle_mix: the fixed weights it picks from, per query platform


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
        "oracle_mix": Variant("oracle_mix", artifacts.MOE, experts, ORACLE_MIX,
                              grid=tuple(map(tuple, mix_grid(len(experts), cfg.eval.mix_divisions).tolist()))),
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


def _metrics_block(loc: np.ndarray, img: np.ndarray, queries, ks: list[int]) -> dict[str, Any]:
    """Image- and location-level recall over all queries, and per query platform, from first-hit ranks."""
    block: dict[str, Any] = rank_metrics(loc, img, ks)
    block["per_platform"] = {}
    for platform in sorted(queries["platform"].unique()):
        sel = (queries["platform"] == platform).to_numpy()
        block["per_platform"][platform] = rank_metrics(loc[sel], img[sel], ks)
        block["per_platform"][platform]["queries"] = int(sel.sum())
    return block


def variant_result(v: Variant, queries, ks: list[int], ranks: dict[str | None, tuple[np.ndarray, np.ndarray]],
                   weights: np.ndarray | None, corruptions: list[tuple[str, int]]) -> dict[str, Any]:
    """A variant's metrics block, recall curve, per-query location ranks, gate summary and corrupted-gallery
    blocks, from its hit ranks per gallery view (None = clean): what both eval paths report."""
    loc, img = ranks[None]
    out: dict[str, Any] = {
        "metrics": _metrics_block(loc, img, queries, ks),
        "curve": rank_curve(loc, max([*ks, 10])),
        "ranks": loc,
        "gate": None if weights is None else gate_summary(weights, queries, list(v.heads)),
        "corruptions": {},
    }
    for kind, severity in corruptions:
        out["corruptions"][(kind, severity)] = rank_metrics(*ranks[corruption_view(kind, severity)], ks)
    return out


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


def _rank(v: Variant, qvecs: np.ndarray, vectors: np.ndarray, gallery, max_k: int) -> np.ndarray:
    if v.places:
        return places_search(qvecs, vectors, gallery["location_id"].to_numpy(), max_k)
    return exact_search(qvecs, vectors, max_k)[1]


def _hit_ranks(ranked: np.ndarray, gallery, queries) -> tuple[np.ndarray, np.ndarray]:
    safe, valid = np.clip(ranked, 0, None), ranked >= 0
    hits = [(gallery[c].to_numpy()[safe] == queries[c].to_numpy()[:, None]) & valid
            for c in ("location_id", "image_id")]
    return first_hit_rank(ranked, hits[0]), first_hit_rank(ranked, hits[1])


def score_variant(v: Variant, model, queries, gallery, model_heads: list[str], ks: list[int],
                  corruptions: list[tuple[str, int]], qv: Any = None) -> dict[str, Any]:
    """One variant scored in this process over a collected gallery frame (`embed_gallery`): the reference the
    distributed eval is tested against. `qv`: the variant's query vectors when already encoded."""
    max_k = max([*ks, 10])
    if qv is None:
        qv = encode_queries(v, model, queries)
    cols = _columns_for(v, model_heads, model.model_cfg.embed_dim)
    vectors = np.stack(gallery[v.model].to_numpy())[:, cols]
    if v.weights == ORACLE_MIX:  # qv.vectors: (G, N, K*D), one routed query set per grid point; clean view only
        per_point = [_hit_ranks(_rank(v, q, vectors, gallery, max_k), gallery, queries) for q in qv.vectors]
        best, weights, _ = oracle_mix(per_point, qv.gate, queries["platform"].tolist())
        return variant_result(v, queries, ks, {None: best}, weights, [])
    ranks = {None: _hit_ranks(_rank(v, qv.vectors, vectors, gallery, max_k), gallery, queries)}
    for kind, severity in corruptions:
        view = corruption_view(kind, severity)
        damaged = np.stack(gallery[view_column(v.model, view)].to_numpy())[:, cols]
        ranks[view] = _hit_ranks(_rank(v, qv.vectors, damaged, gallery, max_k), gallery, queries)
    return variant_result(v, queries, ks, ranks, qv.gate, corruptions)


def encode_queries(v: Variant, model, queries, cache: dict | None = None, gate_model: Any = None) -> QueryVectors:
    """A variant's query vectors, with its routing weights when it routes. Every variant of one model is built
    from that model's per-head query vectors, encoded once (`cache`, shared by the model's variants): a head
    alone, or concat_k(w_k t_k) under static, its own gate's, the oracle's or the platform gate's weights;
    oracle_mix: one such set per grid point (G, N, K*D), with the grid (G, K) as its weights."""
    cache = {} if cache is None else cache
    key = (v.heads, v.weights)
    if key not in cache:
        parts, own_gate = _head_vectors(model, queries, cache)
        if v.weights is None:
            cache[key] = QueryVectors(parts[v.heads[0]], None)
        elif v.weights == ORACLE_MIX:
            grid = np.asarray(v.grid, np.float32)
            n = len(queries)
            cache[key] = QueryVectors(np.stack([routed_query([parts[h] for h in v.heads], np.tile(w, (n, 1)))
                                                for w in grid]), grid)
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
    """Write eval/metrics.json, eval/per_query.parquet, eval/results.md and the plots; returns the metrics."""
    from geoloc_ray.eval.distributed import evaluate_distributed
    from geoloc_ray.eval.report import is_diagnostic, write_report
    from geoloc_ray.runtime import init_ray, use_storage

    use_storage(cfg)  # before the model checks read storage; Ray only once they pass
    chosen = variants(cfg)
    heads = gallery_heads(chosen)
    model_uris = {m: artifacts.model_dir(cfg, m) for m in heads}
    for m in model_uris:
        artifacts.require(artifacts.model_manifest(cfg, m), "train")
    if artifacts.MOE in model_uris:  # gallery columns follow model.platforms, the gate its manifest's order
        check_experts_for_model(cfg.model.platforms, model_uris[artifacts.MOE], "eval gallery (model.platforms)")
    gate_uri = _platform_gate_uri(cfg, chosen)
    init_ray(cfg)
    queries = load_queries(cfg)
    corruptions = [(k, s) for k in cfg.eval.corruptions for s in cfg.eval.severities]
    ks = list(cfg.eval.ks)
    found = evaluate_distributed(cfg, queries, chosen, {m: (uri, heads[m]) for m, uri in model_uris.items()},
                                 gate_uri, corruptions, max([*ks, 10]))
    results: dict[str, Any] = {"variants": {}, "corruptions": {}, "curves": {}}
    gates, ranks = {}, {}
    for v in chosen:
        scored = variant_result(v, queries, ks, found.ranks[v.name], found.weights.get(v.name),
                                [] if is_diagnostic(v.name) else corruptions)  # diagnostics probe routing
        results["variants"][v.name], results["curves"][v.name] = scored["metrics"], scored["curve"]
        ranks[v.name] = scored["ranks"]
        if scored["gate"] is not None and not v.places:
            gates[v.name] = scored["gate"]
        for (kind, severity), block in scored["corruptions"].items():
            results["corruptions"].setdefault(kind, {}).setdefault(str(severity), {})[v.name] = block
    if gates:  # moe's gate at the top (as before), every routing's weight matrix under by_variant
        results["gate"] = {**gates.get("moe", next(iter(gates.values()))), "by_variant": gates}
    results["meta"] = _meta(queries, found.gallery, ks)
    io.write_parquet(artifacts.per_query(cfg), per_query_table(queries, ranks))
    write_report(cfg, results)
    return results


def _platform_gate_uri(cfg: Config, chosen: list[Variant]) -> str | None:
    """models/gate when a variant routes with it (checked there), else None."""
    if not any(v.weights == PLATFORM_GATE for v in chosen):
        return None
    artifacts.require(artifacts.model_manifest(cfg, artifacts.GATE), "train")
    return artifacts.model_dir(cfg, artifacts.GATE)


def _platform_gate_model(cfg: Config, chosen: list[Variant]) -> Any:
    """models/gate (trunk + the gate trained on platform labels) when a variant routes with it, else None."""
    if not any(v.weights == PLATFORM_GATE for v in chosen):
        return None
    from geoloc_ray.model import load_model

    uri = artifacts.model_dir(cfg, artifacts.GATE)
    artifacts.require(artifacts.model_manifest(cfg, artifacts.GATE), "train")
    model = load_model(uri, heads=[]).eval()
    model.gate.temperature = cfg.model.gate_temperature  # as the distributed path routes it (query_models)
    return model


def _meta(queries, gallery: dict[str, Any], ks: list[int]) -> dict[str, Any]:
    """`gallery`: its size, distinct locations and images per query location (`search.gallery_stats`)."""
    query_locations = queries["location_id"].to_numpy()
    chance = {f"R@{k}": round(chance_recall_from_counts(gallery["gallery"], gallery["counts"], query_locations, k), 3)
              for k in ks}
    return {
        "queries": len(queries), "gallery": gallery["gallery"], "locations": gallery["locations"],
        "queries_per_platform": queries["platform"].value_counts().to_dict(), "chance": chance,
    }


def _columns_for(v: Variant, model_heads: list[str], dim: int) -> np.ndarray:
    """Which columns of the model's concatenated gallery vector belong to this variant's heads, in order."""
    return np.concatenate([np.arange(model_heads.index(h) * dim, (model_heads.index(h) + 1) * dim)
                           for h in v.heads])
