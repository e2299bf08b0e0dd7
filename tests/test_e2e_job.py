"""End to end as a user runs it (DESIGN.md section 3): `ray start --head`, then
`ray job submit --working-dir . -- python jobs/pipeline.py ...`, poll the job, check `eval/metrics.json`.

The cluster is ours alone (own temp dir, own ports) and is always stopped by killing only its processes:
`ray stop` would kill every Ray instance on the machine, other test sessions' included.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, and the `python` the job's entrypoint finds
JOB_SCRIPTS = {"synth": "synth", "prepare": "prepare", "refine_captions": "refine", "train": "train",
               "index": "index", "eval": "eval", "pipeline": "pipeline"}
# Every training round runs, one epoch each; one corruption keeps that path covered.
TINY = ["train.stage0.epochs=1", "train.stage1.epochs=1", "train.stage2.epochs=1", "train.gate.epochs=1",
        "eval.corruptions=[blur]", "eval.severities=[1]", "eval.plots=false"]
VARIANTS = {"unified", "aligned", "static_ensemble", "moe"}
RECALLS = {"R@1", "R@5", "R@10", "score"}
JOB_TIMEOUT_S = 900


def _ray_env() -> dict[str, str]:
    """The same auth mode for `ray start` and `ray job submit` (else AuthenticationError); venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (all sockets held open together, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalCluster:
    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def get(self, route: str) -> dict:
        with urllib.request.urlopen(self.address + route, timeout=30) as response:
            return json.loads(response.read())


def stop_local_cluster(temp_dir: Path, gcs_port: int) -> int:
    """Kill this cluster's processes (their command line names our temp dir or GCS port) and all their
    descendants (workers, the job's driver); returns how many were killed."""
    import psutil

    marks = (str(temp_dir), f":{gcs_port}")
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(m in arg for arg in proc.info["cmdline"] or [] for m in marks):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    procs = {}
    for proc in roots:
        procs[proc.pid] = proc
        try:
            procs.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    procs.pop(os.getpid(), None)
    for proc in procs.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(procs.values()), timeout=15)
    return len(procs)


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[LocalCluster]:
    """`ray start --head` with the dashboard (the job API lives there) on 2 CPUs, ports of its own."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rE", dir="/tmp"))  # short: Ray's socket paths must stay < 108
    gcs, dashboard, client, agent_http, agent_grpc, metrics, env_agent = _free_ports(7)
    cluster = LocalCluster(temp_dir, gcs, dashboard, _ray_env())
    try:
        started = cluster.ray(
            "start", "--head", "--num-cpus=2", f"--temp-dir={temp_dir}", f"--port={gcs}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={env_agent}", f"--object-store-memory={512 * 2**20}",
            "--disable-usage-stats")
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        yield cluster
    finally:
        stop_local_cluster(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.parametrize("script,command", sorted(JOB_SCRIPTS.items()))
def test_job_script_is_the_cli_command(script: str, command: str) -> None:
    out = subprocess.run([sys.executable, f"jobs/{script}.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: geoloc-ray {command} ")
    assert "--config" in out.stdout and "--set" in out.stdout


def _wait_for_job(cluster: LocalCluster, job_id: str) -> str:
    """Poll the job's REST route (what `ray job status` reads) until a terminal status."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        status = cluster.get(f"/api/jobs/{job_id}")["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(5)
    cluster.ray("job", "stop", "--address", cluster.address, job_id)
    return "TIMEOUT"


def _check_metrics_shape(metrics: dict) -> None:
    assert set(metrics["variants"]) == VARIANTS
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
    submit = ["job", "submit", "--address", local_cluster.address, "--submission-id", job_id, "--no-wait",
              "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--",
              "python", "jobs/pipeline.py", *(a for o in overrides for a in ("--set", o))]
    for _ in range(3):  # the head's job agent may still be registering right after `ray start`
        submitted = local_cluster.ray(*submit)
        if submitted.returncode == 0 or "try again later" not in submitted.stderr:
            break
        time.sleep(5)
    assert submitted.returncode == 0, f"ray job submit failed:\n{submitted.stdout}\n{submitted.stderr}"

    status = _wait_for_job(local_cluster, job_id)
    job_seconds = time.monotonic() - t0
    if status != "SUCCEEDED":
        logs = local_cluster.ray("job", "logs", "--address", local_cluster.address, job_id).stdout
        pytest.fail(f"job {job_id} ended {status} after {job_seconds:.0f}s; last log lines:\n"
                    + "\n".join(logs.splitlines()[-150:]))
    cli_status = local_cluster.ray("job", "status", "--address", local_cluster.address, "--log-style=record", job_id)
    assert f"job '{job_id}' succeeded" in cli_status.stdout.lower(), cli_status.stdout

    metrics = json.loads((runs / "eval" / "metrics.json").read_text())
    _check_metrics_shape(metrics)
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
