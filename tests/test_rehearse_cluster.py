"""The rehearsal's autoscaling cluster (Ray's fake multi-node provider, made from cluster.yaml) and the resource
checks that must work on it: GPU node types at min_workers 0 are declared, not started, and must not be refused."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
import yaml

from geoloc_ray.rehearse.cluster import (
    FAKE_HEAD_TYPE,
    FakeCluster,
    fake_cluster_config,
    node_type,
    start_fake_cluster,
)
from tests.ray_cluster import REPO

CLUSTER_YAML, SIZES_YAML = REPO / "cluster.yaml", REPO / "configs" / "rehearsal_cluster.yaml"


def _load(path):
    return yaml.safe_load(path.read_text())


def test_fake_config_keeps_cluster_yaml_types_and_resource_keys() -> None:
    cluster = _load(CLUSTER_YAML)
    config = fake_cluster_config(cluster, _load(SIZES_YAML), "127.0.0.1:1")
    types = config["available_node_types"]
    workers = {n for n in cluster["available_node_types"] if n != cluster["head_node_type"]}
    assert set(types) == workers | {FAKE_HEAD_TYPE}
    assert types[FAKE_HEAD_TYPE]["resources"] == {"CPU": 0}  # the head takes no work, as in cluster.yaml
    for name in workers:
        declared = cluster["available_node_types"][name]["resources"]
        assert set(types[name]["resources"]) - {"object_store_memory"} == set(declared), name
        assert types[name]["min_workers"] == cluster["available_node_types"][name]["min_workers"] == 0
    assert types["gpu_train"]["resources"]["GPU"] >= 1 and types["gpu_llm"]["resources"]["GPU"] >= 1
    assert config["provider"]["gcs_address"] == "127.0.0.1:1"


def test_fake_config_refuses_sizes_that_change_the_resource_keys() -> None:
    cluster, sizes = _load(CLUSTER_YAML), _load(SIZES_YAML)
    sizes["node_types"]["gpu_train"]["resources"].pop("GPU")
    with pytest.raises(ValueError, match="gpu_train.*keys must be the same"):
        fake_cluster_config(cluster, sizes, "127.0.0.1:1")
    sizes = _load(SIZES_YAML)
    sizes["node_types"].pop("gpu_llm")
    with pytest.raises(ValueError, match="size every type"):
        fake_cluster_config(cluster, sizes, "127.0.0.1:1")


@pytest.fixture(scope="module")
def fake_cluster() -> Iterator[FakeCluster]:
    cluster = start_fake_cluster(CLUSTER_YAML, SIZES_YAML, REPO)
    try:
        yield cluster
    finally:
        cluster.stop()


PROBE = """
import json, os, sys, ray
from geoloc_ray.captions.vllm_backend import check_gpus
from geoloc_ray.cluster_types import node_types, publish_node_types
import yaml

ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
out = {"types_before": node_types()}
def check(n):
    try:
        check_gpus(n)
        return "ok"
    except RuntimeError as exc:
        return str(exc)
out["tp1_unpublished"] = check(1)
publish_node_types(yaml.safe_load(open(sys.argv[1])))
out["types_after"] = node_types()
out["tp1"], out["tp2"] = check(1), check(2)
gpu = ray.remote(num_gpus=1)(lambda: (os.environ.get("RAY_NODE_TYPE_NAME"), ray.get_gpu_ids(),
                                      ray.get_runtime_context().get_node_id()))
out["task"] = ray.get(gpu.remote(), timeout=240)
print("PROBE" + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(420)
def test_gpu_types_at_zero_workers_are_not_refused_and_start_on_demand(fake_cluster: FakeCluster) -> None:
    config = fake_cluster.temp_dir / "autoscaling.yaml"
    probe = subprocess.run([str(fake_cluster.bin_dir / "python"), "-c", PROBE, str(config)], cwd=REPO,
                           env=fake_cluster.env, capture_output=True, text=True, timeout=360)
    assert probe.returncode == 0, probe.stderr[-3000:]
    out = json.loads(next(line[5:] for line in probe.stdout.splitlines() if line.startswith("PROBE")))
    # The launcher's autoscaler publishes no node types: compared with the CPU-only head, refused, and the
    # message says how to publish them (what cluster.yaml's head start command does).
    assert out["types_before"] is None and "geoloc_ray.cluster_types" in out["tp1_unpublished"]
    assert out["types_after"]["gpu_train"]["GPU"] == 1 and out["types_after"]["gpu_llm"]["GPU"] == 1
    assert out["tp1"] == "ok"  # declared GPU types, none started
    assert "at most 1" in out["tp2"] and "node types" in out["tp2"]
    node_type_name, gpu_ids, node_id = out["task"]
    assert node_type_name in ("gpu_train", "gpu_llm") and gpu_ids == [0]
    joined = {n["node_id"]: node_type(n) for n in fake_cluster.nodes()}
    assert joined[node_id] == node_type_name  # the node's label names its type


class _StallingDashboard:
    """A cluster whose dashboard misses some deadlines, as a loaded head's does."""

    def __init__(self, answers: list) -> None:
        self.answers = answers

    def get(self, route: str):
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer if "/logs" not in route else {"logs": "line\n"}


def test_watch_rides_out_a_stalled_dashboard() -> None:
    from geoloc_ray.rehearse.job import watch

    cluster = _StallingDashboard([TimeoutError("timed out"), {"status": "RUNNING"}, TimeoutError("timed out"),
                                  {"status": "SUCCEEDED"}])
    status, fault, _ = watch(cluster, "job", None, timeout_s=30, poll_s=0.01)  # type: ignore[arg-type]
    assert (status, fault) == ("SUCCEEDED", None)


def test_watch_gives_up_on_a_dashboard_that_never_answers() -> None:
    from geoloc_ray.rehearse.job import watch

    cluster = _StallingDashboard([TimeoutError("timed out")])
    with pytest.raises(RuntimeError, match="did not answer"):
        watch(cluster, "job", None, timeout_s=30, poll_s=0.01, patience_s=0.05)  # type: ignore[arg-type]
