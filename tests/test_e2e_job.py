"""End to end as a user runs it (DESIGN.md section 3): `ray start --head`, then
`ray job submit --working-dir . -- python jobs/pipeline.py ...`, poll the job, check `eval/metrics.json`.
The cluster is ours alone (tests/ray_cluster.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ray_cluster import JOB_TIMEOUT_S, REPO, LocalCluster, start_head, wait_for_job

JOB_SCRIPTS = {"synth": "synth", "prepare": "prepare", "refine_captions": "refine", "train": "train",
               "index": "index", "eval": "eval", "pipeline": "pipeline", "ladder": "ladder"}
# Every training round runs, one epoch each; one corruption keeps that path covered.
TINY = ["train.stage0.epochs=1", "train.stage1.epochs=1", "train.stage2.epochs=1", "train.gate.epochs=1",
        "train.gate_fused.epochs=1", "train.stage1.min_steps=0", "train.stage2.min_steps=0",
        "eval.corruptions=[blur]", "eval.severities=[1]", "eval.plots=false"]
VARIANTS = {"unified", "aligned", "static_ensemble", "moe"}
RECALLS = {"R@1", "R@5", "R@10", "score"}


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[LocalCluster]:
    """One head on 2 CPUs."""
    cluster = start_head(num_cpus=2)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.parametrize("script,command", sorted(JOB_SCRIPTS.items()))
def test_job_script_is_the_cli_command(script: str, command: str) -> None:
    out = subprocess.run([sys.executable, f"jobs/{script}.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: geoloc-ray {command} ")
    assert "--config" in out.stdout and "--set" in out.stdout


def check_metrics_shape(metrics: dict) -> None:
    assert VARIANTS <= set(metrics["variants"])  # the ladder; diagnostics and moe_places come on top
    for name, variant in metrics["variants"].items():
        for level in ("location", "image"):
            assert set(variant[level]) == RECALLS, (name, level)
            assert all(0.0 <= variant[level][k] <= 100.0 for k in RECALLS), (name, level)
        assert set(variant["per_platform"]) <= {"satellite", "drone", "ground"} and variant["per_platform"]
        for platform, scores in variant["per_platform"].items():
            assert set(scores["location"]) == RECALLS and set(scores["image"]) == RECALLS, (name, platform)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(JOB_TIMEOUT_S + 300)
def test_pipeline_as_a_ray_job(local_cluster: LocalCluster, tmp_path: Path) -> None:
    t0 = time.monotonic()
    world, runs = tmp_path / "world", tmp_path / "artifacts"
    synth = subprocess.run([sys.executable, "jobs/synth.py", str(world), "--locations", "8", "--seed", "3"],
                           cwd=REPO, env=local_cluster.env, capture_output=True, text=True, timeout=300)
    assert synth.returncode == 0, synth.stderr
    job_id = f"geoloc-e2e-{os.getpid()}-{int(time.time())}"
    overrides = [f"data.root={world}", f"artifacts={runs}", *TINY]
    local_cluster.submit(job_id, ["python", "jobs/pipeline.py", *(a for o in overrides for a in ("--set", o))])

    status = wait_for_job(local_cluster, job_id)
    job_seconds = time.monotonic() - t0
    if status != "SUCCEEDED":
        pytest.fail(f"job {job_id} ended {status} after {job_seconds:.0f}s; last log lines:\n"
                    + local_cluster.logs(job_id))
    cli_status = local_cluster.ray("job", "status", "--address", local_cluster.address, "--log-style=record", job_id)
    assert f"job '{job_id}' succeeded" in cli_status.stdout.lower(), cli_status.stdout

    metrics = json.loads((runs / "eval" / "metrics.json").read_text())
    check_metrics_shape(metrics)
    report = json.loads((runs / "pipeline" / "last_run.json").read_text())
    assert [s for s, r in report.items() if r["status"] == "ran"] == ["prepare", "refine", "train", "index", "eval"]

    # The Train view of the dashboard: every fit of the recipe is a finished Train run of this job.
    runs_view = local_cluster.get("/api/train/v2/runs/v1")["train_runs"]
    names = {r["name"].rsplit("-", 1)[0]: r for r in runs_view}
    expected = {"unified", "aligned", "gate"} | {f"{p}-stage{s}" for p in ("satellite", "drone", "ground")
                                                for s in (1, 2)}
    assert expected <= set(names), sorted(names)
    assert {names[n]["status"] for n in expected} == {"FINISHED"}
    print(f"\ne2e: pipeline job {job_id} SUCCEEDED; synth + submit + job took {job_seconds:.0f}s; "
          f"stages {json.dumps({k: v.get('seconds') for k, v in report.items()})}")
