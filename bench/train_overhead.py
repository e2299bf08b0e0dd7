"""Ray Train overhead: steady-state steps/s of the project's `train_loop_per_worker` under `TorchTrainer` (1 worker)
vs a plain in-process PyTorch loop running the same step code on the same model and data; plus the fixed cost
(start-up, teardown) of a fit and the per-epoch checkpoint/report cost.

    python bench/train_overhead.py                    # stage-0 job, 1200 pairs, batch 64, 8 epochs
    python bench/train_overhead.py --job expert       # an expert head on the frozen trunk instead
    python bench/train_overhead.py --quick            # 32 pairs, 3 epochs: checks the script, measures nothing

Both sides: `loop._init_model` + `make_optimizer` + `steps.setup_context(...)`, and the train loop's own `run_epoch`
(the step sequence), at the same torch thread count. Ray Train: `fit.make_trainer` (what the train stage runs) on a
materialized Ray Dataset, with a controller callback that logs each `ray.train.report` (metrics + wall time).
Plain: the rows in memory behind a tiny `iter_batches` (shuffled per epoch, same batch size). Steady state =
epochs 2..N: in-loop steps/s from the reported `steps` / `epoch_s`; wall steps/s from the time between reports
(that adds the per-epoch checkpoint + report). The plain loop runs before and after the fit to show drift.
Synthetic data: random-ish images around a colour per location, texts of 2-3 statements, like the tests'.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Row, finish, local_ray, parse, parser, ray_worker_openmp_env, table, timed  # noqa: E402

NAME = "train_overhead"
PLATFORMS = ["satellite", "drone", "ground"]


def synthetic_pairs(locations: int, per_location: int, size: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows like the pairs dataset's: pixels at the tower size (no decoding in the loop), texts, ids, platform."""
    rng = np.random.default_rng(seed)
    rows = []
    for loc in range(locations):
        colour = rng.integers(0, 255, 3)
        for j in range(per_location):
            pixels = np.clip(colour + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            rows.append({
                "image_id": f"{loc:04d}/image-{j:02d}.jpeg", "location_id": f"{loc:04d}",
                "platform": PLATFORMS[j % 3],
                "texts": [f"aerial view: a building with colour code {colour.tolist()}", f"place number {loc}",
                          f"it stands next to object {int(rng.integers(20))}"][: 2 + j % 2],
                "pixels": pixels,
            })
    return rows


class NumpyShard:
    """The part of Ray Data's DataIterator the train steps use (`iter_batches`), over rows held in memory."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.n = len(rows)
        self.columns: dict[str, np.ndarray] = {}
        for key in rows[0]:
            if key == "pixels":
                self.columns[key] = np.stack([r[key] for r in rows])
            else:
                column = np.empty(self.n, dtype=object)
                column[:] = [r[key] for r in rows]
                self.columns[key] = column

    def iter_batches(self, *, batch_size: int, batch_format: str = "numpy", local_shuffle_buffer_size=None,
                     local_shuffle_seed=None, **_: Any):
        order = (np.random.default_rng(local_shuffle_seed).permutation(self.n) if local_shuffle_buffer_size
                 else np.arange(self.n))
        for start in range(0, self.n, batch_size):
            rows = order[start : start + batch_size]
            yield {k: v[rows] for k, v in self.columns.items()}


def plain_fit(cfg, job, shard: NumpyShard) -> list[dict[str, Any]]:
    """`train_loop_per_worker` without Ray: same init, optimizer, step context and step sequence; per-epoch timings."""
    import torch

    from geoloc_ray.train.loop import _init_model, make_optimizer, run_epoch, setup_context

    torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(job.seed)
    rng = np.random.default_rng(job.seed)
    model = _init_model(cfg, job)
    optimizer, scheduler = make_optimizer(model, job, cfg)
    device = torch.device("cpu")
    ctx = setup_context(model, job, cfg, rng, device, shard)
    epochs = []
    for epoch in range(job.epochs):
        t0 = time.perf_counter()
        model.train()
        n_steps, totals = run_epoch(ctx, epoch, optimizer, scheduler)
        epochs.append({"epoch": epoch, "steps": n_steps, "epoch_s": time.perf_counter() - t0,
                       "loss": totals["loss"] / n_steps})
    return epochs


def _report_logger(path: str):
    """A Ray Train controller callback appending each report's rank-0 metrics and wall time to a JSON-lines file."""
    from ray.train import UserCallback

    class ReportLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            with open(path, "a") as f:
                f.write(json.dumps({"t": time.time(), "checkpoint": checkpoint is not None,
                                    **{k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str))}})
                        + "\n")

    return ReportLog()


def ray_fit(cfg, job, rows: list[dict[str, Any]], tmp: str) -> dict[str, Any]:
    """One `make_trainer(...).fit()` (1 worker, the CPUs `worker_resources` gives it); reports with wall times."""
    import ray.data

    from geoloc_ray.train.fit import make_trainer, worker_resources

    dataset = ray.data.from_items(rows).materialize()
    log = str(Path(tmp) / "reports.jsonl")
    cpus = worker_resources(cfg, 1)["CPU"]
    trainer = make_trainer(cfg, job, dataset, num_workers=1, cpus=cpus, run_name=f"bench-{job.name}")
    trainer.run_config.callbacks.append(_report_logger(log))
    start = time.time()
    result, fit_s = timed(trainer.fit)
    if result.error is not None:
        raise RuntimeError(f"the fit failed: {result.error}")
    reports = [json.loads(line) for line in Path(log).read_text().splitlines()]
    return {"cpus": cpus, "fit_s": fit_s, "start": start, "end": start + fit_s, "reports": reports}


def steady(epochs: list[dict[str, Any]], skip: int = 1) -> dict[str, float]:
    """steps/s over epochs after the first `skip` (warm-up: lazy init, the statement-feature cache)."""
    rest = epochs[skip:] or epochs
    steps_, seconds = sum(e["steps"] for e in rest), sum(e["epoch_s"] for e in rest)
    return {"steps": steps_, "seconds": seconds, "steps_per_s": steps_ / seconds,
            "first_epoch_s": epochs[0]["epoch_s"], "median_epoch_s": statistics.median(e["epoch_s"] for e in rest)}


def ray_costs(fit: dict[str, Any]) -> dict[str, float]:
    """Start-up (fit() until the first epoch began), per-epoch report overhead, wall steps/s, teardown."""
    reports = fit["reports"]
    times = [r["t"] for r in reports]
    startup = times[0] - reports[0]["epoch_s"] - fit["start"]  # the report itself (a checkpoint) is counted in it
    gaps = [b - a for a, b in zip(times[1:-1], times[2:], strict=True)] or [times[-1] - times[0]]
    epoch_s = [r["epoch_s"] for r in reports[2:]] or [reports[-1]["epoch_s"]]
    steps_ = [r["steps"] for r in reports[2:]] or [reports[-1]["steps"]]
    return {"startup_s": startup, "teardown_s": fit["end"] - times[-1], "fit_s": fit["fit_s"],
            "wall_steps_per_s": sum(steps_) / sum(gaps),
            "report_overhead_per_epoch_s": statistics.median(g - e for g, e in zip(gaps, epoch_s, strict=True))}


def make_job(cfg, kind: str, epochs: int, steps_per_epoch: int):
    from geoloc_ray.train.worker_types import JobSpec

    t = cfg.train
    if kind == "stage0":  # the demo's longest job: image trunk from scratch, pretrained text layers locked
        return JobSpec(name="stage0", kind="pairs", head="unified", image_trunk=cfg.model.train_image_trunk_in_stage0,
                       text_layers=t.stage0.train_text_layers, epochs=epochs, lr=t.stage0.lr,
                       steps_per_epoch=steps_per_epoch)
    return JobSpec(name="expert", kind="pairs", head="unified", text_layers=t.stage1.train_text_layers,
                   epochs=epochs, lr=t.stage1.lr, steps_per_epoch=steps_per_epoch)


def rows_for(plain: dict[str, float], in_loop: dict[str, float], costs: dict[str, float], args) -> list[Row]:
    r_loop = in_loop["steps_per_s"] / plain["steps_per_s"]
    r_wall = costs["wall_steps_per_s"] / plain["steps_per_s"]
    what = f"{args.job} job, batch {args.batch}, {args.threads} threads, 1 worker"
    return [
        Row(f"Ray Train vs plain PyTorch loop, steady steps/s ({what})", ">= 0.9x",
            f"{r_loop:.2f}x ({in_loop['steps_per_s']:.2f} vs {plain['steps_per_s']:.2f} steps/s)", r_loop >= 0.9),
        Row("  same, wall clock between reports (adds a report every epoch, checkpoints as configured)", "report",
            f"{r_wall:.2f}x ({costs['report_overhead_per_epoch_s']:.2f} s/epoch for the report)", None),
        Row("Ray Train fixed cost of a fit (start-up until epoch 1; teardown)", "report",
            f"{costs['startup_s']:.1f} s start-up, {costs['teardown_s']:.1f} s teardown", None),
    ]


def main(argv: list[str] | None = None) -> dict:
    from geoloc_ray.config import load_config

    p = parser(__doc__)
    p.add_argument("--job", choices=["stage0", "expert"], default="stage0")
    p.add_argument("--locations", type=int, default=120)
    p.add_argument("--per-location", type=int, default=10, help="images per location (rows = locations x this)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=8, help="epochs per run; steady state = epochs 2..N")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    args = parse(p, argv, {"locations": 8, "per_location": 4, "batch": 8, "epochs": 3})
    ray_worker_openmp_env(args.omp_passive)  # before torch / faiss load OpenMP
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        # a report every epoch (the wall-clock row times the gaps between them); checkpoints as configured
        cfg = load_config(overrides=[f"artifacts={tmp}/art", f"train.batch_size={args.batch}",
                                     f"train.torch_threads={args.threads}", "train.report_every_steps=1"])
        rows = synthetic_pairs(args.locations, args.per_location, cfg.model.image.image_size or 64)
        job = make_job(cfg, args.job, args.epochs, -(-len(rows) // args.batch))
        shard = NumpyShard(rows)
        plain_before = plain_fit(cfg, job, shard)
        with local_ray():
            fit = ray_fit(cfg, job, rows, tmp)
        plain_after = plain_fit(cfg, job, shard)
    plain = steady(plain_before + plain_after[1:], skip=1)  # both plain runs' steady epochs
    in_loop, costs = steady(fit["reports"], skip=1), ray_costs(fit)
    print(table([{"side": "plain (before)", **steady(plain_before)}, {"side": "plain (after)", **steady(plain_after)},
                 {"side": "ray train", **in_loop}]), flush=True)
    results = {"rows": len(rows), "job": job.to_dict(), "plain_before": plain_before, "plain_after": plain_after,
               "plain_steady": plain, "ray_steady": in_loop, "ray_costs": costs, "ray_cpus": fit["cpus"],
               "ray_reports": fit["reports"], "ratio_in_loop": in_loop["steps_per_s"] / plain["steps_per_s"],
               "ratio_wall": costs["wall_steps_per_s"] / plain["steps_per_s"]}
    finish(NAME, args, started, results, rows_for(plain, in_loop, costs, args))
    return results


if __name__ == "__main__":
    main()
