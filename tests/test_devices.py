"""The config's `device` (auto / cuda / cpu): the decision table, the process group it gives Ray Train, and a
1-worker fit on a local Ray that declares a GPU torch cannot see (what a fake GPU node of the rehearsal is):
`device: cpu` trains there with the GPU request kept; `auto` fails at once with a message naming the key."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geoloc_ray.devices import DeviceError, pick_device, resolve_device

REPO = Path(__file__).resolve().parent.parent
OUTSIDE, GIVEN, WITHHELD = None, True, False  # not a Ray worker / a worker Ray gave a GPU / one it gave none
FAKE_GPU = "torch sees no CUDA device"

TABLE = [  # choice, gpu_assigned, cuda_visible -> device, or the error's words
    ("cpu", OUTSIDE, True, "cpu"), ("cpu", OUTSIDE, False, "cpu"), ("cpu", GIVEN, True, "cpu"),
    ("cpu", GIVEN, False, "cpu"), ("cpu", WITHHELD, True, "cpu"), ("cpu", WITHHELD, False, "cpu"),
    ("auto", OUTSIDE, True, "cuda"), ("auto", OUTSIDE, False, "cpu"), ("auto", GIVEN, True, "cuda"),
    ("auto", GIVEN, False, DeviceError(FAKE_GPU)), ("auto", WITHHELD, True, "cpu"), ("auto", WITHHELD, False, "cpu"),
    ("cuda", OUTSIDE, True, "cuda"), ("cuda", OUTSIDE, False, DeviceError(FAKE_GPU)),
    ("cuda", GIVEN, True, "cuda"), ("cuda", GIVEN, False, DeviceError(FAKE_GPU)),
    ("cuda", WITHHELD, True, DeviceError("assigned this worker no GPU")),
    ("cuda", WITHHELD, False, DeviceError("assigned this worker no GPU")),
]


@pytest.mark.parametrize(("choice", "assigned", "visible", "expected"), TABLE)
def test_device_table(choice, assigned, visible, expected):
    if isinstance(expected, DeviceError):
        with pytest.raises(DeviceError, match=str(expected)) as err:
            pick_device(choice, assigned, visible)
        assert f"device: {choice}" in str(err.value)  # the message names the key
    else:
        assert pick_device(choice, assigned, visible) == expected


def test_every_choice_is_in_the_table_and_unknown_ones_fail():
    assert {(c, a, v) for c, a, v, _ in TABLE} == {(c, a, v) for c in ("auto", "cuda", "cpu")
                                                  for a in (OUTSIDE, GIVEN, WITHHELD) for v in (True, False)}
    with pytest.raises(DeviceError, match="gpu"):
        pick_device("gpu", None, True)
    assert resolve_device("cpu") == "cpu"


def test_the_fake_gpu_message_says_what_to_set():
    with pytest.raises(DeviceError) as err:
        pick_device("auto", True, False)
    assert "`device: cpu`" in str(err.value) and "same resource requests" in str(err.value)


def test_train_process_group_follows_the_device(tmp_path):
    from geoloc_ray.config import config_from_dict
    from geoloc_ray.train.backend import DeviceTorchConfig, torch_config
    from geoloc_ray.train.fit import make_trainer
    from geoloc_ray.train.worker_types import JobSpec

    assert torch_config("cpu", use_gpu=True).backend == "gloo"  # GPU requests kept, computing on the CPU
    assert torch_config("auto", use_gpu=True).backend is None  # Ray's choice: NCCL on GPU workers
    assert torch_config("cuda", use_gpu=True).backend is None
    assert torch_config("auto", use_gpu=False).backend == "gloo"
    cfg = config_from_dict({"artifacts": str(tmp_path / "art"), "device": "cpu", "train": {"use_gpu": True}})
    job = JobSpec(name="j", kind="pairs", head="unified", epochs=1, lr=1e-3)
    trainer = make_trainer(cfg, job, None, 2, 1.0, "run")
    backend = trainer.backend_config
    assert isinstance(backend, DeviceTorchConfig) and (backend.backend, backend.device) == ("gloo", "cpu")
    assert trainer.scaling_config.use_gpu and trainer.scaling_config.resources_per_worker["GPU"] == 1


def fake_gpu_fits(out: str) -> None:
    """Run in a subprocess: its own local Ray declaring 1 GPU (torch sees none), one 1-worker fit per device."""
    import ray

    from geoloc_ray.config import config_from_dict
    from geoloc_ray.train.fit import fit_concurrently
    from geoloc_ray.train.run import scheduled
    from geoloc_ray.train.worker_types import JobSpec
    from tests.test_train_fit import _pairs

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    dataset = ray.data.from_items(_pairs(8, size=32)).materialize()
    results = {}
    for device in ("cpu", "auto"):  # auto last: a run failed at startup keeps its GPU bundle until the driver ends
        cfg = config_from_dict({"artifacts": f"{out}/art-{device}", "device": device, "train": {
            "use_gpu": True, "num_workers": 1, "cpus_per_worker": 0.5, "torch_threads": 1, "batch_size": 4,
            "max_failures": 2}})
        job = scheduled(JobSpec(name=device, kind="pairs", head="unified", epochs=1, lr=1e-3, text_layers=False),
                        dataset.count(), cfg.train.batch_size, 0, workers=1)
        start = time.perf_counter()
        try:
            (fit,) = fit_concurrently(cfg, [(job, dataset, device, f"{out}/model-{device}")], num_workers=1)
            results[device] = {"ok": True, "steps": fit.metrics["steps"], "s": time.perf_counter() - start}
        except Exception as exc:  # noqa: BLE001 (what the test looks at)
            results[device] = {"ok": False, "error": str(exc), "s": time.perf_counter() - start}
    Path(out, "fits.json").write_text(json.dumps(results))
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_a_fit_on_a_gpu_torch_cannot_see(tmp_path):
    code = f"from tests.test_devices import fake_gpu_fits; fake_gpu_fits({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=600)
    fits = json.loads((tmp_path / "fits.json").read_text())
    assert fits["cpu"]["ok"] and fits["cpu"]["steps"] == 2, fits["cpu"]  # gloo, the model on the CPU
    assert not fits["auto"]["ok"] and FAKE_GPU in fits["auto"]["error"] and "`device: cpu`" in fits["auto"]["error"]
    assert "NCCL" not in fits["auto"]["error"]  # ours, before Ray's process group
    print(f"\nfake GPU: auto failed in {fits['auto']['s']:.1f} s, cpu trained in {fits['cpu']['s']:.1f} s")
