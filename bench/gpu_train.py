"""Training on the chosen device without Ray: the train loop's own torch-level functions (`loop._init_model`,
`loop.on_device`, `loop.setup_context`, `loop.run_epoch`, `loop.write_checkpoint` / `read_checkpoint`).

Checks, each recorded in the JSON:
- one training step of every kind (pairs, triplets, gate, gate_fused) under bf16 autocast: finite loss, only the
  kind's parts changed, seconds per step (after one warm-up step);
- resume of an expert fit from a checkpoint: epoch 0 on the device, checkpoint, restore onto the device (the
  optimizer state is loaded after the move: every AdamW moment must sit on its parameter's device), epoch 1.

    python bench/gpu_train.py --out docs/bench                 # GPU machine (cuda), demo-sized model, batch 64
    python bench/gpu_train.py --device cpu --quick --out DIR   # CPU smoke run (tests run this)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KINDS = ("pairs", "triplets", "gate", "gate_fused")


class MemoryShard:
    """The part of Ray Data's DataIterator the steps read (`iter_batches`), over columns in memory."""

    def __init__(self, columns: dict[str, np.ndarray]):
        self.columns = columns

    def iter_batches(self, batch_size: int = 256, **_):
        n = len(next(iter(self.columns.values())))
        for i in range(0, n, batch_size):
            yield {k: v[i : i + batch_size] for k, v in self.columns.items()}


def rows(n: int, size: int, negatives: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Pairs columns (+ the triplet columns: query, mined negatives) of `n` images of n // 2 locations."""
    rng = np.random.default_rng(seed)
    texts = np.empty(n, dtype=object)
    texts[:] = [[f"a roof of colour {i % 5}", f"place number {i // 2}"] for i in range(n)]
    return {"image_id": np.arange(n).astype(str), "location_id": np.array([f"{i // 2:04d}" for i in range(n)]),
            "platform": np.array([["satellite", "drone", "ground"][i % 3] for i in range(n)]), "texts": texts,
            "query": np.array([f"a roof of colour {i % 5}, place number {i // 2}" for i in range(n)]),
            "pixels": rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
            "neg_pixels": rng.integers(0, 255, (n, negatives, size, size, 3), dtype=np.uint8),
            "neg_location_ids": np.array([[f"{9000 + i * negatives + j:05d}" for j in range(negatives)]
                                          for i in range(n)])}


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def one_step(cfg, job, device, shard) -> dict:
    """Two single-step epochs of a kind (the first warms up); loss, seconds per step and what changed."""
    import torch

    from geoloc_ray.train.loop import _init_model, on_device, run_epoch, setup_context

    model = _init_model(cfg, job)
    optimizer, scheduler = on_device(model, job, cfg, device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = setup_context(model, job, cfg, np.random.default_rng(0), device, shard)
    model.train()
    run_epoch(ctx, 0, optimizer, scheduler)
    _sync(device)
    t0 = time.perf_counter()
    steps, totals = run_epoch(ctx, 1, optimizer, scheduler)
    _sync(device)
    changed = sorted({n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("heads.") else "")
                      for n, p in model.named_parameters() if not torch.equal(p, before[n])})
    return {"steps": steps, "loss": totals["loss"] / max(steps, 1), "finite": math.isfinite(totals["loss"]),
            "step_s": (time.perf_counter() - t0) / max(steps, 1), "changed": changed}


def resume(cfg, job, device, shard, folder: str) -> dict:
    """Epoch 0, checkpoint, restore onto `device`, epoch 1: the resumed optimizer's state is on the device."""
    import torch

    from geoloc_ray.model.checkpoint import frozen_sha256
    from geoloc_ray.train.loop import (
        _init_model,
        on_device,
        read_checkpoint,
        run_epoch,
        setup_context,
        write_checkpoint,
    )

    model = _init_model(cfg, job)
    frozen = frozen_sha256(model)  # before the move, as the worker loop takes it
    optimizer, scheduler = on_device(model, job, cfg, device)
    model.train()
    run_epoch(setup_context(model, job, cfg, np.random.default_rng(0), device, shard), 0, optimizer, scheduler)
    write_checkpoint(folder, model, optimizer, scheduler, cfg, job, 0, {"world_size": 1, "node_ids": []}, frozen)
    model = _init_model(cfg, job)  # the job's starting model, as a restarted worker builds it
    opt_state, start, _ = read_checkpoint(folder, model, frozen)
    optimizer, scheduler = on_device(model, job, cfg, device, opt_state)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # AdamW's moments (its step counter is a 0-d CPU tensor by design)
    state_devices = sorted({str(v.device) for p in params for v in optimizer.state[p].values()
                            if torch.is_tensor(v) and v.dim() > 0})
    model.train()
    steps, totals = run_epoch(setup_context(model, job, cfg, np.random.default_rng(1), device, shard), start,
                              optimizer, scheduler)
    _sync(device)
    param_device = str(params[0].device)
    return {"start_epoch": start, "steps": steps, "loss": totals["loss"] / max(steps, 1),
            "scheduler_step": scheduler.last_epoch, "param_device": param_device, "state_devices": state_devices,
            "state_on_device": state_devices == [param_device], "finite": math.isfinite(totals["loss"])}


def step_every_kind(cfg, device, batch: int, folder: str) -> tuple[dict, dict, MemoryShard]:
    """One step of every kind (`one_step`) on a random-weight 3-expert + gate model of `cfg.model`, saved under
    `folder`, over `batch` random rows: (results by kind, the jobs, the shard)."""
    from geoloc_ray.model import build_model, save_model
    from geoloc_ray.train.worker_types import JobSpec

    shard = MemoryShard(rows(batch, cfg.model.image.image_size or 64, cfg.train.hard_negatives.per_query))
    init = str(Path(folder) / "moe")
    save_model(build_model(cfg.model, heads=["satellite", "drone", "ground"], gate=True, seed=0), init, cfg)
    expert = {"head": "drone", "init_head": "satellite"}
    jobs = {kind: JobSpec(name=kind, kind=kind, init=init, lr=1e-4, epochs=2,
                          **({} if kind.startswith("gate") else expert)) for kind in KINDS}
    return {kind: one_step(cfg, job, device, shard) for kind, job in jobs.items()}, jobs, shard


def main(argv: list[str] | None = None) -> dict:
    import torch

    from geoloc_ray.config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="batch 4: checks the script runs, measures nothing")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    args = p.parse_args(argv)
    batch = 4 if args.quick else args.batch
    cfg = load_config(overrides=[f"train.batch_size={batch}", "train.bf16=true", "train.cache_shard_mb=0"])
    started = time.time()
    results: dict = {"device": args.device, "torch": torch.__version__, "batch": batch, "bf16": True,
                     "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    with tempfile.TemporaryDirectory(prefix="gpu-train-") as tmp:
        results["kinds"], jobs, shard = step_every_kind(cfg, args.device, batch, tmp)
        results["resume"] = resume(cfg, jobs["pairs"], args.device, shard, str(Path(tmp) / "checkpoint"))
    results["ok"] = (all(k["finite"] and k["steps"] == 1 for k in results["kinds"].values())
                     and results["resume"]["state_on_device"] and results["resume"]["finite"])
    results["wall_s"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_train.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
