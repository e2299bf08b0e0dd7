"""The run layout: every path under a run's `artifacts` URI comes from here (DESIGN.md section 3).

Functions take the run's root (a `Config`, or the artifacts URI itself, as Serve's app args carry it), so the
CLI, the stages, Ray workers and Serve replicas all name the same files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from geoloc_ray import io

if TYPE_CHECKING:
    from geoloc_ray.config import Config

# Model names under models/ (the training recipe's outputs; `MOE` is what index, eval, submit and serve load).
STAGE0, UNIFIED, ALIGNED, GATE = "stage0", "unified", "aligned", "gate"
MOE, MOE_UNTUNED = "moe", "moe-untuned"
INDEX_LATEST = "LATEST.json"


class MissingArtifactError(FileNotFoundError):
    """A stage's input is not there: the message names the stage that makes it."""


def root(run: Config | str) -> str:
    return run if isinstance(run, str) else run.artifacts


def artifact(run: Config | str, *parts: str) -> str:
    return io.join(root(run), *parts)


def require(uri: str, stage: str) -> str:
    """The one guard for a missing upstream output; returns `uri` so it reads inline."""
    if not io.exists(uri):
        raise MissingArtifactError(f"{uri} not found: run `geoloc-ray {stage}` first")
    return uri


# prepare
def prepared(run: Config | str, split: str) -> str:
    return artifact(run, "prepared", f"{split}.parquet")


def prepare_summary(run: Config | str) -> str:
    return artifact(run, "prepared", "summary.json")


def prepare_skipped(run: Config | str) -> str:
    return artifact(run, "prepared", "skipped.jsonl")


# refine
def refined_train(run: Config | str) -> str:
    return artifact(run, "refined", "train.parquet")


def refine_cache(run: Config | str) -> str:
    return artifact(run, "refined", "cache")


def refine_summary(run: Config | str) -> str:
    return artifact(run, "refined", "summary.json")


# train
def model_dir(run: Config | str, name: str) -> str:
    return artifact(run, "models", name)


def model_manifest(run: Config | str, name: str) -> str:
    return io.join(model_dir(run, name), "manifest.json")


def expert_dir(run: Config | str, platform: str, stage: int) -> str:
    return model_dir(run, f"experts/{platform}-stage{stage}")


def mined(run: Config | str, platform: str) -> str:
    return artifact(run, "mined", f"{platform}.parquet")


def mined_manifest(run: Config | str) -> str:
    return artifact(run, "mined", "manifest.json")


def mined_part(run: Config | str, platform: str, block: int) -> str:
    """One mining task's rows: `mined/<platform>.parquet` is a parquet folder, one file per query block."""
    return io.join(mined(run, platform), f"part-{block:05d}.parquet")


def mined_work(run: Config | str) -> str:
    """Mining's working folder: the embeddings its tasks read (removed once mining is done)."""
    return artifact(run, "mined", "work")


def mined_gallery_embeddings(run: Config | str) -> str:
    """The training gallery under every expert: one vector column per platform (a parquet folder)."""
    return io.join(mined_work(run), "gallery")


def mined_query_embeddings(run: Config | str) -> str:
    """Each training statement under its platform's expert: an `embedding` column (a parquet folder)."""
    return io.join(mined_work(run), "queries")


def ray_train_storage(run: Config | str) -> str:
    return artifact(run, "ray_train")


# index
def index_dir(run: Config | str) -> str:
    return artifact(run, "index")


def index_latest(run: Config | str) -> str:
    return io.join(index_dir(run), INDEX_LATEST)


def index_build(run: Config | str, build_id: str) -> str:
    return io.join(index_dir(run), build_id)


def index_embeddings(build_uri: str) -> str:
    """The build's gallery embeddings as Ray Data wrote them (a parquet folder, one file per written block)."""
    return io.join(build_uri, "embeddings")


# eval
def eval_dir(run: Config | str) -> str:
    return artifact(run, "eval")


def metrics(run: Config | str) -> str:
    return io.join(eval_dir(run), "metrics.json")


def eval_work(run: Config | str) -> str:
    """Eval's working folder: the vectors its search tasks stream (removed once the metrics are written)."""
    return io.join(eval_dir(run), "work")


def eval_gallery_embeddings(run: Config | str) -> str:
    """The test gallery under every evaluated model, clean and corrupted: one vector column per model and view."""
    return io.join(eval_work(run), "gallery")


def eval_query_embeddings(run: Config | str) -> str:
    """Every test query under every evaluated model's text heads (and gates): a parquet folder."""
    return io.join(eval_work(run), "queries")


def per_query(run: Config | str) -> str:
    """Per-query location-level hits of every variant (what the multi-seed ladder resamples)."""
    return io.join(eval_dir(run), "per_query.parquet")


# ladder (several seeded runs side by side, beside the run's own folder: artifacts/demo -> artifacts/<name>)
def ladder_dir(run: Config | str, name: str) -> str:
    base = root(run).rstrip("/")
    parent = base.rsplit("/", 1)[0] if "/" in base.split("://", 1)[-1] else base  # a bucket root: inside it
    return io.join(parent, name)


def ladder_seed_run(ladder_uri: str, seed: int) -> str:
    return io.join(ladder_uri, f"seed-{seed}")


def ladder_json(ladder_uri: str) -> str:
    return io.join(ladder_uri, "ladder.json")


def ladder_markdown(ladder_uri: str) -> str:
    return io.join(ladder_uri, "ladder.md")


def ladder_plot(ladder_uri: str) -> str:
    return io.join(ladder_uri, "ladder.png")


# pipeline bookkeeping and logs
def pipeline_marker(run: Config | str, stage: str) -> str:
    return artifact(run, "pipeline", f"{stage}.json")


def pipeline_last_run(run: Config | str) -> str:
    return artifact(run, "pipeline", "last_run.json")


def logs_dir(run: Config | str) -> str:
    return artifact(run, "logs")
