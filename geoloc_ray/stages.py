"""The stage registry: the pipeline's stages in order, each naming its `run(cfg) -> summary` function.

The CLI, `pipeline` and `jobs/` all read this one table; a stage is up to date when its output exists and its
config hash (its own sections plus every upstream stage's) matches the one recorded when it last finished.
Each stage's function is named as `module:function` and imported on first call, so building the CLI (or
`--help`) imports no stage code and none of its heavy dependencies (torch, Ray Data, faiss).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from geoloc_ray import artifacts
from geoloc_ray.config import Config, config_hash


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "package.module:function", a `run(cfg) -> summary` imported when the stage runs
    sections: tuple[str, ...]  # config sections this stage reads (upstream sections are added by hashes())
    output: Callable[[Config], str]  # an output that exists only once the stage has finished
    help: str

    def run(self, cfg: Config) -> Any:
        """Import the stage's module now (not at registry import) and run it."""
        module, _, func = self.target.partition(":")
        fn: Callable[[Config], Any] = getattr(importlib.import_module(module), func)
        return fn(cfg)


STAGES: tuple[Stage, ...] = (
    Stage("prepare", "geoloc_ray.preprocess.prepare:run_prepare", ("data", "preprocess"), artifacts.prepare_summary,
          "read, partition, clean and split texts -> prepared/{train,test}.parquet"),
    Stage("refine", "geoloc_ray.captions.stage:run_refine", ("refine",), artifacts.refine_summary,
          "rewrite training captions per platform (rules / transformers / vLLM) -> refined/"),
    Stage("train", "geoloc_ray.train.run:run_train", ("model", "train", "seed"),
          lambda cfg: artifacts.model_manifest(cfg, artifacts.MOE),
          "stage 0 (unified, aligned), three experts (stage 1, mining, stage 2), gate -> models/"),
    Stage("index", "geoloc_ray.index.build:run_index", ("index",), artifacts.index_latest,
          "embed the gallery with the experts and build the faiss index -> index/"),
    Stage("eval", "geoloc_ray.eval.evaluate:run_eval", ("eval",), artifacts.metrics,
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
