"""What DDP and global negatives cost per training step, against the old per-parameter gradient sync, on 2 CPU
workers (gloo, spawned processes, no Ray): an expert job (the demo model's head: text tail + image tail +
projections trainable, trunk frozen) on the loop's own step (`parallel.agreed` + the kind's loss + backward +
AdamW step).

Modes, timed in rounds (old, none, ddp, ddp+global, ...) so drift hits all of them alike:
- `old`: the removed `loop.sync_gradients` (one blocking all-reduce per parameter after backward), local negatives;
- `none`: no gradient sync at all (each worker alone: the floor), local negatives;
- `ddp`: DDP over the trainable parts (bucketed all-reduce overlapping backward), local negatives;
- `ddp_global`: DDP + the contrastive loss over both workers' batches (all-gather with gradients).

    python bench/ddp_step.py                 # batch 32 per worker, 12 steps x 3 rounds per mode
    python bench/ddp_step.py --quick         # batch 4, 2 steps x 1 round: checks the script, measures nothing
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Row, finish, parse, parser, ray_worker_openmp_env, table  # noqa: E402
from bench.gpu_train import rows  # noqa: E402

NAME = "ddp_step"
MODES = ("old", "none", "ddp", "ddp_global")


def sync_gradients(params: list) -> None:
    """The loop's gradient sync before DDP: average each gradient over the workers, one parameter at a time."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _timed_steps(ctx, loss_of, optimizer, batch, steps: int, sync) -> float:
    """Seconds per step over `steps` steps on the same batch (each worker's own)."""
    import torch.distributed as dist

    from geoloc_ray.train.parallel import agreed

    dist.barrier()
    t0 = time.perf_counter()
    for b, sizes in agreed(iter([batch] * steps), lambda x: len(x["location_id"]), "cpu"):
        loss, _ = loss_of(dataclasses.replace(ctx, sizes=sizes), b)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sync:
            sync_gradients(ctx.model.trainable_parameters())
        optimizer.step()
    dist.barrier()
    return (time.perf_counter() - t0) / steps


def _worker(rank: int, init: str, init_file: str, args, out: str) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from geoloc_ray.config import load_config
    from geoloc_ray.train.kinds import kind_of
    from geoloc_ray.train.loop import _init_model, on_device
    from geoloc_ray.train.parallel import data_parallel
    from geoloc_ray.train.steps import make_context
    from geoloc_ray.train.worker_types import JobSpec

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cfg = load_config(overrides=[f"train.batch_size={args.batch}", "train.cache_shard_mb=0"])
    job = JobSpec(name="expert", kind="pairs", head="drone", init=init, init_head="satellite", lr=1e-4)
    model = _init_model(cfg, job).train()
    optimizer, _ = on_device(model, job, cfg, "cpu")
    ctx = make_context(model, job, cfg, np.random.default_rng(rank), "cpu", None)
    batch = {k: v for k, v in rows(args.batch, cfg.model.image.image_size or 64, 1, seed=rank).items()
             if k in ("location_id", "platform", "texts", "pixels")}
    loss = kind_of("pairs").loss
    _timed_steps(ctx, loss, optimizer, batch, 2, sync=True)  # warm-up: the trunk cache, lazy init
    ddp = data_parallel(model, loss)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            cfg.train.global_negatives = mode == "ddp_global"
            times[mode].append(_timed_steps(ctx, ddp if mode.startswith("ddp") else loss, optimizer, batch,
                                            args.steps, sync=mode == "old"))
    if rank == 0:
        torch.save({m: t for m, t in times.items()}, out)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=32, help="rows per worker per step")
    p.add_argument("--steps", type=int, default=12, help="steps per timing")
    p.add_argument("--rounds", type=int, default=3, help="timings per mode (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (2 workers share 2 cores)")
    args = parse(p, argv, {"batch": 4, "steps": 2, "rounds": 1})
    ray_worker_openmp_env(args.omp_passive)
    import torch
    import torch.multiprocessing as mp

    from geoloc_ray.config import load_config
    from geoloc_ray.model import build_model, save_model

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        cfg, init = load_config(), str(Path(tmp) / "moe")
        save_model(build_model(cfg.model, heads=["satellite", "drone", "ground"], gate=False, seed=0), init, cfg)
        out = str(Path(tmp) / "times.pt")
        mp.spawn(_worker, args=(init, str(Path(tmp) / "init"), args, out), nprocs=2, join=True)
        times = torch.load(out)
    ms = {m: 1000 * statistics.median(t) for m, t in times.items()}
    print(table([{"mode": m, "ms_per_step": ms[m], "runs_ms": [round(1000 * x, 1) for x in times[m]]}
                 for m in MODES]), flush=True)
    what = f"2 gloo workers, batch {args.batch} per worker, {args.threads} thread(s) each"
    out_rows = [
        Row(f"DDP vs the old per-parameter sync, ms per expert step ({what})", "<= 1.0x",
            f"{ms['ddp'] / ms['old']:.2f}x ({ms['ddp']:.0f} vs {ms['old']:.0f} ms; no sync at all: "
            f"{ms['none']:.0f} ms)", ms["ddp"] <= ms["old"]),
        Row("Global negatives (all-gather with gradients, 2x the candidates) on top of DDP", "report",
            f"{ms['ddp_global'] / ms['ddp']:.2f}x ({ms['ddp_global']:.0f} vs {ms['ddp']:.0f} ms)", None),
    ]
    results = {"ms_per_step": ms, "seconds": times, "batch_per_worker": args.batch, "threads": args.threads}
    finish(NAME, args, started, results, out_rows)
    return results


if __name__ == "__main__":
    main()
