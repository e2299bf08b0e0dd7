"""The rehearsal's job: `ray job submit` the pipeline, lose a GPU node while the experts' stage 1 trains, and
read back what Ray recorded (job status, Train run attempts, the nodes that joined)."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from geoloc_ray.rehearse.cluster import FAKE_HEAD_TYPE, FakeCluster, node_type

log = logging.getLogger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TRAIN_RUNS = "/api/train/v2/runs/v1"


def submit(cluster: FakeCluster, job_id: str, entrypoint: list[str], runtime_env: dict[str, Any]) -> None:
    """`ray job submit --no-wait` with no working dir: every node runs the venv's installed package, as every
    node of cluster.yaml runs the image's (retried while the head's job agent registers)."""
    args = ["job", "submit", "--address", cluster.address, "--submission-id", job_id, "--no-wait",
            "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    for _ in range(5):
        submitted = cluster.ray(*args)
        if submitted.returncode == 0 or "try again later" not in submitted.stderr:
            break
        time.sleep(5)
    if submitted.returncode != 0:
        raise RuntimeError(f"ray job submit failed:\n{submitted.stdout}\n{submitted.stderr}")


def job_status(cluster: FakeCluster, job_id: str) -> str:
    return cluster.get(f"/api/jobs/{job_id}")["status"]


def job_logs(cluster: FakeCluster, job_id: str) -> str:
    return cluster.ray("job", "logs", "--address", cluster.address, job_id).stdout


def train_runs(cluster: FakeCluster) -> list[dict[str, Any]]:
    """Ray Train's own record of every run (the dashboard's Train view): attempts, workers, their nodes."""
    return cluster.get(TRAIN_RUNS)["train_runs"]


@dataclass
class Fault:
    """Which node was lost, under which fit, after which checkpoint."""

    run: str = ""
    node_id: str = ""
    node_type: str = ""
    checkpoint: str = ""
    killed_processes: int = 0
    at_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def checkpoints(fs, storage: str, run_name: str) -> list[str]:
    """The checkpoint folders Ray Train persisted for one run (under `train` storage on S3)."""
    try:
        return sorted(p for p in fs.ls(f"{storage.rstrip('/')}/{run_name}") if "checkpoint_" in p.rsplit("/", 1)[-1])
    except FileNotFoundError:
        return []


def stage1_target(cluster: FakeCluster, fs, storage: str, stage: str) -> tuple[dict, dict, str] | None:
    """(run, its running attempt, a checkpoint) for a running `*-<stage>-*` fit that has persisted a checkpoint and
    whose workers sit on a worker node; None while there is none."""
    for run in train_runs(cluster):
        name = run["name"]
        if f"-{stage}-" not in name or run["status"] != "RUNNING":
            continue
        attempts = [a for a in run.get("attempts", []) if a["status"] == "RUNNING"]
        done = checkpoints(fs, storage, name)
        if attempts and done and attempts[-1].get("workers"):
            return run, attempts[-1], done[-1]
    return None


def lose_a_node(cluster: FakeCluster, run: dict, attempt: dict, checkpoint: str, t0: float) -> Fault:
    """Kill the node of the run's first worker (a GPU worker node: a head never hosts train workers)."""
    types = {n["node_id"]: node_type(n) for n in cluster.nodes()}
    node_id = attempt["workers"][0]["node_id"]
    if types.get(node_id, FAKE_HEAD_TYPE) == FAKE_HEAD_TYPE:
        raise RuntimeError(f"train run {run['name']} has a worker on the head node: nothing to kill safely")
    killed = cluster.kill_node(node_id)
    log.warning("rehearsal: killed node %s (%s, %d processes) under %s after %s", node_id[-5:], types[node_id],
                killed, run["name"], checkpoint.rsplit("/", 1)[-1])
    return Fault(run["name"], node_id, types[node_id], checkpoint, killed, round(time.monotonic() - t0, 1))


def watch(cluster: FakeCluster, job_id: str, fs, storage: str, kill_stage: str | None, timeout_s: float,
          poll_s: float = 2.0) -> tuple[str, Fault | None, float]:
    """Poll the job to its end, killing a node once under `kill_stage` (None: no fault). Returns (status, fault,
    wall seconds)."""
    t0 = time.monotonic()
    fault: Fault | None = None
    while time.monotonic() - t0 < timeout_s:
        status = job_status(cluster, job_id)
        if status in TERMINAL:
            return status, fault, time.monotonic() - t0
        if kill_stage and fault is None:
            target = stage1_target(cluster, fs, storage, kill_stage)
            if target:
                fault = lose_a_node(cluster, *target, t0)
        time.sleep(poll_s)
    cluster.ray("job", "stop", "--address", cluster.address, job_id)
    return "TIMEOUT", fault, time.monotonic() - t0


def train_restarts(cluster: FakeCluster, job_submission_id: str | None = None) -> dict[str, int]:
    """Failed attempts per run, as Ray Train recorded them (an attempt ends ERRORED/ABORTED, another follows)."""
    out = {}
    for run in train_runs(cluster):
        failed = sum(1 for a in run.get("attempts", []) if a["status"] in ("ERRORED", "ABORTED"))
        if failed:
            out[run["name"]] = failed
    return out


def nodes_started(cluster: FakeCluster) -> dict[str, int]:
    """Every worker node that joined the cluster during the rehearsal, by its type label (dead ones too)."""
    return dict(Counter(node_type(n) for n in cluster.nodes() if not n.get("is_head_node")))
