"""Connecting to Ray: the cluster we run in (a job), an explicit address, or a local instance."""

from __future__ import annotations

import os

from geoloc_ray import io
from geoloc_ray.config import Config


def use_storage(cfg: Config) -> None:
    """Register the config's fsspec options (an S3 endpoint, credentials) for every URI this process touches."""
    io.use_storage_options(cfg.data.storage_options)


def connect(cfg: Config) -> None:
    """What every stage does first: storage options, then join (or start) Ray. Idempotent, so a stage called by
    the pipeline, the CLI or a test behaves the same."""
    use_storage(cfg)
    init_ray(cfg)


def in_ray_job() -> bool:
    """True in the driver of a `ray job submit` (the job supervisor sets this variable)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def init_ray(cfg: Config | None = None, **overrides) -> None:
    """Idempotent `ray.init`. Inside `ray job submit` the job's cluster is found automatically."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rc = cfg.ray if cfg is not None else None
    address = overrides.pop("address", None) or (rc.address if rc else None) or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": True}
    if address or in_ray_job():
        # A submitted job (or a given cluster) owns its runtime env: adding env vars here would fail to merge
        # with the job's. Storage options still reach workers: stages pass them explicitly.
        kwargs["address"] = address
    else:
        kwargs["runtime_env"] = _runtime_env()
        kwargs["num_cpus"] = rc.num_cpus if rc and rc.num_cpus else None
        kwargs["include_dashboard"] = rc.include_dashboard if rc else False
        if rc and rc.object_store_memory:
            kwargs["object_store_memory"] = rc.object_store_memory
    kwargs.update(overrides)
    context = ray.init(**{k: v for k, v in kwargs.items() if v is not None})
    if getattr(context, "dashboard_url", None):
        from geoloc_ray.console import announce

        announce(f"Ray dashboard: http://{context.dashboard_url}")
    _quiet_data_context()


def _runtime_env() -> dict:
    """Env vars every worker of this job needs: storage options (s3 endpoint...) and offline model hub."""
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "RAY_USAGE_STATS_ENABLED": "0"}
    if os.environ.get(io.STORAGE_ENV):
        env[io.STORAGE_ENV] = os.environ[io.STORAGE_ENV]
    return {"env_vars": env}


def _quiet_data_context() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    from geoloc_ray.console import QUIET_ENV

    # A quiet CLI run has its own progress line; Ray Data's bars would only fill the log file with redraws.
    ctx.enable_progress_bars = not os.environ.get(QUIET_ENV)
    # One summary bar per dataset, not one line per operator on every update.
    ctx.execution_options.verbose_progress = False
