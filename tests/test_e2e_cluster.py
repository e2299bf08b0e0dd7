"""The production path on this machine (issue 12): a 2-node Ray cluster, the corpus and every artifact on an S3
endpoint (moto on loopback), `ray job submit jobs/pipeline.py` with 2 Train workers spread over the 2 nodes.

What it proves: the job succeeds with nothing but S3 for storage (no local artifacts), Ray Train's controller
reaches the custom endpoint, and stage 0 trained data-parallel on two distinct nodes (its manifest says so).
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

from tests.helpers import free_port
from tests.ray_cluster import JOB_TIMEOUT_S, REPO, LocalCluster, start_head, wait_for_job
from tests.test_e2e_job import TINY, check_metrics_shape

BUCKET = "geoloc-e2e"
# On by default (part of `make test`); GEOLOC_E2E_CLUSTER=0 skips it for a quick local run. The job took 19 min
# on the shared 2-core machine at a load average of 15-30 (2026-12-02).
pytestmark = pytest.mark.skipif(os.environ.get("GEOLOC_E2E_CLUSTER", "1") != "1",
                                reason="GEOLOC_E2E_CLUSTER=0: the 2-node S3 job is switched off")


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[LocalCluster]:
    cluster = start_head(num_cpus=1)
    try:
        cluster.add_node(num_cpus=1)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def s3() -> Iterator[dict]:
    """A real S3 endpoint on loopback; returns the fsspec options a config's `data.storage_options.s3` takes."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    host, port = server.get_host_and_port()
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    s3fs.S3FileSystem(**opts).mkdir(BUCKET)
    yield opts
    server.stop()


def _local_files() -> set[str]:
    """Files under the checkout that git does not ignore... and the ignored artifacts/data folders too."""
    out = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    return set(out) | {str(p) for d in ("artifacts", "data") for p in (REPO / d).rglob("*")}


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(JOB_TIMEOUT_S + 300)
def test_pipeline_on_two_nodes_over_s3(two_nodes: LocalCluster, s3: dict, tmp_path: Path) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    world, runs = f"s3://{BUCKET}/world", f"s3://{BUCKET}/runs/two-nodes"
    storage = "data.storage_options=" + json.dumps({"s3": s3})
    before, t0 = _local_files(), time.monotonic()
    synth = subprocess.run([sys.executable, "jobs/synth.py", world, "--locations", "8", "--seed", "5",
                            "--set", storage], cwd=REPO, env=two_nodes.env, capture_output=True, text=True,
                           timeout=300)
    assert synth.returncode == 0, synth.stderr
    job_id = f"geoloc-2n-{os.getpid()}-{int(time.time())}"
    overrides = [f"data.root={world}", f"artifacts={runs}", storage, "train.num_workers=2",
                 "train.placement_strategy=SPREAD", *TINY]
    two_nodes.submit(job_id, ["python", "jobs/pipeline.py", *(a for o in overrides for a in ("--set", o))])
    status = wait_for_job(two_nodes, job_id)
    if status != "SUCCEEDED":
        pytest.fail(f"job {job_id} ended {status} after {time.monotonic() - t0:.0f}s; last log lines:\n"
                    + two_nodes.logs(job_id))

    check_metrics_shape(json.loads(fs.cat(f"{runs}/eval/metrics.json")))
    training = json.loads(fs.cat(f"{runs}/models/stage0/manifest.json"))["extra"]["training"]
    assert training["world_size"] == 2 and len(training["node_ids"]) == 2
    assert len(set(training["node_ids"])) == 2, training  # SPREAD: one worker per node
    listed = two_nodes.ray("list", "nodes", "--address", two_nodes.address, "--format", "json")
    assert set(training["node_ids"]) == {n["node_id"] for n in json.loads(listed.stdout)}, listed.stdout
    assert _local_files() == before, sorted(_local_files() - before)  # everything went to S3
    print(f"\ne2e 2 nodes over S3: job {job_id} SUCCEEDED in {time.monotonic() - t0:.0f}s")
