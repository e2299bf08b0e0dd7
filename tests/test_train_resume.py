"""A killed Ray Train worker resumes from its last checkpoint (FailureConfig), not from scratch."""

import os
import signal
import threading
import time

import numpy as np
import pytest

from geoloc_ray.config import config_from_dict
from geoloc_ray.train.fit import make_trainer
from geoloc_ray.train.worker_types import JobSpec

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _tiny_pairs(n_locations: int = 6, per_location: int = 4, size: int = 64):
    rng = np.random.default_rng(0)
    rows = []
    for loc in range(n_locations):
        colour = rng.integers(0, 255, 3)
        for j in range(per_location):
            pixels = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            rows.append({"image_id": f"{loc:04d}/image-{j:02d}.jpeg", "location_id": f"{loc:04d}",
                         "platform": ["satellite", "drone", "ground"][j % 3],
                         "texts": [f"a building with colour code {colour.tolist()}", f"place number {loc}"],
                         "pixels": pixels})
    return rows


def _worker_pids() -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "RayTrainWorker" in cmd:
            pids.append(p.info["pid"])
    return pids


def _checkpoints(root) -> list[str]:
    found = []
    for dirpath, _, filenames in os.walk(root):
        if os.path.basename(dirpath).startswith("checkpoint") and "train_state.json" in filenames:
            found.append(dirpath)
    return found


def _registered_checkpoints(root) -> int:
    """Checkpoints the Train controller has registered (its snapshot file), not merely uploaded."""
    import json

    count = 0
    for dirpath, _, filenames in os.walk(root):
        if "checkpoint_manager_snapshot.json" in filenames:
            try:
                with open(os.path.join(dirpath, "checkpoint_manager_snapshot.json")) as f:
                    count = max(count, len(json.load(f).get("checkpoint_results", [])))
            except (OSError, ValueError):
                pass  # being written right now; look again
    return count


def test_killed_worker_resumes_from_last_checkpoint(ray_session, tmp_path):
    import ray.data

    cfg = config_from_dict({
        "artifacts": str(tmp_path / "art"),
        "train": {"batch_size": 8, "max_failures": 1, "cpus_per_worker": 1.0, "torch_threads": 1},
    })
    epochs = 40
    job = JobSpec(name="resume", kind="pairs", head="unified", image_trunk=True, epochs=epochs, lr=1e-3)
    dataset = ray.data.from_items(_tiny_pairs()).materialize()
    trainer = make_trainer(cfg, job, dataset, num_workers=1, cpus=1.0, run_name="resume")
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", trainer.fit()), daemon=True)
    thread.start()

    deadline = time.time() + 240
    # kill only once the controller has registered a checkpoint (an uploaded one it has not polled yet is lost)
    root = tmp_path / "art" / "ray_train"
    while time.time() < deadline and _registered_checkpoints(root) < 1:
        time.sleep(0.2)
    assert _checkpoints(root), "no checkpoints were written"
    assert _registered_checkpoints(root) >= 1, "the controller never registered a checkpoint"
    pids = _worker_pids()
    assert pids, "could not find the Ray Train worker process"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)

    thread.join(timeout=420)
    result = outcome.get("result")
    assert result is not None, "training did not finish after the worker was killed"
    assert result.error is None
    assert result.metrics["epoch"] == epochs - 1
    # the restarted worker started from the checkpoint, not from epoch 0
    assert 0 < result.metrics["resumed_from_epoch"] < epochs


def test_relative_artifacts_paths_work_inside_train_workers(ray_session, tmp_path, monkeypatch):
    """`make demo` uses `artifacts: artifacts/demo`; a head job loads stage 0's model by that relative path."""
    import ray.data

    from geoloc_ray import artifacts
    from geoloc_ray.model import build_model, save_model

    monkeypatch.chdir(tmp_path)  # not where Ray's workers run (the session started elsewhere)
    cfg = config_from_dict({"artifacts": "art", "train": {"batch_size": 8, "cpus_per_worker": 1.0,
                                                          "torch_threads": 1}})
    stage0 = artifacts.artifact(cfg, "models", "stage0")
    save_model(build_model(cfg.model, heads=["unified"], gate=False, seed=0), stage0, cfg)
    job = JobSpec(name="head", kind="pairs", head="aligned", init=stage0, init_head="unified", epochs=1, lr=1e-3)
    dataset = ray.data.from_items(_tiny_pairs(n_locations=4, per_location=2)).materialize()
    result = make_trainer(cfg, job, dataset, num_workers=1, cpus=1.0, run_name="relative").fit()
    assert result.error is None
    assert result.metrics["epoch"] == 0
    assert _checkpoints(tmp_path / "art" / "ray_train"), "the checkpoint did not land under the relative artifacts"
