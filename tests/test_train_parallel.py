"""Data parallelism without Ray: 2 gloo workers (spawned processes) on two halves of a batch against 1 worker on
the whole batch; epochs on uneven shards; the lr schedule of a 2-worker run; the fused gate's gathered gallery.

One spawn runs every 2-worker check (a worker process costs ~10-20 s of imports on a busy machine).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from geoloc_ray.config import config_from_dict
from geoloc_ray.train.worker_types import JobSpec

SIZE, N_NEG = 64, 2


def _cfg():
    # deterministic steps: one statement per text, no style dropout, no augmentation, fp32
    return config_from_dict({"train": {"batch_size": 4, "statements_per_text": 1, "style_dropout": 0.0,
                                       "bf16": False, "global_negatives": True, "cache_shard_mb": 0},
                             "preprocess": {"augment": {"enabled": False}}})


def _rows(n: int, start: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(start)
    ids = np.arange(start, start + n)
    texts = np.empty(n, dtype=object)
    texts[:] = [[f"a roof of colour {i % 5} at place {i // 2}"] for i in ids]
    return {"image_id": ids.astype(str), "location_id": np.array([f"{i // 2:04d}" for i in ids]),
            "platform": np.array([["satellite", "drone", "ground"][i % 3] for i in ids]), "texts": texts,
            "pixels": rng.integers(0, 255, (n, SIZE, SIZE, 3), dtype=np.uint8)}


def _triplets(n: int) -> dict[str, np.ndarray]:
    rows = _rows(n)
    rng = np.random.default_rng(7)
    return {"query": np.array([t[0] for t in rows["texts"]]), "location_id": rows["location_id"],
            "platform": rows["platform"], "pixels": rows["pixels"],
            "neg_pixels": rng.integers(0, 255, (n, N_NEG, SIZE, SIZE, 3), dtype=np.uint8),
            "neg_location_ids": np.array([[f"{900 + i:04d}", f"{(i + 2) // 2:04d}"] for i in range(n)])}


# (result key, kind, whole batch, job fields): "replay" weighs the rows of platforms other than the head's
# (drone) 0.25, and the halves hold 1 and 2 drone rows, so each worker's weights sum differently; "chunked" is
# stage 2 through GradCache (4 rows x 3 images per worker in chunks of 5: backward 3 times, all-reduced once)
STEPS = [("pairs", "pairs", _rows(8), {}), ("triplets", "triplets", _triplets(8), {}),
         ("replay", "pairs", _rows(8), {"other_platform_weight": 0.25}),
         ("chunked", "triplets", _triplets(8), {"grad_cache_chunk": 5})]


def _half(batch: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    n = len(batch["location_id"]) // 2
    return {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}


class _Shard:
    def __init__(self, rows):
        self.rows = rows

    def iter_batches(self, batch_size: int = 256, **_):
        n = len(self.rows["image_id"])
        for i in range(0, n, batch_size):
            yield {k: v[i : i + batch_size] for k, v in self.rows.items()}


def _job(init: str, kind: str = "pairs", **kw) -> JobSpec:
    return JobSpec(name=kind, kind=kind, head=None if kind.startswith("gate") else "drone", init=init,
                   init_head=None if kind.startswith("gate") else "satellite", lr=1e-3, **kw)


def _loss_and_grads(init: str, kind: str, batch, **job_kw) -> tuple[float, dict[str, torch.Tensor]]:
    """One step's loss and gradients of the trainable parts: the worker loop's own pieces, dropout off."""
    from geoloc_ray.train.kinds import kind_of
    from geoloc_ray.train.loop import _init_model
    from geoloc_ray.train.parallel import agreed, data_parallel
    from geoloc_ray.train.steps import make_context

    cfg, job = _cfg(), _job(init, kind, **job_kw)
    model = _init_model(cfg, job).eval()
    ctx = make_context(model, job, cfg, np.random.default_rng(0), "cpu", None, data_parallel(model, kind_of(kind).loss))
    ((batch, sizes),) = list(agreed(iter([batch]), lambda b: len(b["location_id"]), "cpu"))
    loss, _ = kind_of(kind).run_step(dataclasses.replace(ctx, sizes=sizes), batch)
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _epochs(init: str, kind: str, shard_rows, rows_total: int) -> dict:
    """A 2-epoch fit of this worker's shard, scheduled as the driver does; its steps and final lr."""
    from geoloc_ray.train.kinds import kind_of
    from geoloc_ray.train.loop import _init_model, on_device, run_epoch, setup_context
    from geoloc_ray.train.parallel import data_parallel, world
    from geoloc_ray.train.run import scheduled

    cfg = _cfg()
    job = scheduled(_job(init, kind, epochs=2), rows_total, cfg.train.batch_size, 0, world()[1])
    model = _init_model(cfg, job)
    optimizer, scheduler = on_device(model, job, cfg, "cpu")
    ctx = setup_context(model, job, cfg, np.random.default_rng(world()[0]), "cpu", _Shard(shard_rows),
                        parallel=data_parallel(model, kind_of(kind).loss))
    steps = [run_epoch(ctx, e, optimizer, scheduler)[0] for e in range(job.epochs)]
    return {"steps": steps, "lr": optimizer.param_groups[0]["lr"], "final_lr": 0.1 * job.lr,
            "gallery": None if ctx.state is None or ctx.state.gallery is None else len(ctx.state.gallery[0])}


def _worker(rank: int, init: str, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = {name: _loss_and_grads(init, kind, _half(batch, rank), **kw) for name, kind, batch, kw in STEPS}
        # uneven shards (9 and 5 rows: 2 and 1 steps of 4): both take the same steps, nobody hangs
        result["uneven"] = _epochs(init, "pairs", _rows(9 if rank == 0 else 5, start=100 * rank), 14)
        result["even"] = _epochs(init, "pairs", _rows(8, start=100 * rank), 16)
        result["fused"] = _epochs(init, "gate_fused", _rows(6 if rank == 0 else 3, start=100 * rank), 9)
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> str:
    from geoloc_ray.model import build_model, save_model

    cfg, uri = _cfg(), str(tmp_path_factory.mktemp("moe") / "init")
    save_model(build_model(cfg.model, heads=["satellite", "drone", "ground"], gate=True, seed=0), uri, cfg)
    return uri


@pytest.fixture(scope="module")
def two_workers(moe, tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(moe, str(out / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name, kind, batch, job_kw", STEPS, ids=[s[0] for s in STEPS])
def test_two_workers_on_halves_match_one_worker_on_the_whole_batch(moe, two_workers, name, kind, batch, job_kw):
    loss, grads = _loss_and_grads(moe, kind, batch, **job_kw)
    halves = [w[name] for w in two_workers]
    # each worker's loss is its rows of the global loss: their mean is the whole batch's
    assert abs(sum(h[0] for h in halves) / 2 - loss) < 1e-5
    for _, worker_grads in halves:  # after DDP's all-reduce every worker holds the whole batch's gradient
        assert worker_grads.keys() == grads.keys()
        for name, g in grads.items():
            assert torch.allclose(worker_grads[name], g, atol=1e-5, rtol=1e-4), name


def test_uneven_shards_take_the_same_steps_and_the_schedule_ends_at_its_final_lr(two_workers):
    uneven = [w["uneven"] for w in two_workers]
    assert uneven[0]["steps"] == uneven[1]["steps"] == [1, 1]  # the worker with 2 batches stops at 1
    even = [w["even"] for w in two_workers]
    assert even[0]["steps"] == even[1]["steps"] == [2, 2]  # scheduled as 16 rows / 2 workers / batch 4
    for run in even:
        assert run["lr"] == pytest.approx(run["final_lr"])


def test_the_fused_gate_ranks_queries_against_every_workers_held_out_images(two_workers):
    assert [w["fused"]["gallery"] for w in two_workers] == [9, 9]
    assert two_workers[0]["fused"]["steps"] == two_workers[1]["fused"]["steps"]
