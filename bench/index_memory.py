"""Driver memory of the index build vs gallery size: the stage's own streaming code over synthetic embeddings.

Each size runs in a fresh driver process (ru_maxrss is a high-water mark): Ray Data generates precomputed
unit vectors + gallery metadata, `index.build.write_embeddings` streams them to the build folder and
`index.build.build_from_embeddings` trains on a sample and builds the shards in Ray tasks, exactly as
`geoloc-ray index` does after its embedding actors. The driver's peak RSS should not follow the gallery.

    python bench/index_memory.py                       # sizes 25000,100000 x 768-d, 4 IVF shards
    python bench/index_memory.py --sizes 5000,20000    # quicker
Writes bench/out/index_memory.json: {"sizes": [...], "driver_peak_mib": [...], ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PLATFORMS = ["satellite", "drone", "ground"]


def synthetic_rows(batch: dict, dim: int) -> dict:
    """Gallery metadata + a unit vector per row id (seeded by the ids: the same rows on every run)."""
    import numpy as np

    ids = batch["id"]
    rng = np.random.default_rng(int(ids[0]) if len(ids) else 0)
    vectors = rng.standard_normal((len(ids), dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return {"image_id": np.array([f"img-{i:08d}" for i in ids]), "location_id": np.array([f"loc-{i // 10}" for i in ids]),
            "platform": np.array([PLATFORMS[i % 3] for i in ids]), "lat": ids / 1e6, "lon": -ids / 1e6,
            "image_uri": np.array([f"synthetic://{i}" for i in ids]), "embedding": vectors}


def child(size: int, dim: int, shards: int, kind: str, folder: str) -> dict:
    """One build in this (fresh) driver process; returns its peak RSS and timings."""
    import ray

    from geoloc_ray.config import IndexConfig
    from geoloc_ray.index.build import build_from_embeddings, write_embeddings

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=768 * 2**20, log_to_driver=False)
    ic = IndexConfig(kind=kind, shards=shards, train_sample=20_000, build_num_cpus=0.5)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    ds = ray.data.range(size, override_num_blocks=max(4, size // 5000)).map_batches(
        synthetic_rows, fn_kwargs={"dim": dim}, batch_format="numpy", num_cpus=0.25)
    build_uri = str(Path(folder) / f"build-{size}")
    write_embeddings(ds, build_uri)
    manifest = build_from_embeddings(ic, f"build-{size}", build_uri, PLATFORMS,
                                     {"model_version": "synthetic", "platforms": PLATFORMS}, "synthetic://model")
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {"size": size, "n": manifest["n"], "factory": manifest["spec"]["factory"], "seconds": round(seconds, 1),
            "driver_baseline_mib": round(baseline, 1),
            "driver_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "gallery_vectors_mib": round(size * dim * 4 / 2**20, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="25000,100000")
    p.add_argument("--dim", type=int, default=768)  # 3 experts x 256 (the demo's fused vector)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--kind", default="ivf", choices=["flat", "ivf", "ivfpq"])
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.child:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(child(args.child, args.dim, args.shards, args.kind, folder)))
        return {}
    runs = []
    for size in [int(s) for s in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(size), "--dim", str(args.dim), "--shards", str(args.shards),
               "--kind", args.kind]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"size {size} failed:\n{proc.stderr[-4000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(runs[-1])
    ratio = round(runs[-1]["driver_peak_mib"] / runs[0]["driver_peak_mib"], 3)
    row = {"row": f"Index build, driver peak RSS at {runs[0]['size']} vs {runs[-1]['size']} vectors ({args.kind})",
           "target": "<= 1.3x", "measured": f"{runs[0]['driver_peak_mib']} vs {runs[-1]['driver_peak_mib']} MiB = "
           f"{ratio}x", "met": ratio <= 1.3}
    result = {"sizes": [r["size"] for r in runs], "driver_peak_mib": [r["driver_peak_mib"] for r in runs],
              "ratio_largest_to_smallest": ratio, "rows": [row],
              "dim": args.dim, "shards": args.shards, "kind": args.kind, "runs": runs,
              "command": "python bench/index_memory.py " + " ".join(argv or sys.argv[1:])}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "index_memory.json").write_text(json.dumps(result, indent=2))
    print(f"driver peak {result['driver_peak_mib']} MiB at sizes {result['sizes']}: "
          f"ratio {result['ratio_largest_to_smallest']}")
    return result


if __name__ == "__main__":
    main()
