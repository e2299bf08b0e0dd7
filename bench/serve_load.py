"""Load test of the search API: N concurrent clients for D seconds -> p50/p90/p99 latency, throughput, errors.

    python bench/serve_load.py --url http://127.0.0.1:8000          # a running app
    python bench/serve_load.py --artifacts artifacts/demo           # start one on a trained run
    python bench/serve_load.py                                      # start one on a tiny random run (tmp)
Loopback only; bounded by --duration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="base URL of a running app (else one is started here)")
    p.add_argument("--artifacts", help="a trained run to serve (default: a tiny random run in a temp dir)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--port", type=int, default=8123)
    a = p.parse_args(argv)
    from bench.loadgen import app_args, run_load, run_to_serve, start_app, stop_app

    def load(url: str) -> dict:
        run_load(url, clients=2, duration_s=min(5.0, a.duration))  # warm-up: lazy imports, first batches
        return run_load(url, clients=a.clients, duration_s=a.duration, k=a.k)

    if a.url:
        url, result = a.url, load(a.url)
    else:
        with run_to_serve(a.artifacts) as run:
            url = start_app(app_args(run), a.port)
            try:
                result = load(url)
            finally:
                stop_app()
    result["url"] = url
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
