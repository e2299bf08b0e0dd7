"""A 2-worker Ray Train fit (TorchTrainer, gloo, 0.5 CPU each) on uneven shards: it finishes, the schedule
reaches its final lr, and the exported model's manifest says where it trained (one Ray node id per worker)."""

import json

import numpy as np
import pytest

from geoloc_ray.config import config_from_dict
from geoloc_ray.train.fit import fit_concurrently
from geoloc_ray.train.run import scheduled
from geoloc_ray.train.worker_types import JobSpec

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _pairs(n: int, size: int = 64) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image_id": str(i), "location_id": f"{i // 2:04d}", "platform": ["satellite", "drone", "ground"][i % 3],
             "texts": [f"a roof of colour {i % 5}", f"place {i // 2}"][: 1 + i % 2],
             "pixels": rng.integers(0, 255, (size, size, 3), dtype=np.uint8)} for i in range(n)]


def test_two_workers_fit_and_the_manifest_records_their_nodes(ray_session, tmp_path):
    import ray
    import ray.data

    cfg = config_from_dict({"artifacts": str(tmp_path / "art"), "train": {
        "num_workers": 2, "cpus_per_worker": 0.5, "torch_threads": 1, "batch_size": 4, "report_every_steps": 1,
        "placement_strategy": "SPREAD"}})
    dataset = ray.data.from_items(_pairs(19)).materialize()  # 19 rows: Ray splits them 9 + 9 (equal=True)
    job = scheduled(JobSpec(name="two", kind="pairs", head="unified", epochs=2, lr=1e-3, text_layers=False),
                    dataset.count(), cfg.train.batch_size, 0, workers=2)
    assert job.steps_per_epoch == 2
    out = str(tmp_path / "model")
    (result,) = fit_concurrently(cfg, [(job, dataset, "two-workers", out)], num_workers=2)
    assert result.metrics["epoch"] == 1 and result.metrics["steps"] == 2 and result.metrics["world_size"] == 2
    assert result.metrics["lr"] == pytest.approx(0.1 * job.lr)  # the cosine ran its whole course
    training = json.loads((tmp_path / "model" / "manifest.json").read_text())["extra"]["training"]
    assert training["world_size"] == 2 and len(training["node_ids"]) == 2
    assert set(training["node_ids"]) <= {n["NodeID"] for n in ray.nodes()}
