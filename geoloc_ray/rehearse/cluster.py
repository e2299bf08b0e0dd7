"""An autoscaling Ray cluster on this machine, made from cluster.yaml: Ray's fake multi-node provider runs the real
autoscaler, which starts and stops raylets here for the declared node types (GPU types included: Ray schedules
their GPUs, torch never sees one).

Not `ray.cluster_utils.AutoscalingCluster`: it runs `ray stop --force` (every Ray instance on the machine) and
reads an example file the wheel lacks. This cluster is found and stopped by a marker in its processes'
environment, inherited by the autoscaler's raylets, their agents and workers alike.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider's fixed name for the head's type
MARKER_ENV = "GEOLOC_REHEARSAL_CLUSTER"  # every process of one cluster carries its id
NODE_ID_ENV = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"  # the fake provider's node id, in each node's processes
NODE_TYPE_LABEL = "ray.io/node-group"  # what KubeRay labels a worker group's nodes with
_EMPTY_LISTS = ("cluster_synced_files", "initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")


def load_yaml(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def fake_cluster_config(cluster: dict[str, Any], sizes: dict[str, Any], gcs_address: str) -> dict[str, Any]:
    """cluster.yaml's node types with the rehearsal's sizes, for the fake provider. Names, resource keys and
    min_workers are cluster.yaml's; a sized type that adds or drops a resource key (GPU!) is refused."""
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    workers = {name: spec for name, spec in types.items() if name != head}
    sized = sizes.get("node_types", {})
    if set(sized) != set(workers):
        raise ValueError(f"rehearsal node sizes name {sorted(sized)}, cluster.yaml's worker types are "
                         f"{sorted(workers)}: size every type, no other")
    store = int(sizes.get("object_store_memory", 256 * 2**20))
    out_types: dict[str, Any] = {FAKE_HEAD_TYPE: {"resources": dict(types[head].get("resources") or {}),
                                                  "node_config": {}, "max_workers": 0}}
    for name, spec in workers.items():
        want, have = sized[name]["resources"], spec.get("resources") or {}
        if set(want) != set(have):
            raise ValueError(f"node type {name}: cluster.yaml declares resources {sorted(have)}, the rehearsal "
                             f"sizes {sorted(want)}: the keys must be the same")
        out_types[name] = {"resources": {**want, "object_store_memory": store}, "node_config": {},
                           "labels": {NODE_TYPE_LABEL: name},
                           "min_workers": int(spec.get("min_workers", 0)),
                           "max_workers": int(sized[name]["max_workers"])}
    config = {
        "cluster_name": f"{cluster['cluster_name']}-rehearsal",
        "max_workers": sum(t["max_workers"] for t in out_types.values()),
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": sizes.get("idle_timeout_minutes", cluster.get("idle_timeout_minutes", 5)),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ray"},
        "available_node_types": out_types,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }
    return config | {key: [] for key in _EMPTY_LISTS}


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_env(bin_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """One auth mode for `ray start` and `ray job submit`; this venv first on PATH (the job's `python`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    return env | (extra or {})


@dataclass
class FakeCluster:
    """A running autoscaling cluster: its head's ports and temp dir, and the environment for `ray` commands."""

    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]
    cwd: Path
    bin_dir: Path

    @property
    def marker(self) -> str:
        return self.env[MARKER_ENV]

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin_dir / "ray"), *args], cwd=self.cwd, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def ray_python(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """This venv's python with the cluster's environment (RAY_ADDRESS names it)."""
        return subprocess.run([str(self.bin_dir / "python"), *args], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def get(self, route: str, timeout: float = 60, tries: int = 3) -> Any:
        """A dashboard route's JSON; retried, as a loaded head's dashboard may miss a deadline now and then."""
        for attempt in range(tries):
            try:
                with urllib.request.urlopen(self.address + route, timeout=timeout) as response:
                    return json.loads(response.read())
            except OSError:
                if attempt == tries - 1:
                    raise
                time.sleep(2 ** attempt)
        raise AssertionError("unreachable")

    def nodes(self) -> list[dict[str, Any]]:
        """Every node that joined, dead or alive (the GCS's node table, through the state API)."""
        data = self.get("/api/v0/nodes?limit=1000&detail=1")["data"]["result"]["result"]
        return list(data)

    def kill_node(self, node_id: str) -> int:
        """Lose one worker node at once (SIGKILL to its raylet, agents and workers), as a spot reclaim does;
        the autoscaler notices the missing heartbeat and replaces it. Returns how many processes died."""
        return kill_processes(lambda env: env.get(MARKER_ENV) == self.marker and env.get(NODE_ID_ENV) == node_id)

    def stop(self) -> int:
        """Kill every process of this cluster (the head's, the autoscaler's raylets', their workers')."""
        killed = kill_processes(lambda env: env.get(MARKER_ENV) == self.marker)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return killed


def kill_processes(match) -> int:
    """SIGKILL the processes whose environment `match`es (never this one) and wait for them."""
    import psutil

    procs: dict[int, Any] = {}
    for proc in psutil.process_iter():
        try:
            if match(proc.environ()):
                # A raylet starts its agents with an environment of their own: found as its children.
                procs |= {p.pid: p for p in [proc, *proc.children(recursive=True)]}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    procs.pop(os.getpid(), None)
    for proc in procs.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(procs.values()), timeout=20)
    return len(procs)


def start_fake_cluster(cluster_yaml: str | Path, sizes_yaml: str | Path, cwd: Path,
                       extra_env: dict[str, str] | None = None) -> FakeCluster:
    """`ray start --head --autoscaling-config` with the fake provider; the head is CPU-only, like cluster.yaml's."""
    cluster, sizes = load_yaml(cluster_yaml), load_yaml(sizes_yaml)
    temp_dir = Path(tempfile.mkdtemp(prefix="rR", dir="/tmp"))  # short: Ray's socket paths stay < 108 chars
    gcs, dashboard, client, agent_http, agent_grpc, metrics, env_agent = free_ports(7)
    config_path = temp_dir / "autoscaling.yaml"
    config = fake_cluster_config(cluster, sizes, f"127.0.0.1:{gcs}")
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    bin_dir = Path(sys.executable).parent
    env = ray_env(bin_dir, {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                            MARKER_ENV: temp_dir.name, "RAY_ADDRESS": f"127.0.0.1:{gcs}", **(extra_env or {})})
    fake = FakeCluster(temp_dir, gcs, dashboard, env, cwd, bin_dir)
    head = config["available_node_types"][FAKE_HEAD_TYPE]["resources"]
    started = fake.ray(
        "start", "--head", f"--autoscaling-config={config_path}", f"--num-cpus={int(head.get('CPU', 0))}",
        f"--num-gpus={int(head.get('GPU', 0))}", f"--temp-dir={temp_dir}", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={env_agent}",
        f"--object-store-memory={int(sizes.get('object_store_memory', 256 * 2**20))}", "--disable-usage-stats")
    if started.returncode != 0:
        fake.stop()
        raise RuntimeError(f"ray start (fake autoscaling head) failed:\n{started.stdout}\n{started.stderr}")
    _wait_for_dashboard(fake)
    return fake


def _wait_for_dashboard(fake: FakeCluster, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fake.get("/api/version", timeout=5)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def node_type(node: dict[str, Any]) -> str:
    """A node's type as the cluster knows it: its labels, else the fake provider's node name convention."""
    labels = node.get("labels") or {}
    if labels.get(NODE_TYPE_LABEL):
        return str(labels[NODE_TYPE_LABEL])
    return FAKE_HEAD_TYPE if node.get("is_head_node") else "unlabelled"
