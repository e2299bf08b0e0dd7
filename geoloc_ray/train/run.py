"""The training recipe (README, "Training recipe"), one round after the other.

1. stage 0: `stage0`, the unified model on all platforms and the original captions (in the embedded default it
   also trains the image trunk from scratch; afterwards the trunk is frozen, as a pretrained trunk is).
2. heads on the frozen trunk, in parallel: `unified` (the stage-0 head continued on the original captions),
   `aligned` (the same start, on the refined captions) and the platform gate. `unified` and `aligned` get the
   same budget, so the ladder compares text sources, not training length.
3. the three experts, in parallel, each specialising the aligned head on its platform's refined captions
   (stage 1; with `train.expert_replay` the other platforms' rows weigh in at that share); hard-negative
   mining with the stage-1 experts; stage 2 on the mined records.
4. the MoE model (trunk + experts + gate), its gate then tuned on the fused loss over held-out locations.

Every model lands in the run layout of `artifacts` (safetensors + manifest). A model whose manifest carries the
current training hash is reused and mining is reused while it matches the stage-1 experts, so a resumed job
redoes only what is missing.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from geoloc_ray import artifacts, io
from geoloc_ray.artifacts import ALIGNED, GATE, MOE, MOE_UNTUNED, STAGE0, UNIFIED
from geoloc_ray.config import Config, StageConfig, config_hash
from geoloc_ray.train import mining
from geoloc_ray.train.data import Source, split_locations
from geoloc_ray.train.fit import fit_concurrently
from geoloc_ray.train.kinds import kind_of
from geoloc_ray.train.shards import steps_per_epoch
from geoloc_ray.train.worker_types import JobSpec

log = logging.getLogger(__name__)

TRAIN_SECTIONS = ["data", "preprocess", "refine", "model", "train", "seed"]
# Read by the fused gate tuning and the MoE's assembly alone: every model before them is up to date whatever their
# values, so trying another gate setting retrains only the gate (its models carry the full hash).
GATE_ONLY_KEYS = ("train.gate_fused", "train.gate_fused_anchor", "train.gate_fused_prior", "model.gate_temperature")


@dataclass(frozen=True)
class Fit:
    """One model of the recipe: the job, the rows it trains on, where the model lands, its minimum steps."""

    job: JobSpec
    source: Source
    out: str
    min_steps: int = 0


def stage_fit(cfg: Config, name: str, kind: str, stage: StageConfig, source: Source, out: str, **job: Any) -> Fit:
    """A fit whose epochs, lr, text layers and minimum steps are its stage's (`train.stage0`, `train.gate`, ...)."""
    spec = JobSpec(name=name, kind=kind, epochs=stage.epochs, lr=stage.lr, text_layers=stage.train_text_layers,
                   seed=cfg.seed, **job)
    return Fit(spec, source, out, stage.min_steps)


def scheduled(job: JobSpec, rows: int, batch_size: int, min_steps: int, workers: int = 1) -> JobSpec:
    """The job with its schedule's length in the steps EACH worker takes: Ray Train splits the rows equally
    (`streaming_split(equal=True)` drops the remainder), so a worker sees rows // workers of them; epochs are
    stretched to `min_steps` (small subsets, e.g. one satellite image per location, would get only a few)."""
    steps = max(1, steps_per_epoch(rows // workers, batch_size))
    return dataclasses.replace(job, steps_per_epoch=steps, epochs=max(job.epochs, -(-min_steps // steps)))


def stage2_job(cfg: Config) -> dict[str, Any]:
    """Stage 2's own job fields: its batch size and GradCache chunk (`train.stage2`)."""
    return {"batch_size": cfg.train.stage2.batch_size, "grad_cache_chunk": cfg.train.stage2.grad_cache_chunk}


def is_done(uri: str, train_hash: str) -> bool:
    manifest = io.join(uri, "manifest.json")
    return io.exists(manifest) and io.read_json(manifest).get("extra", {}).get("train_hash") == train_hash


def image_size(cfg: Config) -> int:
    if cfg.model.image.image_size is None:
        raise ValueError("model.image.image_size must be set for training (the decode size)")
    return cfg.model.image.image_size


def fit_round(cfg: Config, train_hash: str, fits: list[Fit]) -> dict[str, Any]:
    """Train the fits whose model is not up to date, concurrently (one TorchTrainer each); metrics per job."""
    todo = []
    for fit in fits:
        if is_done(fit.out, train_hash):
            log.info("%s: up to date at %s, skipped", fit.job.name, fit.out)
            continue
        # the rows as ids, counted without decoding; the images are decoded while the batches stream to the workers
        rows = kind_of(fit.job.kind).dataset(fit.source, image_size(cfg))
        job = scheduled(fit.job, rows.rows, fit.job.batch_size or cfg.train.batch_size, fit.min_steps,
                        cfg.train.num_workers)
        job = dataclasses.replace(job, local_shuffle=not rows.shuffled)
        todo.append((job, rows.dataset, f"{job.name}-{train_hash}", fit.out))
    if not todo:
        return {}
    log.info("training %s", ", ".join(f"{job.name} ({job.epochs} epochs)" for job, *_ in todo))
    results = fit_concurrently(cfg, todo, cfg.train.num_workers, extra={"train_hash": train_hash})
    return {r.job: r.metrics for r in results}


def expert_fit(cfg: Config, platform: str, rows: Source, out: str, aligned: str) -> Fit:
    """Stage 1 of one expert: the aligned head on its platform's rows, plus (`train.expert_replay` > 0) the other
    platforms' rows weighted so that together they weigh `expert_replay` times its own."""
    replay, weight = cfg.train.expert_replay, None
    if replay > 0:
        counts = platform_counts(rows)
        own, other = counts.get(platform, 0), sum(n for p, n in counts.items() if p != platform)
        if own == 0:
            raise ValueError(f"no training rows of platform {platform!r} in {rows.uri} for its expert")
        weight = replay * own / other if other else None
    else:
        rows = dataclasses.replace(rows, platforms=(platform,))
    return stage_fit(cfg, f"{platform}-stage1", "pairs", cfg.train.stage1, rows, out, head=platform, init=aligned,
                     init_head=ALIGNED, other_platform_weight=weight)


def platform_counts(rows: Source) -> dict[str, int]:
    """Rows per platform of a source (its location filters applied)."""
    frame = io.read_parquet(rows.uri, columns=["platform", "location_id"])
    keep = ~frame["location_id"].astype(str).isin(rows.exclude or ())
    if rows.locations is not None:
        keep &= frame["location_id"].astype(str).isin(rows.locations)
    return {str(p): int(n) for p, n in frame.loc[keep, "platform"].value_counts().items()}


def run_train(cfg: Config) -> dict[str, Any]:
    """All training rounds; returns per-job metrics and where the models are."""
    from geoloc_ray.model import assemble_moe
    from geoloc_ray.runtime import connect
    from geoloc_ray.train.plan import check_plan

    image_size(cfg)  # fail before any training
    check_plan(cfg)  # every fit fits its GPU, or a ValueError naming the fit and the key (train.use_gpu only)
    connect(cfg)
    prepared = artifacts.require(artifacts.prepared(cfg, "train"), "prepare")
    refined = artifacts.require(artifacts.refined_train(cfg), "refine")
    h, upstream = config_hash(cfg, TRAIN_SECTIONS), config_hash(cfg, TRAIN_SECTIONS, GATE_ONLY_KEYS)
    t, platforms = cfg.train, list(cfg.model.platforms)
    locations = io.read_parquet(prepared, columns=["location_id"])["location_id"]
    held_out = frozenset(split_locations(locations, t.val_fraction))
    original, aligned_rows = Source(prepared, exclude=held_out), Source(refined, exclude=held_out)
    models = {name: artifacts.model_dir(cfg, name) for name in (STAGE0, UNIFIED, ALIGNED, GATE, MOE)}
    metrics: dict[str, Any] = {}

    metrics |= fit_round(cfg, upstream, [
        stage_fit(cfg, STAGE0, "pairs", t.stage0, original, models[STAGE0], head=UNIFIED,
                  image_trunk=cfg.model.train_image_trunk_in_stage0),
    ])
    metrics |= fit_round(cfg, upstream, [
        stage_fit(cfg, UNIFIED, "pairs", t.stage1, original, models[UNIFIED], head=UNIFIED,
                  init=models[STAGE0], init_head=UNIFIED),
        stage_fit(cfg, ALIGNED, "pairs", t.stage1, aligned_rows, models[ALIGNED], head=ALIGNED,
                  init=models[STAGE0], init_head=UNIFIED),
        stage_fit(cfg, GATE, "gate", t.gate, aligned_rows, models[GATE], init=models[STAGE0]),
    ])
    stage1 = {p: artifacts.expert_dir(cfg, p, 1) for p in platforms}
    metrics |= fit_round(cfg, upstream, [expert_fit(cfg, p, aligned_rows, stage1[p], models[ALIGNED]) for p in platforms])
    experts = stage1
    if t.stage2.epochs > 0:
        metrics["mining"] = mining.mine(cfg, stage1, refined, held_out)
        experts = {p: artifacts.expert_dir(cfg, p, 2) for p in platforms}
        metrics |= fit_round(cfg, upstream, [
            stage_fit(cfg, f"{p}-stage2", "triplets", t.stage2, Source(artifacts.mined(cfg, p)), experts[p],
                      head=p, init=stage1[p], **stage2_job(cfg))
            for p in platforms
        ])

    expert_uris, provenance = [experts[p] for p in platforms], {"train_hash": h}
    if t.gate_fused.epochs > 0 and held_out:
        untuned = artifacts.model_dir(cfg, MOE_UNTUNED)
        assemble_moe(expert_uris, models[GATE], untuned, cfg, extra=provenance)
        metrics |= fit_round(cfg, h, [
            stage_fit(cfg, "gate-fused", "gate_fused", t.gate_fused, Source(refined, locations=held_out),
                      models[MOE], init=untuned),
        ])
    else:
        assemble_moe(expert_uris, models[GATE], models[MOE], cfg, extra=provenance)
    return {"train_hash": h, "held_out_locations": len(held_out), "models": {**models, "experts": experts},
            "metrics": metrics}
