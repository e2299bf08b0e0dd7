"""Throughput with `@serve.batch` (max_batch_size 16) vs without (max_batch_size 1) at 16 concurrent clients.

    python bench/serve_batching.py [--artifacts RUN] [--clients 16] [--duration 30]
Each setting is deployed in turn on a local Ray (the app is rebuilt), warmed up, then loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", help="a trained run to serve (default: a tiny random run in a temp dir)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per setting")
    p.add_argument("--batch", type=int, default=16, help="max_batch_size of the batched setting")
    p.add_argument("--port", type=int, default=8124)
    p.add_argument("--batch-wait-timeout-s", type=float, default=None,
                   help="the batched setting's batch_wait_timeout_s (default: the app's own)")
    a = p.parse_args(argv)
    from bench.loadgen import app_args, run_load, run_to_serve, start_app, stop_app

    results = {}
    with run_to_serve(a.artifacts) as run:
        base = app_args(run, a.batch_wait_timeout_s)
        try:
            for name, size in (("batched", a.batch), ("unbatched", 1)):
                url = start_app({**base, "max_batch_size": size}, a.port)
                run_load(url, clients=a.clients, duration_s=min(5.0, a.duration))  # warm-up
                results[name] = {"max_batch_size": size, **run_load(url, clients=a.clients, duration_s=a.duration)}
        finally:
            stop_app()
    unbatched = results["unbatched"]["throughput_rps"]
    results["throughput_ratio_batched_over_unbatched"] = (
        round(results["batched"]["throughput_rps"] / unbatched, 2) if unbatched else None)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
