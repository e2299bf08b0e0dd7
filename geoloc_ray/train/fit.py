"""Run TorchTrainer jobs, several at once (the three experts train in parallel), and export their models."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config
from geoloc_ray.train.loop import JobSpec, train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    job: str
    model_uri: str
    metrics: dict[str, Any]


def _storage(cfg: Config) -> tuple[str, Any]:
    """Ray Train's storage path and filesystem. The config's storage options are installed first: concurrent
    fits build their trainer inside a Ray task, where a submitted job's driver options are not set, and an S3
    filesystem made there without the endpoint sends the controller to the public AWS host."""
    from geoloc_ray.runtime import use_storage

    use_storage(cfg)
    uri = artifacts.ray_train_storage(cfg)
    if io.is_local(uri):
        path = os.path.abspath(uri)
        os.makedirs(path, exist_ok=True)
        return path, None
    return io.strip_protocol(uri), io.arrow_filesystem(uri)


def worker_cpus(cfg: Config, concurrent_workers: int) -> float:
    """Fit concurrent trainers on the cluster: never ask for more CPUs than exist (they would never start)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.1, min(cfg.train.cpus_per_worker, 0.9 * total / max(concurrent_workers, 1)))


def make_trainer(cfg: Config, job: JobSpec, dataset, num_workers: int, cpus: float, run_name: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus, **({"GPU": 1} if cfg.train.use_gpu else {})}
    storage_path, storage_fs = _storage(cfg)
    # Ray Train moves each worker into its run folder, which breaks relative `artifacts` / `data.root` paths
    # (`make demo` uses them): keep the worker in the job's working directory, as Ray Data tasks are.
    # Read by `fit()` in this process; a user's explicit setting wins.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "job": job.to_dict(), "cpus": cpus},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )


def _fit_and_export(cfg: Config, job: JobSpec, dataset, num_workers: int, cpus: float, run_name: str,
                    out_uri: str, extra: dict[str, Any]) -> FitResult:
    from geoloc_ray.model import load_model, save_model

    result = make_trainer(cfg, job, dataset, num_workers, cpus, run_name).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training job {job.name!r} reported no checkpoint (0 epochs?)")
    with result.checkpoint.as_directory() as d:
        model = load_model(d)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))}
    save_model(model, out_uri, cfg, extra={"job": job.to_dict(), "metrics": metrics, "run": run_name, **extra})
    return FitResult(job.name, out_uri, metrics)


def fit_concurrently(cfg: Config, jobs: list[tuple[JobSpec, Any, str, str]], num_workers: int,
                     extra: dict[str, Any] | None = None) -> list[FitResult]:
    """Each (job, dataset, run_name, out_uri) gets its own TorchTrainer; all run at the same time."""
    import ray

    cpus = worker_cpus(cfg, num_workers * len(jobs))
    if len(jobs) == 1:
        job, ds, run_name, out = jobs[0]
        return [_fit_and_export(cfg, job, ds, num_workers, cpus, run_name, out, extra or {})]
    remote = ray.remote(num_cpus=0)(_fit_and_export)
    refs = [remote.remote(cfg, job, ds, num_workers, cpus, run_name, out, extra or {})
            for job, ds, run_name, out in jobs]
    return ray.get(refs)
