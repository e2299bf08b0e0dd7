"""prepare -> refine -> train -> index -> eval in one command; a finished stage is skipped when its outputs
exist and its config hash (over its own and all upstream config sections) matches."""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config, config_hash

log = logging.getLogger(__name__)

# (stage, module, function, config sections it depends on, an output that proves it finished)
STAGES: list[tuple[str, str, str, list[str], str]] = [
    ("prepare", "geoloc_ray.preprocess.prepare", "run_prepare", ["data", "preprocess"], "prepared/summary.json"),
    ("refine", "geoloc_ray.captions.stage", "run_refine", ["refine"], "refined/summary.json"),
    ("train", "geoloc_ray.train.run", "run_train", ["model", "train", "seed"], "models/moe/manifest.json"),
    ("index", "geoloc_ray.index.build", "run_index", ["index"], "index/LATEST.json"),
    ("eval", "geoloc_ray.eval.evaluate", "run_eval", ["eval"], "eval/metrics.json"),
]


def stage_hashes(cfg: Config) -> dict[str, str]:
    """Cumulative: a stage's hash covers its sections and every upstream stage's."""
    out, sections = {}, []
    for name, _, _, own, _ in STAGES:
        sections = sections + own
        out[name] = config_hash(cfg, sections)
    return out


def _marker(cfg: Config, stage: str) -> str:
    return artifacts.artifact(cfg, "pipeline", f"{stage}.json")


def is_up_to_date(cfg: Config, stage: str, expected_hash: str, output: str) -> bool:
    marker = _marker(cfg, stage)
    return (io.exists(marker) and io.read_json(marker).get("hash") == expected_hash
            and io.exists(artifacts.artifact(cfg, output)))


def run_pipeline(cfg: Config, stages: list[str] | None = None) -> dict[str, Any]:
    """Run (or skip) each stage in order; returns per-stage status, seconds and results."""
    from geoloc_ray.runtime import init_ray

    artifacts.apply_storage_options(cfg)
    init_ray(cfg)
    hashes = stage_hashes(cfg)
    report: dict[str, Any] = {}
    for name, module, func, _, output in STAGES:
        if stages is not None and name not in stages:
            continue
        if is_up_to_date(cfg, name, hashes[name], output):
            log.info("pipeline: %s is up to date, skipped", name)
            report[name] = {"status": "skipped"}
            continue
        log.info("pipeline: running %s", name)
        t0 = time.perf_counter()
        result = getattr(importlib.import_module(module), func)(cfg)
        seconds = round(time.perf_counter() - t0, 1)
        io.write_json(_marker(cfg, name), {"hash": hashes[name], "seconds": seconds,
                                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        report[name] = {"status": "ran", "seconds": seconds, "result": result}
    io.write_json(artifacts.artifact(cfg, "pipeline", "last_run.json"),
                  {k: {kk: vv for kk, vv in v.items() if kk != "result"} for k, v in report.items()})
    return report


def ensure_world(cfg: Config, locations: int | None, seed: int | None) -> dict[str, Any]:
    """Synthesize the demo world at data.root unless the same world (locations, seed) is already there."""
    from geoloc_ray.corpus.synth import synth_world

    s = cfg.synth
    want = {"locations": locations or s.locations, "seed": s.seed if seed is None else seed}
    stamp = io.join(cfg.data.root, "synth.json")
    if io.exists(stamp) and all(io.read_json(stamp).get(k) == v for k, v in want.items()):
        log.info("demo: world at %s is up to date", cfg.data.root)
        return io.read_json(stamp)
    summary = synth_world(cfg.data.root, want["locations"], want["seed"], test_fraction=s.test_fraction,
                          drone_views=s.drone_views, ground_views=s.ground_views, image_size=s.image_size,
                          queries_per_image=s.queries_per_image)
    io.write_json(stamp, {**want, "summary": summary})
    return summary


def run_demo(cfg: Config, locations: int | None = None, seed: int | None = None) -> str:
    """Synthesize a world, run the pipeline and return the ablation table with stage timings."""
    from geoloc_ray.eval.report import ladder_table, platform_table

    t0 = time.perf_counter()
    ensure_world(cfg, locations, seed)
    synth_s = time.perf_counter() - t0
    report = run_pipeline(cfg)
    metrics = io.read_json(artifacts.artifact(cfg, "eval", "metrics.json"))
    timings = [f"synth {synth_s:.0f}s"] + [
        f"{k} {v['seconds']:.0f}s" if v["status"] == "ran" else f"{k} skipped" for k, v in report.items()]
    total = time.perf_counter() - t0
    return "\n".join([
        "", "PE-MoE ablation ladder (location level, recalls in %):", ladder_table(metrics, "location"), "",
        "Score per query platform:", platform_table(metrics), "",
        f"chance: {metrics['meta']['chance']}", f"stages: {', '.join(timings)}; total {total:.0f}s",
        f"artifacts: {cfg.artifacts} (eval/results.md, eval/*.png)",
    ])
