"""The refine stage: prepared/train.parquet -> refined/train.parquet (+ cache, + summary.json) on Ray Data."""

from __future__ import annotations

import logging
import time
from typing import Any

from geoloc_ray import artifacts, io
from geoloc_ray.captions.cache import compact_cache
from geoloc_ray.captions.refiner import STAT_COLUMNS, Refiner, RefineSettings, settings_from_config
from geoloc_ray.captions.rules import DROP_REASONS
from geoloc_ray.captions.validate import REJECTION_REASONS

log = logging.getLogger(__name__)

MAX_LISTED_EMPTY = 50  # the summary names at most this many rows left without a visible statement
MAX_LISTED_ERRORS = 10  # ... and this many rows whose generation failed, with their messages


def _refine_dataset(ds, settings: RefineSettings, cfg):
    import ray.data

    rc = cfg.refine
    if settings.backend == "vllm":
        from geoloc_ray.captions.vllm_backend import check_gpus, refine_with_vllm

        if cfg.device != "cpu":  # device cpu: the engine asks for CPU bundles only (vllm_backend.engine_placement)
            check_gpus(rc.vllm.tensor_parallel_size)
        return refine_with_vllm(ds, settings, rc)
    gpu = {"num_gpus": rc.actors.num_gpus} if rc.actors.num_gpus > 0 else {}
    return ds.map_batches(
        Refiner,
        fn_constructor_kwargs={"settings": settings},
        batch_size=rc.actors.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=rc.actors.count),
        num_cpus=rc.actors.num_cpus,  # fractional: whole-CPU actors starve the read tasks on small machines
        **gpu,
    )


def summarize(stats, settings: RefineSettings, seconds: float = 0.0) -> dict[str, Any]:
    """Counts from the per-row stat columns (a pandas DataFrame with image_id, platform and STAT_COLUMNS)."""
    n = len(stats)
    hits = int(stats["refine_cache_hit"].sum()) if n else 0
    empty = stats[stats["refine_source"] == "empty"]["image_id"].tolist() if n else []
    # LLM answers this run produced (cache hits were counted when they were generated): each is accepted or
    # rejected by the validator; a row whose generation failed is an error instead, refined by the rules.
    llm = n and settings.backend != "rules"
    fresh = stats[~stats["refine_cache_hit"] & (stats["refine_error"] == "")] if llm else stats.iloc[:0]
    rejected = int((fresh["refine_rejection"] != "").sum()) if len(fresh) else 0
    failed = stats[stats["refine_error"] != ""] if n else stats.iloc[:0]
    per_platform = {}
    for platform, g in stats.groupby("platform") if n else []:
        per_platform[platform] = {
            "rows": len(g),
            "statements_in": int(g["refine_n_in"].sum()),
            "statements_out": int(g["refine_n_out"].sum()),
        }
    return {
        "backend": settings.backend,
        "model": settings.model_id,
        "prompt": settings.prompt_id,
        "rows": n,
        "statements_in": int(stats["refine_n_in"].sum()) if n else 0,
        "statements_out": int(stats["refine_n_out"].sum()) if n else 0,
        "cache": {"hits": hits, "misses": n - hits},
        "generated": len(fresh),
        "accepted": len(fresh) - rejected,
        "rejected": rejected,
        "errors": len(failed),
        "error_rows": [
            {"image_id": r.image_id, "error": r.refine_error} for r in failed.head(MAX_LISTED_ERRORS).itertuples()
        ],
        "rejections": {r: int((stats["refine_rejection"] == r).sum()) if n else 0 for r in REJECTION_REASONS},
        "rows_by_source": {
            s: int((stats["refine_source"] == s).sum()) if n else 0
            for s in ("llm", "rules", "original", "empty")
        },
        "rules_dropped": {r: int(stats[f"refine_drop_{r}"].sum()) if n else 0 for r in DROP_REASONS},
        # Rows left without a statement are dropped from refined/train.parquet (training would have no text).
        "empty_rows": {"count": len(empty), "image_ids": empty[:MAX_LISTED_EMPTY]},
        "per_platform": per_platform,
        "seconds": round(seconds, 2),
    }


def run_refine(cfg) -> dict[str, Any]:
    """Refine prepared/train for each image's platform; returns the summary, also written as summary.json."""
    import ray.data

    from geoloc_ray.runtime import connect

    start = time.time()
    paths = {"input": artifacts.require(artifacts.prepared(cfg, "train"), "prepare"),
             "output": artifacts.refined_train(cfg), "cache": artifacts.refine_cache(cfg),
             "summary": artifacts.refine_summary(cfg)}
    settings = settings_from_config(cfg)
    connect(cfg)
    ds = ray.data.read_parquet(paths["input"], filesystem=io.arrow_filesystem(paths["input"]))
    columns = [c for c in ds.columns() if c != "texts_original"]
    missing = {"image_id", "platform", "texts"} - set(columns)
    if missing:
        raise ValueError(f"{paths['input']} lacks column(s) {sorted(missing)}")
    refined = _refine_dataset(ds, settings, cfg).materialize()
    if refined.count() == 0:
        raise ValueError(f"{paths['input']} has no rows to refine")
    stats = refined.select_columns(["image_id", "platform", *STAT_COLUMNS]).to_pandas()
    io.remove(paths["output"])  # a rerun replaces the output; the cache is kept
    # A row refined to no statement has nothing to train on: it is counted (summary `empty_rows`), not written.
    kept = refined.filter(lambda row: len(row["texts"]) > 0)
    kept.select_columns([*columns, "texts_original"]).write_parquet(
        paths["output"], filesystem=io.arrow_filesystem(paths["output"])
    )
    entries = compact_cache(paths["cache"])
    summary = {
        **summarize(stats, settings, time.time() - start),
        "rows_written": kept.count(),
        "output": paths["output"],
        "cache_dir": paths["cache"],
        "cache_entries": entries,
    }
    io.write_json(paths["summary"], summary)
    log.info(
        "refine: %d rows, cache %s, rejections %s", summary["rows"], summary["cache"], summary["rejections"]
    )
    return summary
