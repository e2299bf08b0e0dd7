"""Serve the rehearsal's S3 artifacts as production does: serve_config.yaml with the run's args, `serve deploy`
to the cluster, then one query over HTTP."""

from __future__ import annotations

import copy
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from geoloc_ray.rehearse.cluster import FakeCluster

QUERY = "drone view of a building with a red roof beside a lake"


def serve_config(template: dict[str, Any], args: dict[str, Any], port: int, shards: int) -> dict[str, Any]:
    """serve_config.yaml with the run's `args` (artifacts URI, storage options, the config's `serve:` knobs) and
    an IndexShard_<i> entry for every shard of the index (the hot-swap handle), as an operator writes it for
    production. All fake nodes share one address, so only the head runs an HTTP proxy (`EveryNode` would start
    one per node on the same port)."""
    config = copy.deepcopy(template)
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"] = {**app.get("args", {}), **args}
    others = [d for d in app.get("deployments", []) if not d["name"].startswith("IndexShard_")]
    pinned = [{"name": f"IndexShard_{i}", "user_config": {"index_build": args.get("index_build", "latest")}}
              for i in range(shards)]
    app["deployments"] = others + pinned
    return config


def deploy(cluster: FakeCluster, config: dict[str, Any], folder: Path) -> Path:
    path = folder / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    deployed = cluster.ray("serve", "deploy", str(path), "--address", cluster.address)
    if deployed.returncode != 0:
        raise RuntimeError(f"serve deploy failed:\n{deployed.stdout}\n{deployed.stderr}")
    return path


def _request(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_until_healthy(port: int, timeout_s: float) -> dict[str, Any]:
    """Poll GET /healthz until every component answers (`status: ok`; `degraded` is a 200 too): replicas start
    on nodes the autoscaler brings."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = _request(f"http://127.0.0.1:{port}/healthz", timeout=10)
            if status == 200 and isinstance(body, dict) and body.get("status") == "ok":
                return body
            last = f"{status} {body}"
        except (OSError, ValueError) as exc:
            last = repr(exc)
        time.sleep(3)
    raise TimeoutError(f"the Serve app was not healthy after {timeout_s:.0f}s: {last}")


def search(port: int, query: str = QUERY, k: int = 10, tries: int = 5) -> tuple[int, dict[str, Any], int]:
    """POST /search; a 503 (an expert or shard slower than its timeout on a cold replica) is asked again a few
    times, as a client would. Returns (status, body, tries used)."""
    used = 0
    while used < tries:
        used += 1
        status, body = _request(f"http://127.0.0.1:{port}/search", {"query": query, "k": k})
        if status != 503:
            break
        time.sleep(5)
    return status, body, used


def shutdown(cluster: FakeCluster) -> None:
    cluster.ray("serve", "shutdown", "--address", cluster.address, "--yes", timeout=120)
