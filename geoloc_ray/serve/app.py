"""The application graph, composed in one builder: `serve run serve_config.yaml` calls `build_app(args)`.

    SearchIngress (FastAPI) -> QueryEncoder (trunk + gate, batched)
                            -> ExpertHead_<platform> x 3, in parallel (each its own head only)
                            -> IndexShard_<i> x shards, in parallel (each one faiss shard of the build)
"""

# No `from __future__ import annotations` here: Serve reads build_app's annotation as a class to validate
# serve_config.yaml `args` into AppArgs (a string annotation would hand build_app the raw dict).
import logging
import signal
import time
from typing import Any

from ray import serve
from ray.serve import Application

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config
from geoloc_ray.serve.encoder import QueryEncoder
from geoloc_ray.serve.experts import ExpertHead
from geoloc_ray.serve.ingress import SearchIngress
from geoloc_ray.serve.settings import APP_NAME, AppArgs, expert_deployment, shard_deployment
from geoloc_ray.serve.shards import IndexShard, resolve_build

log = logging.getLogger(__name__)


def _manifests(a: AppArgs) -> tuple[dict, dict]:
    """The model's and the index build's manifests (plain JSON reads: no torch in the build task)."""
    from geoloc_ray.index.store import check_build, read_manifest

    model_manifest = io.read_json(artifacts.require(artifacts.model_manifest(a.run_uri(), a.model_name()), "train"))
    index_manifest = read_manifest(resolve_build(a.run_uri(), a.index_build))
    check_build(index_manifest, model_manifest)  # version and expert order: refuse before any replica starts
    return model_manifest, index_manifest


def build_app(args: AppArgs) -> Application:
    """Read the manifests of the run in `args` and bind the deployments into one application."""
    io.use_storage_options(args.storage_options)
    model_manifest, index_manifest = _manifests(args)
    run, model_uri, storage, build = args.run_uri(), args.model_uri(), args.storage_options, index_manifest["build"]
    torch_opts = (args.device, args.torch_threads, args.max_batch_size, args.batch_wait_timeout_s)
    common = {"max_ongoing_requests": args.max_ongoing_requests}
    model_opts = {"ray_actor_options": args.actor_options(gpu=True), **common}
    cpu_opts = {"ray_actor_options": args.actor_options(gpu=False), **common}
    n = args.replicas

    encoder = QueryEncoder.options(name="QueryEncoder", num_replicas=n.encoder, **model_opts).bind(
        model_uri, storage, *torch_opts)
    experts = {
        p: ExpertHead.options(name=expert_deployment(p), num_replicas=n.expert, user_config={"fail": False},
                              **model_opts).bind(p, model_uri, storage, *torch_opts)
        for p in model_manifest["platforms"]
    }
    num_shards = len(index_manifest["shards"])
    shards = [
        IndexShard.options(name=shard_deployment(i), num_replicas=n.shard, user_config={"index_build": build},
                           **cpu_opts).bind(i, num_shards, run, model_uri, storage, build, args.thumbnail_px)
        for i in range(num_shards)
    ]
    return SearchIngress.options(name="SearchIngress", num_replicas=n.ingress, **cpu_opts).bind(
        encoder, experts, shards, args)


def _stop_on_sigterm() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def serve_locally(cfg: Config, block: bool = True) -> dict[str, Any]:
    """`geoloc-ray serve`: start the app for a run's artifacts on this Ray (local or `ray.address`).

    With `block`, serve until Ctrl-C / SIGTERM, then shut Serve down. Without it, return once the app is up
    (a local Ray instance lives only as long as this process).
    """
    from geoloc_ray.runtime import connect

    connect(cfg)
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build_app(AppArgs.from_config(cfg)), name=APP_NAME, route_prefix=s.route_prefix)
    info = {"url": f"http://{s.host}:{s.port}{s.route_prefix}", "app": APP_NAME, "artifacts": cfg.artifacts}
    if not block:
        return info
    log.info("serving %s on %s (Ctrl-C to stop)", cfg.artifacts, info["url"])
    _stop_on_sigterm()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return info
