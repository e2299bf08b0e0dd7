"""The rehearsal's job: `ray job submit` the pipeline, lose a GPU node while the experts' stage 1 trains, and
read back what Ray recorded (job status, Train run attempts, the nodes that joined)."""

from __future__ import annotations

import json
import logging
import re
import sys
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
    """Ray Train's own record of every run (the dashboard's Train view): attempts, workers, their nodes. Empty
    until the job's first fit creates Train's state actor (the route answers 500 before that)."""
    import urllib.error

    try:
        return cluster.get(TRAIN_RUNS)["train_runs"]
    except urllib.error.HTTPError as exc:
        if exc.code == 500:
            return []
        raise


@dataclass
class Fault:
    """Which node was lost, under which fit, when."""

    run: str = ""
    node_id: str = ""
    node_type: str = ""
    killed_processes: int = 0
    at_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def job_name(run_name: str) -> str:
    """A Train run is named `<job>-<train hash>` (train/run.py); the job's log lines say `[<job>] ...`."""
    return run_name.rsplit("-", 1)[0]


def stage1_target(cluster: FakeCluster, logs: str, stage: str, seen: dict[str, float],
                  settle_s: float = 4.0) -> tuple[dict, dict] | None:
    """(run, its running attempt) for a `*-<stage>` fit in its first attempt whose first epoch ended at least
    `settle_s` ago (its checkpoint persisted and registered by the controller) and whose last epoch has not:
    None while there is no such fit. `seen` remembers when each fit's first epoch showed in the log."""
    now = time.monotonic()
    for run in train_runs(cluster):
        name = job_name(run["name"])
        if not name.endswith(f"-{stage}") or run["status"] != "RUNNING":
            continue
        attempts = run.get("attempts", [])
        if len(attempts) != 1 or attempts[0]["status"] != "RUNNING" or not attempts[0].get("workers"):
            continue
        epochs = re.findall(rf"\[{re.escape(name)}\] epoch (\d+)/(\d+)", logs)
        if not epochs:
            continue
        seen.setdefault(name, now)
        last_done = max(int(done) == int(total) for done, total in epochs)
        if not last_done and now - seen[name] >= settle_s:
            return run, attempts[0]
    return None


def job_log_text(cluster: FakeCluster, job_id: str) -> str:
    """The driver's log so far, through the REST API (a `ray job logs` process per poll would cost a core)."""
    return cluster.get(f"/api/jobs/{job_id}/logs")["logs"]


def lose_a_node(cluster: FakeCluster, run: dict, attempt: dict, t0: float) -> Fault:
    """Kill the node of the run's first worker (a GPU worker node: a head never hosts train workers)."""
    types = {n["node_id"]: node_type(n) for n in cluster.nodes()}
    node_id = attempt["workers"][0]["node_id"]
    if types.get(node_id, FAKE_HEAD_TYPE) == FAKE_HEAD_TYPE:
        raise RuntimeError(f"train run {run['name']} has a worker on the head node: nothing to kill safely")
    killed = cluster.kill_node(node_id)
    log.warning("rehearsal: killed node %s (%s, %d processes) under %s while it trains", node_id[-5:],
                types[node_id], killed, run["name"])
    return Fault(run["name"], node_id, types[node_id], killed, round(time.monotonic() - t0, 1))


def watch(cluster: FakeCluster, job_id: str, kill_stage: str | None, timeout_s: float, poll_s: float = 2.0,
          log_every_s: float = 10.0, patience_s: float = 600.0) -> tuple[str, Fault | None, float]:
    """Poll the job to its end, killing a node once under `kill_stage` (None: no fault). Returns (status, fault,
    wall seconds). A poll the dashboard does not answer in time is no verdict on the job: on two loaded cores the
    head's dashboard can stall for a minute, so polls are retried until `patience_s` of failures in a row."""
    t0 = time.monotonic()
    fault: Fault | None = None
    shown, seen, text, last_log, failing_since = 0, {}, "", -log_every_s, None
    while time.monotonic() - t0 < timeout_s:
        try:
            status = job_status(cluster, job_id)
            if status in TERMINAL or time.monotonic() - last_log >= log_every_s:
                text, last_log = job_log_text(cluster, job_id), time.monotonic()
                sys.stdout.write(text[shown:])  # streamed as `ray job submit` without --no-wait would
                sys.stdout.flush()
                shown = len(text)
            if status in TERMINAL:
                return status, fault, time.monotonic() - t0
            if kill_stage and fault is None:
                target = stage1_target(cluster, text, kill_stage, seen)
                if target:
                    fault = lose_a_node(cluster, *target, t0)
            failing_since = None
        except OSError as e:  # URLError, socket timeouts, refused connections
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > patience_s:
                raise RuntimeError(f"the dashboard did not answer for {patience_s:.0f} s: {e}") from e
            log.warning("rehearsal: the dashboard did not answer (%s); polling again", e)
        time.sleep(poll_s)
    cluster.ray("job", "stop", "--address", cluster.address, job_id)
    return "TIMEOUT", fault, time.monotonic() - t0


def train_restarts(cluster: FakeCluster) -> dict[str, int]:
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
