"""prepare -> refine -> train -> index -> eval in one command (the stage registry, in order); a finished stage
is skipped when its output exists and its config hash matches the one recorded when it finished."""

from __future__ import annotations

import logging
import time
from typing import Any

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config
from geoloc_ray.stages import STAGES, Stage, hashes

log = logging.getLogger(__name__)


def is_up_to_date(cfg: Config, stage: Stage, expected_hash: str) -> bool:
    marker = artifacts.pipeline_marker(cfg, stage.name)
    return (io.exists(marker) and io.read_json(marker).get("hash") == expected_hash
            and io.exists(stage.output(cfg)))


def _last_seconds(cfg: Config, stage: Stage) -> float | None:
    """How long this stage took the last time it ran on this run folder (any config), for the ETA."""
    marker = artifacts.pipeline_marker(cfg, stage.name)
    return io.read_json(marker).get("seconds") if io.exists(marker) else None


def _eta(cfg: Config, todo: list[Stage]) -> list[float | None]:
    """Per stage to run: the expected seconds of it and every later one, when all of them are known."""
    seconds = [_last_seconds(cfg, s) for s in todo]
    return [None if None in seconds[i:] else float(sum(seconds[i:])) for i in range(len(todo))]


def run_pipeline(cfg: Config, only: list[str] | None = None) -> dict[str, Any]:
    """Run (or skip) each stage in order; returns per-stage status, seconds and results."""
    from geoloc_ray.console import progress
    from geoloc_ray.runtime import connect

    connect(cfg)
    expected = hashes(cfg)
    chosen = [s for s in STAGES if only is None or s.name in only]
    todo = [s for s in chosen if not is_up_to_date(cfg, s, expected[s.name])]
    eta = dict(zip([s.name for s in todo], _eta(cfg, todo), strict=True))
    report: dict[str, Any] = {}
    for stage in chosen:
        if stage not in todo:
            log.info("pipeline: %s is up to date, skipped", stage.name)
            report[stage.name] = {"status": "skipped"}
            continue
        if progress() is not None:
            progress().start_stage(stage.name, todo.index(stage) + 1, len(todo), eta[stage.name])
        log.info("pipeline: running %s", stage.name)
        t0 = time.perf_counter()
        result = stage.run(cfg)
        seconds = round(time.perf_counter() - t0, 1)
        io.write_json(artifacts.pipeline_marker(cfg, stage.name),
                      {"hash": expected[stage.name], "seconds": seconds,
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        report[stage.name] = {"status": "ran", "seconds": seconds, "result": result}
    io.write_json(artifacts.pipeline_last_run(cfg),
                  {k: {kk: vv for kk, vv in v.items() if kk != "result"} for k, v in report.items()})
    return report


def ensure_world(cfg: Config, locations: int | None, seed: int | None) -> dict[str, Any]:
    """Synthesize the demo world at data.root unless the same world (locations, seed) is already there."""
    from geoloc_ray.corpus.synth import synth_from_config

    synth = cfg.synth.model_copy(update={k: v for k, v in (("locations", locations), ("seed", seed))
                                         if v is not None})
    want = {"locations": synth.locations, "seed": synth.seed}
    stamp = io.join(cfg.data.root, "synth.json")
    if io.exists(stamp) and all(io.read_json(stamp).get(k) == v for k, v in want.items()):
        log.info("demo: world at %s is up to date", cfg.data.root)
        return io.read_json(stamp)
    from geoloc_ray.console import progress

    summary = synth_from_config(synth, cfg.data.root, progress=progress() is None)  # quiet: the one line shows it
    io.write_json(stamp, {**want, "summary": summary})
    return summary


def run_demo(cfg: Config, locations: int | None = None, seed: int | None = None) -> str:
    """Synthesize a world, run the pipeline and return the ablation table with stage timings."""
    from geoloc_ray.console import progress
    from geoloc_ray.eval.report import ladder_table, platform_table

    t0 = time.perf_counter()
    if progress() is not None:
        progress().start_stage("synth", 0, len(STAGES), None)
    log.info("demo: synthesizing the world at %s", cfg.data.root)
    ensure_world(cfg, locations, seed)
    synth_s = time.perf_counter() - t0
    report = run_pipeline(cfg)
    metrics = io.read_json(artifacts.metrics(cfg))
    timings = [f"synth {synth_s:.0f}s"] + [
        f"{k} {v['seconds']:.0f}s" if v["status"] == "ran" else f"{k} skipped" for k, v in report.items()]
    total = time.perf_counter() - t0
    return "\n".join([
        "", "PE-MoE ablation ladder (location level, recalls in %):", ladder_table(metrics, "location"), "",
        "Score per query platform:", platform_table(metrics), "",
        f"chance: {metrics['meta']['chance']}", f"stages: {', '.join(timings)}; total {total:.0f}s",
        f"artifacts: {cfg.artifacts} (eval/results.md, eval/*.png)",
    ])
