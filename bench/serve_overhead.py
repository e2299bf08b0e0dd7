"""What the Serve graph costs: HTTP p50 through it vs in-process encode + search for the same queries.

    python bench/serve_overhead.py [--artifacts RUN] [--requests 200]
One client, one request at a time (latency, not throughput). In-process = load_model + GalleryIndex of the same
build: fused_query (trunk, gate, 3 heads) + faiss search over every shard + merge.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def in_process_ms(artifacts: str, queries: list[str], k: int) -> list[float]:
    import torch

    from geoloc_ray import artifacts as layout
    from geoloc_ray.index.store import GalleryIndex
    from geoloc_ray.model import load_model
    from geoloc_ray.preprocess.text import clean_query

    torch.set_num_threads(1)  # as each replica runs
    model = load_model(layout.model_dir(artifacts, layout.MOE)).eval()
    index = GalleryIndex.latest(layout.index_dir(artifacts))
    out = []
    for query in queries:
        start = time.perf_counter()
        with torch.inference_mode():
            q = model.fused_query([clean_query(query)], weights="gate").numpy()
        index.search(q, k)
        out.append((time.perf_counter() - start) * 1000)
    return out


def http_ms(url: str, queries: list[str], k: int) -> list[float]:
    import requests

    session, out = requests.Session(), []
    for query in queries:
        start = time.perf_counter()
        r = session.post(url + "/search", json={"query": query, "k": k}, timeout=60)
        r.raise_for_status()
        out.append((time.perf_counter() - start) * 1000)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", help="a trained run (default: a tiny random run in a temp dir)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--port", type=int, default=8125)
    p.add_argument("--batch-wait-timeout-s", type=float, default=None,
                   help="the app's batch_wait_timeout_s (default: the app's own, 0.01); 0 shows the graph's hops alone")
    a = p.parse_args(argv)
    from bench.loadgen import QUERIES, app_args, percentile, run_to_serve, start_app, stop_app

    queries = [QUERIES[i % len(QUERIES)] for i in range(a.requests)]
    warmup = [QUERIES[i % len(QUERIES)] for i in range(20)]
    with run_to_serve(a.artifacts) as run:
        args = app_args(run, a.batch_wait_timeout_s)
        local = in_process_ms(run, warmup + queries, a.k)[len(warmup):]
        url = start_app(args, a.port)
        try:
            http_ms(url, warmup, a.k)
            remote = http_ms(url, queries, a.k)
        finally:
            stop_app()
    result = {"requests": a.requests, "batch_wait_timeout_s": a.batch_wait_timeout_s, "http_p50_ms": round(percentile(remote, 50), 2),
              "http_p99_ms": round(percentile(remote, 99), 2),
              "in_process_p50_ms": round(percentile(local, 50), 2),
              "in_process_p99_ms": round(percentile(local, 99), 2)}
    result["overhead_ratio_p50"] = round(result["http_p50_ms"] / result["in_process_p50_ms"], 2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
