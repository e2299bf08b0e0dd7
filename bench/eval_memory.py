"""Driver memory of the eval stage vs gallery size: `geoloc-ray eval`'s own code on a synthetic world.

A world is synthesised and prepared once; each size's run folder gets the test split cut to that many gallery
images, with captions (queries) on the same images in every size, so only the gallery grows. Its models are
random-weight checkpoints of one stage 0 (models/{unified,aligned,moe,gate}: the same trunk, their own heads):
memory, not recall, is measured. Each size runs `run_eval` in a fresh driver process; a thread samples the
driver's RSS (psutil, every 10 ms) and tracemalloc counts its Python/numpy allocations. `driver_peak_mib` is the
peak RSS growth over the RSS just before `run_eval` (after `ray.init` and the imports `run_eval` needs).
`--path driver` runs the old driver eval instead (the gallery collected with `to_pandas`, queries encoded and
searched in the driver: `evaluate.embed_gallery` + `score_variant`, the in-process reference), for comparison.

    python bench/eval_memory.py                          # gallery 300 vs 1200 images, 40 queries
    python bench/eval_memory.py --path driver            # the old driver eval, same sizes
Writes bench/out/eval_memory.json (eval_memory_driver.json for --path driver):
{"sizes": [a, b], "driver_peak_mib": [x, y], ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = {"unified": (["unified"], False), "aligned": (["aligned"], False),
          "moe": (["satellite", "drone", "ground"], True), "gate": (["unified"], True)}


def _settings(root: Path, size: int, corruptions: list[str]) -> dict:
    return {"data": {"root": str(root / "world")}, "artifacts": str(root / f"run-{size}"),
            "index": {"actors": {"batch_size": 32, "num_cpus": 0.5}, "build_num_cpus": 0.5},
            "eval": {"corruptions": corruptions, "severities": [1], "plots": False}}


def prepare_world(root: Path, locations: int, seed: int) -> None:
    """Synthesise and prepare the world once (a cached folder is reused)."""
    from geoloc_ray.config import config_from_dict
    from geoloc_ray.corpus.synth.build import synth_world
    from geoloc_ray.preprocess.prepare import run_prepare
    from geoloc_ray.runtime import init_ray

    if (root / "prepared-ok").exists():
        return
    synth_world(str(root / "world"), locations=locations, seed=seed, test_fraction=0.9, drone_views=2,
                ground_views=1, image_size=64, progress=False)
    cfg = config_from_dict({"data": {"root": str(root / "world")}, "artifacts": str(root / "base")})
    init_ray(cfg, num_cpus=2, include_dashboard=False, log_to_driver=False)
    run_prepare(cfg)
    (root / "prepared-ok").write_text("ok")


def make_run(root: Path, size: int, queries: int, corruptions: list[str]) -> None:
    """The run folder of one size: the first `size` test images (by location, then image), captions kept on
    the first `queries` only, and the four checkpoints."""
    import numpy as np

    from geoloc_ray import artifacts, io
    from geoloc_ray.config import config_from_dict
    from geoloc_ray.model import build_model, save_model

    base = config_from_dict({"artifacts": str(root / "base")})
    test = io.read_parquet(artifacts.prepared(base, "test")).sort_values(["location_id", "image_id"])
    if len(test) < size:
        raise SystemExit(f"the world has {len(test)} test images, fewer than {size}: raise --locations")
    test = test.iloc[:size].reset_index(drop=True)
    test["texts"] = [list(t)[:1] if i < queries else [] for i, t in enumerate(test["texts"])]
    cfg = config_from_dict(_settings(root, size, corruptions))
    io.write_parquet(artifacts.prepared(cfg, "test"), test)
    for name, (heads, gate) in MODELS.items():
        save_model(build_model(cfg.model, heads=heads, gate=gate, seed=0).eval(), artifacts.model_dir(cfg, name))
    assert int(np.sum([len(t) > 0 for t in test["texts"]])) == queries


def old_driver_eval(cfg) -> None:
    """The eval before issue 21: gallery collected in the driver, queries encoded and searched there."""
    from geoloc_ray import artifacts
    from geoloc_ray.eval.evaluate import (
        _platform_gate_model,
        embed_gallery,
        encode_queries,
        gallery_heads,
        load_queries,
        score_variant,
        variants,
    )
    from geoloc_ray.eval.report import is_diagnostic
    from geoloc_ray.model import load_model

    chosen = variants(cfg)
    heads = gallery_heads(chosen)
    corruptions = [(k, s) for k in cfg.eval.corruptions for s in cfg.eval.severities]
    queries = load_queries(cfg)
    gallery = embed_gallery(cfg, {m: (artifacts.model_dir(cfg, m), h) for m, h in heads.items()}, corruptions)
    gate_model = _platform_gate_model(cfg, chosen)
    for name in heads:
        model = load_model(artifacts.model_dir(cfg, name)).eval()
        cache: dict = {}
        for v in [v for v in chosen if v.model == name]:
            qv = encode_queries(v, model, queries, cache, gate_model)
            score_variant(v, model, queries, gallery, heads[name], list(cfg.eval.ks),
                          [] if is_diagnostic(v.name) else corruptions, qv)


class RssSampler:
    """Peak RSS of this process, sampled every `interval_s` on a thread."""

    def __init__(self, interval_s: float = 0.01):
        import psutil

        self.process, self.interval_s, self.peak = psutil.Process(), interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def child(root: Path, size: int, corruptions: list[str], path: str) -> dict:
    """One eval in this (fresh) driver process; returns its RSS and tracemalloc peaks."""
    import tracemalloc

    import faiss  # noqa: F401  (imported before the baseline: the old path's driver uses them)
    import pandas  # noqa: F401
    import psutil
    import pyarrow.parquet  # noqa: F401
    import ray
    import torch  # noqa: F401

    from geoloc_ray import artifacts, io
    from geoloc_ray.config import config_from_dict
    from geoloc_ray.eval.evaluate import run_eval
    from geoloc_ray.runtime import init_ray

    cfg = config_from_dict(_settings(root, size, corruptions))
    init_ray(cfg, num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 2**20)
    io.read_parquet(artifacts.prepared(cfg, "test"))  # warm the parquet/fsspec path for both sides
    baseline = psutil.Process().memory_info().rss
    tracemalloc.start()
    start = time.perf_counter()
    with RssSampler() as rss:
        if path == "distributed":
            results = run_eval(cfg)
            meta = results["meta"]
        else:
            old_driver_eval(cfg)
            meta = {}
    seconds = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    ray.shutdown()
    mib = 2**20
    return {"size": size, "path": path, "seconds": round(seconds, 1), "gallery": meta.get("gallery"),
            "queries": meta.get("queries"), "driver_baseline_mib": round(baseline / mib, 1),
            "driver_peak_rss_mib": round(rss.peak / mib, 1),
            "driver_peak_mib": round((rss.peak - baseline) / mib, 1),
            "driver_traced_peak_mib": round(traced_peak / mib, 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="300,1200")
    p.add_argument("--queries", type=int, default=40)
    p.add_argument("--locations", type=int, default=380)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corruptions", default="noise", help="comma-separated eval.corruptions (severity 1)")
    p.add_argument("--path", default="distributed", choices=["distributed", "driver"])
    p.add_argument("--work", default=str(ROOT / "bench" / "out" / "eval_memory_work"))
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    root, corruptions = Path(args.work), [c for c in args.corruptions.split(",") if c]
    if args.child:
        print(json.dumps(child(root, args.child, corruptions, args.path)))
        return {}
    from bench.common import machine

    root.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    prep = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                           "from bench.eval_memory import prepare_world, make_run; from pathlib import Path; "
                           "r = Path(sys.argv[2]); prepare_world(r, int(sys.argv[3]), int(sys.argv[4])); "
                           "[make_run(r, int(s), int(sys.argv[5]), sys.argv[6].split(',')) for s in sys.argv[7:]]",
                           str(ROOT), str(root), str(args.locations), str(args.seed), str(args.queries),
                           args.corruptions, *map(str, sizes)], cwd=ROOT, capture_output=True, text=True)
    if prep.returncode:
        raise SystemExit(f"world preparation failed:\n{prep.stderr[-4000:]}")
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs = []
    for size in sizes:
        cmd = [sys.executable, __file__, "--child", str(size), "--work", str(root), "--corruptions",
               args.corruptions, "--path", args.path]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"size {size} failed:\n{proc.stderr[-4000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    peaks = [r["driver_peak_mib"] for r in runs]
    ratio = round(peaks[-1] / peaks[0], 3) if peaks[0] > 0 else None
    name = "eval_memory" if args.path == "distributed" else "eval_memory_driver"
    row = {"row": f"Eval ({args.path}), driver peak RSS growth at {sizes[0]} vs {sizes[-1]} gallery images",
           "target": "<= 1.3x", "measured": f"{peaks[0]} vs {peaks[-1]} MiB = {ratio}x",
           "met": None if ratio is None else ratio <= 1.3}
    result = {"sizes": sizes, "driver_peak_mib": peaks, "ratio_largest_to_smallest": ratio,
              "measure": "driver RSS growth over the RSS before run_eval, psutil sampled every 10 ms "
                         "(driver_traced_peak_mib: tracemalloc's peak of Python/numpy allocations)",
              "driver_traced_peak_mib": [r["driver_traced_peak_mib"] for r in runs], "queries": args.queries,
              "corruptions": corruptions, "path": args.path, "rows": [row], "runs": runs,
              "load_avg_before": load_before, "load_avg_after": [round(x, 2) for x in os.getloadavg()],
              "machine": machine(), "command": "python bench/eval_memory.py " + " ".join(argv or sys.argv[1:])}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(f"driver peak growth {peaks} MiB at sizes {sizes}: ratio {ratio}")
    return result


if __name__ == "__main__":
    main()
