"""The prepare stage: records -> cleaned, platform-partitioned `prepared/{train,test}.parquet` with Ray Data."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config
from geoloc_ray.corpus.read import read_split
from geoloc_ray.corpus.records import PREPARED_COLUMNS
from geoloc_ray.preprocess.images import image_problem
from geoloc_ray.preprocess.text import clean_query, directional_phrases, training_statements

log = logging.getLogger(__name__)


def clean_texts_batch(batch, *, patterns: list[str], max_words: int, min_words: int):
    """Training captions become short statements without directions; test queries are only normalised."""
    cleaned, reasons = [], []
    for split, texts, reason in zip(batch["split"], batch["texts"], batch["skip_reason"], strict=True):
        texts = list(texts)
        if split == "train":
            out = [s for t in texts for s in training_statements(t, patterns, max_words, min_words)]
            out = list(dict.fromkeys(out))
            if not out and reason is None:
                reason = "no usable text after removing directional sentences"
        else:
            out = [q for q in (clean_query(t) for t in texts) if q]
        cleaned.append(out)
        reasons.append(reason)
    batch["texts"] = cleaned
    batch["skip_reason"] = reasons
    return batch


def check_images_batch(batch, *, storage: dict | None = None):
    """Mark missing or corrupt images with a reason; they are skipped and reported, never fatal."""
    io.use_storage_options(storage)
    reasons = []
    for uri, reason in zip(batch["image_uri"], batch["skip_reason"], strict=True):
        reasons.append(reason if reason is not None else image_problem(uri))
    batch["skip_reason"] = reasons
    return batch


def _read_all(cfg: Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows, malformed = [], []
    for split in ("train", "test"):
        records, bad = read_split(cfg.data, split)
        rows += [dict(r.row(), skip_reason=None) for r in records]
        malformed += [{"source": b.source, "where": b.where, "reason": b.reason} for b in bad]
    for m in malformed:
        log.warning("malformed record skipped: %s [%s]: %s", m["source"], m["where"], m["reason"])
    return rows, malformed


def run_prepare(cfg: Config) -> dict[str, Any]:
    """Read both splits, clean texts, check images, write prepared parquet + skipped.jsonl + summary.json."""
    import ray.data
    from ray.data.expressions import col

    from geoloc_ray.runtime import connect

    connect(cfg)
    rows, malformed = _read_all(cfg)
    if not rows:
        raise ValueError(f"no readable records under {cfg.data.root}")
    pp = cfg.preprocess
    ds = ray.data.from_items(rows, override_num_blocks=max(2, min(32, len(rows) // 200)))
    ds = ds.map_batches(
        clean_texts_batch,
        batch_format="pandas",
        fn_kwargs={"patterns": directional_phrases(pp), "max_words": pp.max_statement_words,
                   "min_words": pp.min_statement_words},
    )
    if pp.check_images:
        ds = ds.map_batches(check_images_batch, batch_format="pandas", num_cpus=0.5,
                            fn_kwargs={"storage": io.storage_options()})
    ds = ds.materialize()
    good = ds.filter(expr=col("skip_reason").is_null()).select_columns(list(PREPARED_COLUMNS))
    counts: dict[str, Any] = {}
    for split in ("train", "test"):
        part = good.filter(expr=col("split") == split)
        io.write_dataset_parquet(part, artifacts.prepared(cfg, split))
        counts[split] = dict(Counter(part.to_pandas()["platform"]))
    skipped = [
        {"image_id": r["image_id"], "image_uri": r["image_uri"], "split": r["split"], "reason": r["skip_reason"]}
        for r in ds.filter(expr=col("skip_reason").is_not_null()).take_all()
    ]
    report = skipped + [{"malformed": True, **m} for m in malformed]
    io.write_jsonl(artifacts.prepare_skipped(cfg), report)
    summary = {"rows": counts, "skipped_images": len(skipped), "malformed_records": len(malformed)}
    io.write_json(artifacts.prepare_summary(cfg), summary)
    return summary
