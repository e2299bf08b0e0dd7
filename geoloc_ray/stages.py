"""The stage registry: the pipeline's stages in order, each a `run(cfg) -> summary` function reference.

The CLI, `pipeline` and `jobs/` all read this one table; a stage is up to date when its output exists and its
config hash (its own sections plus every upstream stage's) matches the one recorded when it last finished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from geoloc_ray import artifacts
from geoloc_ray.captions.stage import run_refine
from geoloc_ray.config import Config, config_hash
from geoloc_ray.eval.evaluate import run_eval
from geoloc_ray.index.build import run_index
from geoloc_ray.preprocess.prepare import run_prepare
from geoloc_ray.train.run import run_train


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Config], Any]
    sections: tuple[str, ...]  # config sections this stage reads (upstream sections are added by hashes())
    output: Callable[[Config], str]  # an output that exists only once the stage has finished
    help: str


STAGES: tuple[Stage, ...] = (
    Stage("prepare", run_prepare, ("data", "preprocess"), artifacts.prepare_summary,
          "read, partition, clean and split texts -> prepared/{train,test}.parquet"),
    Stage("refine", run_refine, ("refine",), artifacts.refine_summary,
          "rewrite training captions per platform (rules / transformers / vLLM) -> refined/"),
    Stage("train", run_train, ("model", "train", "seed"), lambda cfg: artifacts.model_manifest(cfg, artifacts.MOE),
          "stage 0 (unified, aligned), three experts (stage 1, mining, stage 2), gate -> models/"),
    Stage("index", run_index, ("index",), artifacts.index_latest,
          "embed the gallery with the experts and build the faiss index -> index/"),
    Stage("eval", run_eval, ("eval",), artifacts.metrics,
          "recall@K of the ladder variants and routing diagnostics, per platform and under corruptions -> eval/"),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def hashes(cfg: Config) -> dict[str, str]:
    """Cumulative: a stage's hash covers its sections and every upstream stage's."""
    out: dict[str, str] = {}
    sections: list[str] = []
    for stage in STAGES:
        sections += stage.sections
        out[stage.name] = config_hash(cfg, sections)
    return out
