"""The eval stage: the ablation ladder (unified, aligned, static_ensemble, moe) on the mixed test gallery.

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
from geoloc_ray.embedding import embed_images, query_vectors, view_column
from geoloc_ray.eval.corruptions import corrupt
from geoloc_ray.eval.metrics import chance_recall, recall_curve, retrieval_metrics
from geoloc_ray.index.faiss_index import exact_search


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # models/<model>
    heads: tuple[str, ...]
    weights: str | None  # None: single head; "static" or "gate": fused experts


def variants(cfg: Config) -> list[Variant]:
    """The configured rungs of the ladder; the names are the metrics.json contract, not model names."""
    experts = tuple(cfg.model.platforms)
    table = {
        "unified": Variant("unified", artifacts.UNIFIED, ("unified",), None),
        "aligned": Variant("aligned", artifacts.ALIGNED, ("aligned",), None),
        "static_ensemble": Variant("static_ensemble", artifacts.MOE, experts, "static"),
        "moe": Variant("moe", artifacts.MOE, experts, "gate"),
    }
    return [table[v] for v in cfg.eval.variants]


def load_queries(cfg: Config):
    """One row per test query: its text, the image it describes, that image's location and platform."""
    import pandas as pd

    test = io.read_parquet(artifacts.prepared(cfg, "test"))
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


def gate_summary(gates: np.ndarray, queries, platforms: list[str]) -> dict[str, Any]:
    """Mean gate weights by the query's true platform, and how often the gate's top expert is that platform."""
    out: dict[str, Any] = {"mean_weights": {}, "accuracy": float(np.mean(
        np.asarray(platforms)[gates.argmax(1)] == queries["platform"].to_numpy()))}
    for platform in platforms:
        sel = (queries["platform"] == platform).to_numpy()
        if sel.any():
            out["mean_weights"][platform] = dict(zip(platforms, gates[sel].mean(0).round(4).tolist(), strict=True))
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
    return embed_images(ds, models, cfg.index, views)


def score_variant(v: Variant, model, queries, gallery, model_heads: list[str], ks: list[int],
                  corruptions: list[tuple[str, int]]) -> dict[str, Any]:
    """One variant's metrics block, recall curve, gate summary (gated variants) and corrupted-gallery blocks."""
    max_k = max([*ks, 10])
    qv = query_vectors(model, queries["query"].tolist(), v.heads, v.weights, with_gate=v.weights == "gate")
    cols = _columns_for(v, model_heads, model.model_cfg.embed_dim)
    ranked = exact_search(qv.vectors, np.stack(gallery[v.model].to_numpy())[:, cols], max_k)[1]
    out: dict[str, Any] = {
        "metrics": _metrics_block(ranked, gallery, queries, ks),
        "curve": recall_curve(ranked, gallery["location_id"].to_numpy(), queries["location_id"].to_numpy(), max_k),
        "gate": None if qv.gate is None else gate_summary(qv.gate, queries, list(model.platforms)),
        "corruptions": {},
    }
    for kind, severity in corruptions:
        damaged = np.stack(gallery[view_column(v.model, corruption_view(kind, severity))].to_numpy())[:, cols]
        out["corruptions"][(kind, severity)] = _recall(exact_search(qv.vectors, damaged, max_k)[1],
                                                       gallery, queries, ks)
    return out


def run_eval(cfg: Config) -> dict[str, Any]:
    """Write eval/metrics.json, eval/results.md and the plots; returns the metrics."""
    from geoloc_ray.eval.report import write_report
    from geoloc_ray.model import load_model
    from geoloc_ray.runtime import init_ray

    artifacts.apply_storage_options(cfg)
    chosen = variants(cfg)
    heads = gallery_heads(chosen)
    model_uris = {m: artifacts.model_dir(cfg, m) for m in heads}
    for m in model_uris:
        artifacts.require(artifacts.model_manifest(cfg, m), "train")
    init_ray(cfg)
    queries = load_queries(cfg)
    corruptions = [(k, s) for k in cfg.eval.corruptions for s in cfg.eval.severities]
    gallery = embed_gallery(cfg, {m: (uri, heads[m]) for m, uri in model_uris.items()}, corruptions)
    results: dict[str, Any] = {"variants": {}, "corruptions": {}, "curves": {}}
    for model_name, uri in model_uris.items():
        model = load_model(uri).eval()
        for v in [v for v in chosen if v.model == model_name]:
            scored = score_variant(v, model, queries, gallery, heads[model_name], list(cfg.eval.ks), corruptions)
            results["variants"][v.name], results["curves"][v.name] = scored["metrics"], scored["curve"]
            if scored["gate"] is not None:
                results["gate"] = scored["gate"]
            for (kind, severity), block in scored["corruptions"].items():
                results["corruptions"].setdefault(kind, {}).setdefault(str(severity), {})[v.name] = block
    results["meta"] = _meta(queries, gallery, list(cfg.eval.ks))
    write_report(cfg, results)
    return results


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
