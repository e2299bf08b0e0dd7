"""The deployment configs (production profile, cluster launcher, KubeRay manifests, job runtime env) load and
agree with each other and with the code. Nothing here launches a cluster: these files are only parsed."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from geoloc_ray.config import load_config

REPO = Path(__file__).resolve().parent.parent
PRODUCTION = REPO / "configs" / "production.yaml"
RAY_VERSION = "2.60.0"  # the pin in pyproject.toml; cluster images and KubeRay's rayVersion must match it


def _yaml(relative: str) -> Any:
    return yaml.safe_load((REPO / relative).read_text())


def test_production_profile_is_the_reports_setup() -> None:
    cfg = load_config(PRODUCTION)
    m, t = cfg.model, cfg.train
    assert cfg.profile == "production" and cfg.ray.address is None  # inside a job: the job's cluster
    assert (m.text.kind, m.text.expert_layers, m.text.pooling) == ("bge_m3", 2, "cls")
    assert (m.image.model_name, m.image.image_size, m.image.expert_layers) == ("EVA02-L-14", 384, 4)
    assert m.image.pretrained and m.embed_dim == 1024 and m.gate_hidden == 512
    assert not m.train_image_trunk_in_stage0  # the pretrained EVA trunk stays frozen
    assert t.use_gpu and t.batch_size == 128 and t.weight_decay == 1e-4
    assert {s.lr for s in (t.stage0, t.stage1, t.stage2)} == {2e-5}
    assert cfg.refine.backend == "vllm" and "vllm" in str(cfg.refine.vllm.runtime_env)
    assert cfg.index.kind == "ivf" and cfg.index.shards > 1  # IVF-PQ capped recall@10 at 0.58 (BENCHMARKS)
    assert (len(m.platforms) * m.embed_dim) % cfg.index.pq_m == 0  # PQ splits the fused 3 x 1024-d vector
    assert cfg.artifacts.startswith("s3://") and cfg.data.root.startswith("s3://")


def test_production_architecture_on_meta() -> None:
    """The model production.yaml describes (no weights: the meta device): trunk/expert split and sizes."""
    pytest.importorskip("torch")
    from geoloc_ray.model import build_model

    cfg = load_config(PRODUCTION).model
    model = build_model(cfg, heads=list(cfg.platforms), gate=True, device="meta")
    assert len(model.text_trunk.layers) == 22 and len(model.image_trunk.net.blocks) == 20
    for platform in cfg.platforms:
        assert len(model.heads[platform].text.tail.layers) == 2
        assert len(model.heads[platform].image.tail.blocks) == 4
    assert model.image_trunk.net.patch_embed.grid_size == (27, 27)  # 384 px / patch 14
    counts = model.parameter_counts()
    assert 0.15 < counts["trainable"] / counts["total"] < 0.30  # parameter-efficient: trunks frozen


def test_cluster_launcher_config_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml("cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` checks before launching anything
    assert raw["provider"]["type"] == "aws"
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != raw["head_node_type"]}
    assert all(0 <= t["min_workers"] <= t["max_workers"] for t in workers.values())
    assert sum(t["max_workers"] for t in workers.values()) <= raw["max_workers"]
    gpu = [t["node_config"]["InstanceType"] for t in workers.values()
           if re.match(r"(g5|g6|p4d|p5)\.", t["node_config"]["InstanceType"])]
    assert len(gpu) >= 2  # training and caption refinement
    # faiss-gpu on the CUDA worker image, faiss-cpu on the CPU head: exactly one faiss build per node
    assert any(re.search(r"pip install .*-e '?/home/ray/geoloc_ray\[gpu\]", c) for c in raw["worker_setup_commands"])
    assert any(re.search(r"pip install .*-e '?/home/ray/geoloc_ray\[cpu\]", c) for c in raw["head_setup_commands"])
    assert raw["file_mounts"]["/home/ray/geoloc_ray"] == "."
    assert {".venv", "artifacts", "data"} <= set(raw["rsync_exclude"])


def test_cluster_launcher_uses_one_auth_mode_and_the_pinned_ray() -> None:
    raw = _yaml("cluster.yaml")
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert "-e RAY_AUTH_MODE=token" in raw["docker"]["run_options"]  # so `ray job submit` on a node matches
    assert "--dashboard-port=8265" in starts[0] and "--dashboard-host=0.0.0.0" in starts[0]
    docker = raw["docker"]
    for image in (docker["head_image"], docker["worker_image"]):
        assert image.startswith(f"rayproject/ray:{RAY_VERSION}-"), image
    assert f"rayproject/ray:{RAY_VERSION}-" in (REPO / "k8s" / "Dockerfile").read_text()


def test_ray_pin_matches_pyproject() -> None:
    assert f'"ray[train,data,serve,default]=={RAY_VERSION}"' in (REPO / "pyproject.toml").read_text()


def _job_runtime_envs() -> dict[str, dict]:
    rayjob = _yaml("k8s/rayjob-train.yaml")
    return {"jobs/runtime_env.yaml": _yaml("jobs/runtime_env.yaml"),
            "k8s/rayjob-train.yaml": yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])}


def test_job_runtime_envs_do_not_clash_with_init_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """ray.init inside a job merges its runtime env with the job's and refuses a repeated env var key."""
    from geoloc_ray.io import STORAGE_ENV
    from geoloc_ray.runtime import _runtime_env

    monkeypatch.setenv(STORAGE_ENV, "{}")  # the most keys init_ray ever sets
    driver_keys = set(_runtime_env()["env_vars"])
    for source, env in _job_runtime_envs().items():
        assert not driver_keys & set(env.get("env_vars", {})), source
        assert {".venv/", ".git/", "artifacts/", "data/"} <= set(env["excludes"]), source


def test_rayjob_trains_with_the_production_profile() -> None:
    job = _yaml("k8s/rayjob-train.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == "python jobs/train.py --config configs/production.yaml"
    assert (REPO / "jobs" / "train.py").exists()
    envs = _job_runtime_envs()
    rayjob_env, jobs_env = envs["k8s/rayjob-train.yaml"], envs["jobs/runtime_env.yaml"]
    assert rayjob_env["working_dir"] and rayjob_env["env_vars"] == jobs_env["env_vars"]
    assert set(rayjob_env["excludes"]) == set(jobs_env["excludes"])
    cluster = spec["rayClusterSpec"]
    _check_cluster(cluster)
    assert any(int(_limits(g).get("nvidia.com/gpu", 0)) >= 1 for g in cluster["workerGroupSpecs"])


def _limits(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def _check_cluster(cluster: dict) -> None:
    assert cluster["rayVersion"] == RAY_VERSION
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    groups = cluster["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    images = {c["image"] for spec in [cluster["headGroupSpec"], *groups] for c in spec["template"]["spec"]["containers"]}
    assert len(images) == 1  # one image (k8s/Dockerfile) everywhere


def _set(tree: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    assert path[-1] in tree, path  # an override must replace a key serve_config.yaml has
    tree[path[-1]] = value


def test_rayservice_serves_serve_config_yaml() -> None:
    """serveConfigV2 == serve_config.yaml except what a pod on the production run needs (marked in the file)."""
    service = _yaml("k8s/rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    expected = _yaml("serve_config.yaml")
    overrides = {("http_options", "host"): "0.0.0.0",  # KubeRay's serve Service reaches the proxy on the pod IP
                 ("applications", 0, "args", "artifacts"): load_config(PRODUCTION).artifacts,
                 ("applications", 0, "args", "num_gpus"): 0.5}
    for path, value in overrides.items():
        _set(expected, path, value)
    # Production's index has 4 shards: every IndexShard_<i> gets its hot-swap entry.
    expected["applications"][0]["deployments"] += [
        {"name": f"IndexShard_{i}", "user_config": {"index_build": "latest"}}
        for i in range(1, load_config(PRODUCTION).index.shards)]
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == expected, (
        "k8s/rayservice.yaml serveConfigV2 drifted from serve_config.yaml: copy serve_config.yaml into it and "
        "re-apply the lines marked 'RayService:'")
    assert expected["applications"][0]["import_path"] == "geoloc_ray.serve.app:build_app"
    _check_cluster(service["spec"]["rayClusterConfig"])


def test_actor_pools_are_one_sub_model_and_the_old_keys_name_the_new_ones() -> None:
    from geoloc_ray.config import ConfigError, config_from_dict
    from geoloc_ray.config.base import MOVED_KEYS, ActorPool

    cfg = load_config(PRODUCTION)
    assert type(cfg.refine.actors) is ActorPool and type(cfg.index.actors) is ActorPool
    assert (cfg.index.actors.count, cfg.index.actors.num_gpus, cfg.index.actors.batch_size) == (4, 1.0, 256)
    for old, new in MOVED_KEYS.items():
        with pytest.raises(ConfigError, match=rf"{re.escape(old)}: unknown key: it moved to {re.escape(new)}"):
            load_config(PRODUCTION, [f"{old}=2"])
        section, key = new.split(".actors.")
        assert config_from_dict({section: {"actors": {key: 2}}}).model_dump()[section]["actors"][key] == 2
    with pytest.raises(ConfigError, match=r"index.actors.workers: unknown key$"):
        config_from_dict({"index": {"actors": {"workers": 2}}})


# Decode cores one A100 needs: ~320 img/s (EVA02-L @ 384 in bf16, scaled from ~1k on an H100 by bf16 peak) over
# 121 img/s per core for 1024 px JPEGs (bench/decode_rate.py, docs/BENCHMARKS.md issue 21).
DECODE_CPUS_PER_A100 = 2.6


def test_gpu_train_nodes_leave_their_cpus_to_the_decode_stage() -> None:
    """The GPU processes (train workers, embedding actors) no longer decode: what they ask leaves each gpu_train
    node (launcher and KubeRay) the cores its GPUs' images take to decode."""
    cfg = load_config(PRODUCTION)
    per_gpu = max(cfg.train.cpus_per_worker, cfg.index.actors.num_cpus)
    launcher = _yaml("cluster.yaml")["available_node_types"]["gpu_train"]["resources"]
    groups = _yaml("k8s/rayjob-train.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pod = _limits(next(g for g in groups if g["groupName"] == "gpu-train"))
    for cpus, gpus in ((launcher["CPU"], launcher["GPU"]), (float(pod["cpu"]), float(pod["nvidia.com/gpu"]))):
        assert cpus - gpus * per_gpu >= gpus * DECODE_CPUS_PER_A100, (cpus, gpus, per_gpu)
