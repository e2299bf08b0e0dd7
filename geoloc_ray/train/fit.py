"""Run TorchTrainer jobs, several at once (the three experts train in parallel), and export their models."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config
from geoloc_ray.train.data import DECODE_CPUS
from geoloc_ray.train.loop import train_loop_per_worker
from geoloc_ray.train.worker_types import JobSpec

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


CONFIG_KEYS = {"CPU": "train.cpus_per_worker", "GPU": "train.use_gpu"}


def unsatisfiable(request: dict[str, float], nodes: list[dict[str, float]], what: str = "node") -> str | None:
    """Why no one of `nodes` (resource dicts) could ever hold one worker, naming the config key; None if one can."""
    if any(all(node.get(k, 0.0) >= v for k, v in request.items()) for node in nodes):
        return None
    for key, value in request.items():
        most = max((node.get(key, 0.0) for node in nodes), default=0.0)
        if most < value:
            return (f"a train worker asks for {key}={value:g} ({CONFIG_KEYS.get(key, key)}), but the largest {what} "
                    f"has {key}={most:g}: it could never start")
    return f"a train worker asks for {request} ({', '.join(CONFIG_KEYS.values())}), which no single {what} has"


def _started_here() -> bool:
    """This driver started its own local instance (`ray.init()` without an address): no autoscaler behind it."""
    import ray._private.worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    return bool(node is not None and node.is_head())


def worker_resources(cfg: Config, concurrent_workers: int) -> dict[str, float]:
    """What each train worker asks of Ray: the config's request as written (an autoscaler brings nodes for it),
    checked against the node types that could ever hold it, so an impossible request fails now, not after a
    timeout. On a fixed instance with `train.fit_cpus_to_instance` (the local demo), the CPUs are shared out
    among the workers of the fits that run at once, as the instance has no more to give, less one decode task's
    CPUs: the images are decoded by Ray Data tasks while the batches stream to the workers (`data.DECODE_CPUS`)."""
    import ray

    request = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1.0} if cfg.train.use_gpu else {})}
    from geoloc_ray.cluster_types import node_types as autoscaler_node_types

    types = autoscaler_node_types()  # the autoscaler's types (KubeRay, or published from cluster.yaml)
    node_types, what = (list(types.values()) if types is not None else None), "node type"
    if node_types is None and (cfg.train.fit_cpus_to_instance or _started_here()):
        node_types, what = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")], "node"
        if cfg.train.fit_cpus_to_instance:
            total = sum(n.get("CPU", 0.0) for n in node_types)
            share = min(0.9 * total, total - DECODE_CPUS) / max(concurrent_workers, 1)
            request["CPU"] = max(0.1, min(request["CPU"], share))
    problem = unsatisfiable(request, node_types, what) if node_types is not None else None
    if problem:
        raise ValueError(problem)
    return request


def make_trainer(cfg: Config, job: JobSpec, dataset, num_workers: int, cpus: float, run_name: str):
    """One TorchTrainer: `num_workers` workers of `cpus` CPUs (and a GPU each with `train.use_gpu`), placed by
    `train.placement_strategy`, computing on the device `device` resolves to (gloo with `device: cpu`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from geoloc_ray.train.backend import torch_config

    resources = {"CPU": cpus, **({"GPU": 1} if cfg.train.use_gpu else {})}
    storage_path, storage_fs = _storage(cfg)
    # Ray Train moves each worker into its run folder, which breaks relative `artifacts` / `data.root` paths
    # (`make demo` uses them): keep the worker in the job's working directory, as Ray Data tasks are.
    # Read by `fit()` in this process; a user's explicit setting wins.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "job": job.to_dict(), "cpus": cpus},
        torch_config=torch_config(cfg.device, cfg.train.use_gpu),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.train.placement_strategy),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )


def _fit_and_export(cfg: Config, job: JobSpec, dataset, num_workers: int, cpus: float, run_name: str,
                    out_uri: str, extra: dict[str, Any]) -> FitResult:
    from geoloc_ray.model import save_model
    from geoloc_ray.train.loop import restore

    result = make_trainer(cfg, job, dataset, num_workers, cpus, run_name).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training job {job.name!r} reported no checkpoint (0 epochs?)")
    with result.checkpoint.as_directory() as d:
        model, state = restore(d, cfg)  # the job's starting model + the trained parts: the whole model
    training = state.get("training", {})  # world size, a node id per worker
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))}
    save_model(model, out_uri, cfg, extra={"job": job.to_dict(), "metrics": metrics, "run": run_name,
                                           "training": training, **extra})
    return FitResult(job.name, out_uri, metrics)


def fit_concurrently(cfg: Config, jobs: list[tuple[JobSpec, Any, str, str]], num_workers: int,
                     extra: dict[str, Any] | None = None) -> list[FitResult]:
    """Each (job, dataset, run_name, out_uri) gets its own TorchTrainer; all run at the same time."""
    import ray

    cpus = worker_resources(cfg, num_workers * len(jobs))["CPU"]
    if len(jobs) == 1:
        job, ds, run_name, out = jobs[0]
        return [_fit_and_export(cfg, job, ds, num_workers, cpus, run_name, out, extra or {})]
    remote = ray.remote(num_cpus=0)(_fit_and_export)
    refs = [remote.remote(cfg, job, ds, num_workers, cpus, run_name, out, extra or {})
            for job, ds, run_name, out in jobs]
    return ray.get(refs)
