"""A Ray cluster of our own on this machine, as a user starts one: `ray start --head` (and more raylets with
`ray start --address`), each raylet with its own ports and temp dir, stopped by killing only its processes
(`ray stop` would kill every Ray instance on the machine, other test sessions' included).

Each raylet gets its own `--temp-dir`, as nodes of a real cluster have their own disks: two raylets sharing one
session folder share `runtime_resources/`, and one node's runtime-env agent then deletes a job's working_dir
under the running driver (seen as `Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so`, then ENOENT).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from geoloc_ray.rehearse.cluster import free_ports, ray_env

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, and the `python` the job's entrypoint finds
JOB_TIMEOUT_S = int(os.environ.get("GEOLOC_JOB_TIMEOUT_S", "1500"))  # a loaded 2-core machine is slow


@dataclass
class LocalCluster:
    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]
    node_temp_dirs: list[Path] = field(default_factory=list)  # raylets added with add_node()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def get(self, route: str) -> dict:
        with urllib.request.urlopen(self.address + route, timeout=30) as response:
            return json.loads(response.read())

    def add_node(self, num_cpus: int = 1) -> None:
        """A second raylet (a worker node) joining this head, with its own ports and temp dir."""
        temp = Path(tempfile.mkdtemp(prefix="rN", dir="/tmp"))
        nm, om, metrics, env_agent, agent_http, agent_grpc = free_ports(6)
        started = self.ray(
            "start", f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}", f"--temp-dir={temp}",
            f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={env_agent}", f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--object-store-memory={512 * 2**20}",
            "--disable-usage-stats")
        self.node_temp_dirs.append(temp)
        assert started.returncode == 0, f"ray start (worker node) failed:\n{started.stdout}\n{started.stderr}"

    def submit(self, job_id: str, entrypoint: list[str]) -> None:
        """`ray job submit --no-wait --working-dir .` (retried while the head's job agent registers)."""
        args = ["job", "submit", "--address", self.address, "--submission-id", job_id, "--no-wait",
                "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--", *entrypoint]
        for _ in range(3):
            submitted = self.ray(*args)
            if submitted.returncode == 0 or "try again later" not in submitted.stderr:
                break
            time.sleep(5)
        assert submitted.returncode == 0, f"ray job submit failed:\n{submitted.stdout}\n{submitted.stderr}"

    def logs(self, job_id: str, lines: int = 150) -> str:
        out = self.ray("job", "logs", "--address", self.address, job_id).stdout
        return "\n".join(out.splitlines()[-lines:])

    def stop(self) -> None:
        for temp in [self.temp_dir, *self.node_temp_dirs]:
            stop_local_cluster(temp, self.gcs_port)
            shutil.rmtree(temp, ignore_errors=True)


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


def start_head(num_cpus: int) -> LocalCluster:
    """`ray start --head` with the dashboard (the job API lives there), ports and temp dir of its own."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rE", dir="/tmp"))  # short: Ray's socket paths must stay < 108
    gcs, dashboard, client, agent_http, agent_grpc, metrics, env_agent = free_ports(7)
    # RAY_ADDRESS reaches every worker of this cluster: Ray Train's placement-group cleaner looks the cluster up
    # through the state API, which otherwise scans for GCS processes and fails when this machine runs other Ray
    # instances (then finished fits keep their placement groups and starve later stages of CPUs).
    cluster = LocalCluster(temp_dir, gcs, dashboard, {**ray_env(BIN), "RAY_ADDRESS": f"127.0.0.1:{gcs}"})
    started = cluster.ray(
        "start", "--head", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={env_agent}", f"--object-store-memory={512 * 2**20}",
        "--disable-usage-stats")
    if started.returncode != 0:
        cluster.stop()
        raise AssertionError(f"ray start failed:\n{started.stdout}\n{started.stderr}")
    return cluster


def wait_for_job(cluster: LocalCluster, job_id: str) -> str:
    """Poll the job's REST route (what `ray job status` reads) until a terminal status."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        status = cluster.get(f"/api/jobs/{job_id}")["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(5)
    cluster.ray("job", "stop", "--address", cluster.address, job_id)
    return "TIMEOUT"


