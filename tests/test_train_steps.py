"""The train loop's batch source: a small shard is streamed once, then served from memory."""

import numpy as np

from geoloc_ray.config import config_from_dict
from geoloc_ray.model import build_model
from geoloc_ray.train.loop import JobSpec
from geoloc_ray.train.steps import make_runner


class _Shard:
    """Stands in for a Ray Data shard: counts how often it is streamed."""

    def __init__(self, n: int):
        self.rows = {"image_id": np.array([f"img-{i}" for i in range(n)]), "x": np.arange(n, dtype=np.float32)}
        self.streams = 0

    def iter_batches(self, batch_size: int, **_):
        self.streams += 1
        for i in range(0, len(self.rows["x"]), batch_size):
            yield {k: v[i : i + batch_size] for k, v in self.rows.items()}


def _runner(cache_mb: int):
    cfg = config_from_dict({"train": {"batch_size": 8, "cache_shard_mb": cache_mb}})
    model = build_model(cfg.model, heads=["unified"], gate=False, seed=0)
    job = JobSpec(name="t", kind="pairs", head="unified")
    return make_runner("pairs", model, job, cfg, np.random.default_rng(0), "cpu")


def test_small_shard_is_streamed_once_then_reshuffled_from_memory():
    runner, shard = _runner(cache_mb=16), _Shard(30)
    epochs = [[b["image_id"].tolist() for b in runner.batches(shard, epoch)] for epoch in range(3)]
    assert shard.streams == 1
    for batches in epochs:
        seen = [i for b in batches for i in b]
        assert sorted(seen) == sorted(shard.rows["image_id"].tolist())  # every row once per epoch
        assert all(len(b) >= 2 for b in batches)
    assert epochs[1] != epochs[2]  # a new order every epoch


def test_cache_off_streams_every_epoch():
    runner, shard = _runner(cache_mb=0), _Shard(30)
    for epoch in range(3):
        list(runner.batches(shard, epoch))
    assert shard.streams == 3
