"""Object-store memory of stage 2's mined rows vs their count: ids streamed through the decode, or materialised.

A world from the project's generator (`corpus.synth.synth_world`, its images rendered at the production image
size) and mined parquets written as mining writes them (a query, its image, `per_query` hard negatives of other
locations, by URI). For each row count, in a fresh process with its own local Ray instance: stage 2's dataset
is built by the recipe's own `train.data.triplets_dataset` at `model.image.image_size` of the config (384 for
production) and fully iterated the way Ray Train's workers iterate it: `streaming_split(workers, equal=True)`
(what Ray Train's DataConfig does) and, per worker (a thread each, stepping in lockstep as `parallel.agreed` makes
the workers do), `shards.ShardEpochs(...).batches(epoch)` at
`train.stage2.batch_size` (or `--batch-size`) with a pause per step (`--step-s`: a GPU step; long enough, the
consumers and not the decode set the pace and Ray Data's backpressure decides what waits in the store). Each
worker's local shuffle buffer holds 4 batches of decoded rows (at production's 128: ~1.1 GB a worker), a fixed
cost per worker that the smaller run must exceed for the comparison to show the rest: hence `--batch-size 16`
on this small machine. A thread samples the object store's used bytes every `--interval-s` through the raylet's
memory stats (`ray._private.internal_api.get_memory_info_reply`, what `ray memory --stats-only` prints).
`--materialised-rows` also measures the behaviour before issue 21 (`materialize=True`: every decoded pixel in
the store before the fit) for the record.

    python bench/triplet_memory.py --rows 384,1536 --batch-size 16 --step-s 4 --object-store-mib 1024 \
        --materialised-rows 96,384                                        # the recorded run (~15 min here)
    python bench/triplet_memory.py --rows 32,128 --materialised-rows 0 --locations 3 --step-s 0.2   # quicker
Writes bench/out/triplet_memory.json: {"rows": [a, b], "object_store_peak_mib": [x, y], ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MIB = 2**20


class StoreSampler:
    """The object store's used bytes (all nodes), sampled in a thread: peak, and spilled bytes at the end."""

    def __init__(self, interval_s: float):
        import ray
        from ray._private.internal_api import get_state_from_address

        self.state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self.interval_s, self.peak, self.samples = interval_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def stats(self):
        from ray._private.internal_api import get_memory_info_reply

        return get_memory_info_reply(self.state).store_stats

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, int(self.stats().object_store_bytes_used))
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> StoreSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def consume(split, rank: int, batch_size: int, epochs: int, step_s: float, counts: list[int],
            barrier: threading.Barrier, done: list[bool], local_shuffle: bool) -> None:
    """One train worker's reading of its shard, step by step in lockstep with the others (`parallel.agreed`: every
    worker takes a step only while all still have a batch); no shard kept in memory (production's are larger)."""
    from geoloc_ray.train.shards import ShardEpochs

    epochs_of = ShardEpochs(split, batch_size, rank, keep_bytes=0, local_shuffle=local_shuffle)
    for epoch in range(epochs):
        batches = iter(epochs_of.batches(epoch))
        while True:
            batch = next(batches, None)
            done[rank] = batch is None
            barrier.wait()
            stop = any(done)
            barrier.wait()
            if stop:
                break
            counts.append(len(batch["query"]))
            time.sleep(step_s)


def child(args: argparse.Namespace) -> dict:
    """One row count in this fresh process: build the dataset, iterate it, report the store's peak."""
    import ray

    from geoloc_ray.config import load_config
    from geoloc_ray.train.data import Source, triplets_dataset

    cfg = load_config(args.config)
    size, batch_size = cfg.model.image.image_size, args.batch_size or cfg.train.stage2.batch_size
    os.environ.setdefault("RAY_agent_register_timeout_ms", "600000")  # the agents start slowly on a busy machine
    for attempt in range(4):  # a busy shared machine may miss a start-up deadline (raylet, agent): try again
        try:
            ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=args.object_store_mib * MIB,
                     log_to_driver=False)
            break
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception when its node does not come up
            ray.shutdown()
            if attempt == 3:
                raise
            time.sleep(30)
    try:
        with StoreSampler(args.interval_s) as sampler:
            baseline = int(sampler.stats().object_store_bytes_used)
            start = time.perf_counter()
            data = triplets_dataset(Source(args.child), size, materialize=args.materialise)
            built = time.perf_counter() - start
            counts: list[list[int]] = [[] for _ in range(args.workers)]
            splits = data.dataset.streaming_split(args.workers, equal=True)
            barrier, done = threading.Barrier(args.workers), [False] * args.workers
            threads = [threading.Thread(target=consume, args=(s, rank, batch_size, args.epochs, args.step_s, c,
                                                              barrier, done, not data.shuffled))
                       for rank, (s, c) in enumerate(zip(splits, counts, strict=True))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - start
        end = sampler.stats()
        return {"rows": data.rows, "materialised": args.materialise, "image_size": size, "batch_size": batch_size,
                "rows_read_per_worker": [sum(c) for c in counts], "build_s": round(built, 1),
                "seconds": round(seconds, 1), "samples": sampler.samples,
                "object_store_baseline_mib": round(baseline / MIB, 1),
                "object_store_peak_mib": round(sampler.peak / MIB, 1),
                "spilled_mib": round(end.spilled_bytes_total / MIB, 1),
                "ids_mib": round(data.ids.size_bytes() / MIB, 3) if data.ids is not None else None,
                "decoded_mib": round(data.rows * (1 + cfg.train.hard_negatives.per_query) * size * size * 3 / MIB, 1)}
    finally:
        ray.shutdown()


def mined_parquet(world: dict, rows: int, negatives: int, uri: str, seed: int = 0) -> None:
    """`rows` mined records over the world's training images: each a statement of its image as the query and
    `negatives` images of other locations (the columns `mining_tasks.block_rows` writes)."""
    import numpy as np
    import pandas as pd

    from geoloc_ray.corpus.records import PlatformRules, location_from_image_id, platform_from_path

    images = [(r["image_id"], os.path.join(world["root"], "images", r["image"]), location_from_image_id(r["image_id"]),
               r["sentences"]) for r in world["records"]]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(rows):
        image_id, image_uri, loc, sentences = images[i % len(images)]
        others = [j for j in rng.permutation(len(images)) if images[j][2] != loc][:negatives]
        out.append({"query": sentences[i // len(images) % len(sentences)], "image_id": image_id,
                    "image_uri": image_uri, "location_id": loc,
                    "platform": platform_from_path(image_id, PlatformRules()),
                    "neg_ids": [images[j][0] for j in others], "neg_uris": [images[j][1] for j in others],
                    "neg_location_ids": [images[j][2] for j in others]})
    pd.DataFrame(out).to_parquet(uri)


def run(args: argparse.Namespace, parquet: str, materialise: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", parquet, "--config", args.config, "--workers", str(args.workers),
           "--batch-size", str(args.batch_size),
           "--epochs", str(args.epochs), "--step-s", str(args.step_s), "--cpus", str(args.cpus),
           "--object-store-mib", str(args.object_store_mib), "--interval-s", str(args.interval_s)]
    proc = subprocess.run(cmd + (["--materialise"] if materialise else []), capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(f"{parquet} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(out, flush=True)
    return out


def summarise(runs: dict[str, list[dict]]) -> dict:
    """The JSON's summary of the measured runs. A run that spilled held more than its peak: what the store held
    then is the store's capacity plus the spilled bytes, so the goal counts only runs that did not spill."""
    streamed = runs["streamed"]
    peaks = [r["object_store_peak_mib"] for r in streamed]
    spilled = [r["spilled_mib"] for r in streamed]
    ratio = round(peaks[-1] / peaks[0], 3)
    met = ratio <= 1.3 and not any(spilled)
    rows_out = [{"row": f"Stage 2 object-store peak, {streamed[0]['rows']} vs {streamed[-1]['rows']} mined rows at "
                        f"{streamed[0]['image_size']} px (ids, decoded as they stream)",
                 "target": "<= 1.3x, nothing spilled",
                 "measured": f"{peaks[0]} vs {peaks[-1]} MiB = {ratio}x; spilled {spilled[0]} vs {spilled[-1]} MiB",
                 "met": met}]
    m = runs["materialised"]
    if len(m) >= 2:
        rows_out.append({"row": f"Stage 2 object-store peak materialised as before issue 21, {m[0]['rows']} vs "
                                f"{m[-1]['rows']} rows", "target": "report",
                         "measured": f"{m[0]['object_store_peak_mib']} vs {m[-1]['object_store_peak_mib']} MiB; "
                                     f"spilled {m[0]['spilled_mib']} vs {m[-1]['spilled_mib']} MiB", "met": None})
    return {"rows": [r["rows"] for r in streamed], "object_store_peak_mib": peaks, "spilled_mib": spilled,
            "ratio_largest_to_smallest": ratio, "met": met,
            "materialised": {"rows": [r["rows"] for r in m],
                             "object_store_peak_mib": [r["object_store_peak_mib"] for r in m],
                             "spilled_mib": [r["spilled_mib"] for r in m]},
            "summary_rows": rows_out, "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="384,1536", help="mined row counts, streamed (the first and last compared)")
    p.add_argument("--materialised-rows", default="96,384", help="row counts materialised as before (0: none)")
    p.add_argument("--config", default=str(ROOT / "configs" / "production.yaml"))
    p.add_argument("--locations", type=int, default=12, help="world size: 10 images a location")
    p.add_argument("--workers", type=int, default=2, help="train workers (streaming_split)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=0,
                   help="rows per step and worker (0: train.stage2.batch_size); each worker's local shuffle buffer "
                        "holds 4 batches, a fixed cost per worker that a small run must exceed to show the rest")
    p.add_argument("--step-s", type=float, default=4.0, help="pause per batch in each worker (its GPU step)")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--object-store-mib", type=int, default=1024)
    p.add_argument("--interval-s", type=float, default=0.05)
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--materialise", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.child:
        print(json.dumps(child(args)))
        return {}

    from geoloc_ray.config import load_config
    from geoloc_ray.corpus.synth.build import synth_world

    cfg = load_config(args.config)
    streamed_rows = [int(s) for s in args.rows.split(",")]
    materialised_rows = [int(s) for s in args.materialised_rows.split(",") if int(s)]
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        summary = synth_world(os.path.join(folder, "world"), args.locations, 0, image_size=cfg.model.image.image_size,
                              progress=False)
        world = {"root": os.path.join(folder, "world"), "records": json.loads(Path(summary["paths"]["train"]).read_text())}
        print(f"world: {summary['train_records']} training images at {cfg.model.image.image_size} px "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        runs: dict[str, list[dict]] = {"streamed": [], "materialised": []}
        for mode, counts in (("streamed", streamed_rows), ("materialised", materialised_rows)):
            for rows in counts:
                parquet = os.path.join(folder, f"mined-{rows}.parquet")
                if not os.path.exists(parquet):
                    mined_parquet(world, rows, cfg.train.hard_negatives.per_query, parquet)
                runs[mode].append(run(args, parquet, mode == "materialised"))
    result = summarise(runs)
    result |= {"world_images": summary["train_records"],
               "args": {k: v for k, v in vars(args).items() if k not in ("child", "materialise", "out")},
               "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
               "command": "python bench/triplet_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "triplet_memory.json").write_text(json.dumps(result, indent=2))
    print(f"object-store peak {result['object_store_peak_mib']} MiB (spilled {result['spilled_mib']}) at "
          f"{result['rows']} mined rows: ratio {result['ratio_largest_to_smallest']}; materialised "
          f"{result['materialised']}")
    return result


if __name__ == "__main__":
    main()
