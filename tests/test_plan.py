"""The capacity planner (`geoloc-ray plan`, train/plan.py + train/measure.py) on configs/production.yaml: every fit
fits its A100 40 GB with 10% headroom; stage 2 at the settings before GradCache does not, the command exits 1
naming it and the keys, and `train` refuses it. The production model is measured once per module (fake tensors,
no GPU: ~40 s of CPU); the override run re-measures only the fits it changes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PRODUCTION = REPO / "configs" / "production.yaml"
TODAY = ["train.stage2.grad_cache_chunk=0", "train.stage2.batch_size=128"]  # stage 2 as it was before GradCache
EXPERTS = ["satellite", "drone", "ground"]
FITS = {"stage0", "unified", "aligned", "gate", "gate-fused", *(f"{p}-stage{s}" for p in EXPERTS for s in (1, 2))}


@pytest.fixture(scope="module")
def production_plan() -> dict:
    from geoloc_ray.config import load_config
    from geoloc_ray.train.plan import plan

    t0 = time.perf_counter()
    result = plan(load_config(PRODUCTION))
    print(f"\nplan of production.yaml: {time.perf_counter() - t0:.1f} s")
    return result


def test_every_production_fit_fits_with_headroom(production_plan):
    fits = production_plan["fits"]
    assert set(fits) == FITS
    for name, f in fits.items():
        assert f["gpu_gib"] == 40 and f["fits"], name
        assert 0 < f["peak_gib"] <= 0.9 * f["gpu_gib"], name
        assert f["trainable_params"] > 0 and f["step_tflops"] > 0, name
        assert f["at_peak_gib"]["param"] > 2.5, name  # the frozen trunks (BGE-M3 L1-L22 + EVA02-L L1-L20) are there
    stage2 = fits["drone-stage2"]
    assert stage2["kind"] == "triplets" and stage2["grad_cache_chunk"] > 0 and stage2["measured_as"] == "satellite-stage2"
    assert fits["drone-stage1"]["measured_as"] == "stage0"  # the same step (one head, batch 128): measured once
    # an expert trains its head alone (2 XLM-R layers + 4 EVA02-L blocks + 2 projections); the gate is small
    assert 70e6 < fits["drone-stage1"]["trainable_params"] < 85e6 and fits["gate"]["trainable_params"] < 1e6


def test_rows_are_ids_in_the_object_store_and_decode_to_the_image_size_and_negatives(production_plan):
    from geoloc_ray.train.data import DECODED_BLOCK_BYTES

    rows = production_plan["rows"]
    assert set(rows) == {"stage0", "stage1", "stage2", "gate", "gate_fused"}
    for stage in rows:  # ids (image URIs, statements) until the decode stage streams them to the workers
        assert 0 < rows[stage]["object_store_bytes_per_row"] < 10_000, stage
    assert rows["stage2"]["object_store_bytes_per_row"] < rows["stage1"]["object_store_bytes_per_row"]  # 1 statement
    pixels = 384 * 384 * 3
    pairs, triplets = rows["stage1"]["decoded_bytes_per_row"], rows["stage2"]["decoded_bytes_per_row"]
    assert pixels <= pairs < 1.1 * pixels  # a decoded image, plus its ids and statements
    assert 5 * pixels <= triplets < 5.5 * pixels  # the positive and 4 hard negatives (hard_negatives.per_query)
    for stage in ("stage1", "stage2"):  # a streamed block is one decode task's output: bounded, not the dataset
        block = rows[stage]
        assert block["decode_block_rows"] >= 1 and block["decoded_block_bytes"] <= 1.05 * DECODED_BLOCK_BYTES
    assert rows["gate"]["decoded_bytes_per_row"] == 0  # statements only


def test_the_table_names_every_fit(production_plan):
    from geoloc_ray.train.plan import table

    text = table(production_plan)
    assert all(name in text for name in FITS) and "every fit fits with 10% headroom" in text


def test_stage2_as_before_gradcache_does_not_fit_and_the_command_says_so(production_plan, capsys):
    from geoloc_ray.cli import main

    argv = ["plan", "--config", str(PRODUCTION), "--json"]
    t0 = time.perf_counter()
    code = main(argv + [a for kv in TODAY for a in ("--set", kv)])
    out, err = capsys.readouterr()
    print(f"plan with stage 2 at batch 128, no chunks (other fits reused): {time.perf_counter() - t0:.1f} s")
    result = json.loads(out)
    assert code == 1
    bad = {name for name, f in result["fits"].items() if not f["fits"]}
    assert bad == {f"{p}-stage2" for p in EXPERTS}
    assert result["fits"]["drone-stage2"]["peak_gib"] > 40
    assert "drone-stage2" in err and "train.stage2.grad_cache_chunk" in err and "train.stage2.batch_size" in err
    assert set(result["rows"]) == set(production_plan["rows"])


def test_train_refuses_a_fit_that_cannot_fit_and_checks_nothing_without_gpus():
    from geoloc_ray.config import load_config
    from geoloc_ray.train.plan import check_plan

    with pytest.raises(ValueError, match="satellite-stage2.*train.stage2.batch_size"):
        check_plan(load_config(PRODUCTION, TODAY))  # measured by the test above: reused
    assert check_plan(load_config(PRODUCTION, TODAY + ["train.use_gpu=false"])) == {}


def test_the_gpu_memory_key_is_the_train_node_types():
    """train.gpu_memory_gib says what the GPU of cluster.yaml's and the k8s manifest's train node type holds."""
    from geoloc_ray.config import load_config

    gib = load_config(PRODUCTION).train.gpu_memory_gib
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert cluster["available_node_types"]["gpu_train"]["node_config"]["InstanceType"] == "p4d.24xlarge"  # A100 40GB
    job = yaml.safe_load((REPO / "k8s" / "rayjob-train.yaml").read_text())
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (train,) = [g for g in groups if g["groupName"] == "gpu-train"]
    product = train["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
    assert product == f"NVIDIA-A100-SXM4-{gib:g}GB"
