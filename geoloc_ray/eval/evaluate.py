"""The eval stage: the ablation ladder (unified, aligned, static_ensemble, moe) on the mixed test gallery.

Gallery embeddings come from Ray Data (one pass for every model and corruption); queries are encoded in the
driver; ranking is exact inner-product search, so the numbers measure the models, not an ANN index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config
from geoloc_ray.embedding import corrupted_column
from geoloc_ray.eval.metrics import chance_recall, recall_curve, retrieval_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # models/<model>
    heads: tuple[str, ...]
    weights: str | None  # None: single head; "static" or "gate": fused experts


def variants(cfg: Config) -> list[Variant]:
    experts = tuple(cfg.model.platforms)
    table = {
        "unified": Variant("unified", "unified", ("unified",), None),
        "aligned": Variant("aligned", "aligned", ("aligned",), None),
        "static_ensemble": Variant("static_ensemble", "moe", experts, "static"),
        "moe": Variant("moe", "moe", experts, "gate"),
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


def query_vectors(model, variant: Variant, texts: list[str], batch_size: int = 256
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Query vectors for a variant (fused for experts) and, for `moe`, the gate weights."""
    import torch

    vecs, gates = [], []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            if variant.weights is None:
                vecs.append(model.encode_text(chunk, variant.heads[0]).cpu().numpy())
                continue
            trunk = model.text_trunk_output(chunk)
            vecs.append(model.fused_query(trunk, weights=variant.weights, heads=list(variant.heads)).cpu().numpy())
            if variant.weights == "gate":
                gates.append(model.gate(trunk).cpu().numpy())
    return np.concatenate(vecs).astype(np.float32), (np.concatenate(gates) if gates else None)


def rank(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    return index.search(queries, min(k, len(gallery)))[1]


def _metrics_block(ranked, gallery, queries, ks) -> dict[str, Any]:
    args = (gallery["image_id"].to_numpy(), gallery["location_id"].to_numpy())
    block = retrieval_metrics(ranked, *args, queries["image_id"].to_numpy(), queries["location_id"].to_numpy(), ks)
    block["per_platform"] = {}
    for platform in sorted(queries["platform"].unique()):
        sel = (queries["platform"] == platform).to_numpy()
        sub = queries[sel]
        block["per_platform"][platform] = retrieval_metrics(
            ranked[sel], *args, sub["image_id"].to_numpy(), sub["location_id"].to_numpy(), ks)
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


def run_eval(cfg: Config) -> dict[str, Any]:
    """Write eval/metrics.json, eval/results.md and the plots; returns the metrics."""
    from geoloc_ray.embedding import embed_images
    from geoloc_ray.eval.report import write_report
    from geoloc_ray.model import load_model
    from geoloc_ray.runtime import init_ray

    artifacts.apply_storage_options(cfg)
    init_ray(cfg)
    chosen = variants(cfg)
    model_uris = {v.model: artifacts.model_dir(cfg, v.model) for v in chosen}
    for uri in model_uris.values():
        if not io.exists(io.join(uri, "manifest.json")):
            raise FileNotFoundError(f"no trained model at {uri}: run `geoloc-ray train` first")
    queries = load_queries(cfg)
    gallery_ds = io.read_dataset_parquet(artifacts.prepared(cfg, "test"),
                                         columns=["image_id", "image_uri", "location_id", "platform"])
    heads: dict[str, list[str]] = {}
    for v in chosen:  # one gallery column per model, covering the heads of all its variants
        model_heads = heads.setdefault(v.model, [])
        model_heads.extend(h for h in v.heads if h not in model_heads)
    corruptions = [(k, s) for k in cfg.eval.corruptions for s in cfg.eval.severities]
    gallery = embed_images(gallery_ds, {m: (model_uris[m], heads[m]) for m in model_uris}, cfg.index, corruptions)
    ks, max_k = list(cfg.eval.ks), max([*cfg.eval.ks, 10])
    results: dict[str, Any] = {"variants": {}, "corruptions": {}, "curves": {}}
    for model_name, uri in model_uris.items():
        model = load_model(uri).eval()
        for v in [v for v in chosen if v.model == model_name]:
            qv, gates = query_vectors(model, v, queries["query"].tolist())
            cols = _columns_for(v, heads[model_name], model.model_cfg.embed_dim)
            g = np.stack(gallery[model_name].to_numpy())[:, cols]
            ranked = rank(qv, g, max_k)
            results["variants"][v.name] = _metrics_block(ranked, gallery, queries, ks)
            results["curves"][v.name] = recall_curve(ranked, gallery["location_id"].to_numpy(),
                                                     queries["location_id"].to_numpy(), max_k)
            if gates is not None:
                results["gate"] = gate_summary(gates, queries, list(model.platforms))
            for kind, severity in corruptions:
                gc = np.stack(gallery[corrupted_column(model_name, kind, severity)].to_numpy())[:, cols]
                block = retrieval_metrics(rank(qv, gc, max_k), gallery["image_id"].to_numpy(),
                                          gallery["location_id"].to_numpy(), queries["image_id"].to_numpy(),
                                          queries["location_id"].to_numpy(), ks)
                results["corruptions"].setdefault(kind, {}).setdefault(str(severity), {})[v.name] = block
    results["meta"] = {
        "queries": len(queries), "gallery": len(gallery), "locations": int(gallery["location_id"].nunique()),
        "queries_per_platform": queries["platform"].value_counts().to_dict(),
        "chance": {f"R@{k}": round(chance_recall(gallery["location_id"].to_numpy(),
                                                 queries["location_id"].to_numpy(), k), 3) for k in ks},
    }
    write_report(cfg, results)
    return results


def _columns_for(v: Variant, model_heads: list[str], dim: int) -> np.ndarray:
    """Which columns of the model's concatenated gallery vector belong to this variant's heads, in order."""
    return np.concatenate([np.arange(model_heads.index(h) * dim, (model_heads.index(h) + 1) * dim)
                           for h in v.heads])
