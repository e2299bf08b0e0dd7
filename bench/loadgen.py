"""Closed-loop HTTP load against the search API and a local app starter, shared by the bench/serve_*.py scripts.

Loopback only and bounded in time: each client thread sends one request after another for `duration_s`.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.serve_fixtures for the tiny run

QUERIES = [
    "a tall building with a red roof next to a parking lot",
    "a white house with a garden and a swimming pool",
    "a river crossed by a stone bridge",
    "a football field surrounded by trees",
    "a church with a tower and a grey roof",
    "a long warehouse with a flat roof beside a road",
    "a small park with a pond in the middle",
    "a roundabout with four exits",
]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _client(url: str, queries: list[str], k: int, stop_at: float, out: dict[str, list], offset: int) -> None:
    import requests

    session = requests.Session()
    for query in itertools.islice(itertools.cycle(queries), offset, None):
        if time.time() >= stop_at:
            return
        start = time.perf_counter()
        try:
            r = session.post(url + "/search", json={"query": query, "k": k}, timeout=60)
            ok = r.status_code == 200
            degraded = ok and r.json().get("degraded", False)
        except Exception:  # noqa: BLE001 - a refused / reset connection is an error to count, not to raise
            ok, degraded = False, False
        out["latency_ms" if ok else "errors"].append((time.perf_counter() - start) * 1000)
        if degraded:
            out["degraded"].append(1.0)


def run_load(url: str, clients: int = 16, duration_s: float = 60.0, k: int = 10,
             queries: list[str] | None = None) -> dict[str, Any]:
    """`clients` threads for `duration_s`: p50 / p90 / p99 latency (ms), throughput (req/s), errors."""
    url = url.rstrip("/")
    out: dict[str, list] = {"latency_ms": [], "errors": [], "degraded": []}
    stop_at = time.time() + duration_s
    threads = [threading.Thread(target=_client, args=(url, queries or QUERIES, k, stop_at, out, i), daemon=True)
               for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + 120)
    elapsed = time.perf_counter() - start
    lat = out["latency_ms"]
    return {"clients": clients, "duration_s": round(elapsed, 2), "requests": len(lat), "errors": len(out["errors"]),
            "degraded": len(out["degraded"]), "throughput_rps": round(len(lat) / elapsed, 2),
            "p50_ms": _round(percentile(lat, 50)), "p90_ms": _round(percentile(lat, 90)),
            "p99_ms": _round(percentile(lat, 99))}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


@contextmanager
def run_to_serve(artifacts: str | None) -> Iterator[str]:
    """`artifacts`, or a tiny random-headed run (tests.serve_fixtures) in a temp dir while the block runs."""
    if artifacts is not None:
        yield artifacts
        return
    from tests.serve_fixtures import make_tiny_run

    with tempfile.TemporaryDirectory() as tmp:
        yield str(make_tiny_run(Path(tmp), shards=2).artifacts)


def app_args(artifacts: str, batch_wait_timeout_s: float | None = None, **extra: Any) -> dict[str, Any]:
    """serve_config.yaml-style `args` for `artifacts`; a None batching wait keeps the app's own default."""
    if batch_wait_timeout_s is not None:
        extra["batch_wait_timeout_s"] = batch_wait_timeout_s
    return {"artifacts": artifacts, **extra}


def start_app(args: dict[str, Any], port: int, num_cpus: int = 2) -> str:
    """A local Ray (if none) + Serve on 127.0.0.1:`port` running the app of `args`; returns the base URL."""
    import os

    import ray
    from ray import serve

    from geoloc_ray.serve.app import build_app
    from geoloc_ray.serve.settings import APP_NAME, AppArgs

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=512 * 2**20, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs.model_validate(args)), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def stop_app() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
