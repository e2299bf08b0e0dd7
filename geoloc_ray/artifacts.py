"""Where each stage's outputs live under the run's artifacts URI (DESIGN.md section 3)."""

from __future__ import annotations

from geoloc_ray import io
from geoloc_ray.config import Config


def artifact(cfg: Config, *parts: str) -> str:
    return io.join(cfg.artifacts, *parts)


def prepared(cfg: Config, split: str) -> str:
    return artifact(cfg, "prepared", f"{split}.parquet")


def refined_train(cfg: Config) -> str:
    return artifact(cfg, "refined", "train.parquet")


def model_dir(cfg: Config, name: str) -> str:
    return artifact(cfg, "models", name)


def index_dir(cfg: Config) -> str:
    return artifact(cfg, "index")


def eval_dir(cfg: Config) -> str:
    return artifact(cfg, "eval")


def apply_storage_options(cfg: Config) -> None:
    """Register the config's fsspec options (e.g. an S3 endpoint) for every URI this process touches."""
    for proto, opts in cfg.data.storage_options.items():
        io.set_storage_options(proto, opts)
