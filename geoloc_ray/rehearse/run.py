"""`geoloc-ray rehearse`: the production profile end to end on this machine, scaled down in size only.

An autoscaling cluster made from cluster.yaml (fake GPU node types), an S3 endpoint on loopback holding the corpus
and every artifact, `ray job submit jobs/pipeline.py --config configs/rehearsal.yaml` (vLLM refine on the CPU,
BGE-M3 and EVA02 families, IVF shards), one GPU worker node killed while the experts' stage 1 trains, then the
S3 artifacts served by Ray Serve and queried over HTTP. Everything it saw lands in `<out>/rehearsal.json`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from geoloc_ray import artifacts, io
from geoloc_ray.rehearse import job as jobs
from geoloc_ray.rehearse import serving
from geoloc_ray.rehearse.cluster import FakeCluster, free_ports, start_fake_cluster
from geoloc_ray.rehearse.s3 import LoopbackS3, start_s3, upload_folder

log = logging.getLogger(__name__)

BUCKET = "geoloc-rehearsal"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Options:
    out: Path
    world: Path | None = None  # a GeoText-layout folder; None: a small synthetic world
    locations: int = 10
    config: Path = REPO / "configs" / "rehearsal.yaml"
    cluster_yaml: Path = REPO / "cluster.yaml"
    sizes_yaml: Path = REPO / "configs" / "rehearsal_cluster.yaml"
    serve_yaml: Path = REPO / "serve_config.yaml"
    models: Path = REPO / "build" / "rehearsal" / "models"
    kill_stage: str | None = "stage1"
    job_timeout_s: float = 3600
    serve_timeout_s: float = 900


def check_checkout(opts: Options) -> None:
    """The rehearsal submits the checkout's jobs/ and configs/: refuse early outside one."""
    for path in (REPO / "jobs" / "pipeline.py", opts.config, opts.cluster_yaml, opts.sizes_yaml, opts.serve_yaml):
        if not path.exists():
            raise FileNotFoundError(f"rehearse: {path} is missing (run it from a geoloc_ray checkout)")
    if opts.world is not None and not (opts.world / "train.json").exists():
        raise FileNotFoundError(f"rehearse --world {opts.world}: no train.json (a GeoText-layout folder)")


def make_world(opts: Options) -> Path:
    """The world to upload: `--world` as given, else a small synthetic one under `<out>/world`."""
    if opts.world is not None:
        return opts.world
    from geoloc_ray.config import SynthConfig
    from geoloc_ray.corpus.synth import synth_from_config

    world = opts.out / "world"
    if not (world / "train.json").exists():
        synth_from_config(SynthConfig(locations=opts.locations, seed=7, image_size=96), str(world), progress=False)
    return world


def make_models(opts: Options) -> dict[str, str]:
    """The tiny local models configs/rehearsal.yaml names (random weights, production's families)."""
    from geoloc_ray.captions.tiny_llm import make_tiny_llm
    from geoloc_ray.model.tiny import make_tiny_bge_m3

    text, llm = opts.models / "bge-m3", opts.models / "llm"
    if not (text / "config.json").exists():
        make_tiny_bge_m3(str(text))
    if not (llm / "config.json").exists():
        make_tiny_llm(str(llm))
    return {"model.text.path": str(text), "refine.vllm.model": str(llm)}


def world_renames(world: Path, cfg) -> dict[str, str]:
    """A synthetic world names its test split test.json; GeoText-1652 (production's `data.test_file`) names it
    test_951_version.json: uploaded under the config's name, the config stays production's."""
    d = cfg.data
    if not (world / d.test_file).exists() and (world / "test.json").exists():
        return {"test.json": d.test_file}
    return {}


def job_overrides(s3: LoopbackS3, run_uri: str, world_uri: str, models: dict[str, str]) -> list[str]:
    """Where this rehearsal's data, artifacts and models are (the endpoint's port is known only now)."""
    storage = json.dumps({"s3": s3.options})
    return [f"data.root={world_uri}", f"artifacts={run_uri}", f"data.storage_options={storage}",
            *(f"{k}={v}" for k, v in models.items())]


def absolute_interpreter(cfg) -> list[str]:
    """The vLLM runtime env's `py_executable`, if relative, made absolute in the checkout (the engine's worker
    starts wherever its raylet does)."""
    env = dict(cfg.refine.vllm.runtime_env)
    exe = env.get("py_executable")
    if not exe or os.path.isabs(exe):
        return []
    env["py_executable"] = str(REPO / exe)
    if not os.path.exists(env["py_executable"]):
        raise FileNotFoundError(f"refine.vllm.runtime_env.py_executable {env['py_executable']} is missing: "
                                "`make vllm-env` builds the vLLM CPU environment")
    return [f"refine.vllm.runtime_env={json.dumps(env)}"]


def runtime_env() -> dict[str, Any]:
    """jobs/runtime_env.yaml's env vars (the Train view needs state tracking); no working dir: the fake nodes run
    the installed package, as cluster.yaml's nodes run the image's."""
    spec = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    return {"env_vars": dict(spec.get("env_vars") or {})}


def read_outcome(cfg) -> dict[str, Any]:
    """What the job left on S3: refine counts, the model families, the index's kind and shards, stage times."""
    from geoloc_ray.index.store import latest_build, read_manifest

    summary = io.read_json(artifacts.refine_summary(cfg))
    manifest = io.read_json(artifacts.model_manifest(cfg, artifacts.MOE))
    index = read_manifest(latest_build(artifacts.index_dir(cfg)))
    factory = index["spec"]["factory"]
    kind = "ivfpq" if factory.startswith("IVF") and "PQ" in factory else "ivf" if factory.startswith("IVF") else \
        factory.split(",")[0].lower()
    stages = io.read_json(artifacts.pipeline_last_run(cfg))
    stage0 = io.read_json(artifacts.model_manifest(cfg, artifacts.STAGE0)).get("extra", {}).get("training", {})
    return {
        "refine": {"backend": summary["backend"], **{k: summary.get(k) for k in
                                                     ("generated", "accepted", "rejected", "errors")}},
        "models": {"text": manifest["model_config"]["text"]["kind"],
                   "image": manifest["model_config"]["image"]["model_name"]},
        "index": {"kind": kind, "factory": factory, "shards": len(index["shards"]), "n": index["n"]},
        "stages_s": {name: r.get("seconds") for name, r in stages.items()},
        "training": {"stage0": stage0},  # world size and one node id per worker
    }


def serve_and_query(cluster: FakeCluster, cfg, opts: Options) -> dict[str, Any]:
    from geoloc_ray.serve.settings import AppArgs

    port = free_ports(1)[0]
    args = AppArgs.from_config(cfg).model_dump(mode="json")
    template = yaml.safe_load(opts.serve_yaml.read_text())
    t0 = time.monotonic()
    shards = cfg.index.shards
    serving.deploy(cluster, serving.serve_config(template, args, port, shards), opts.out)
    health = serving.wait_until_healthy(port, opts.serve_timeout_s)
    ready = time.monotonic() - t0
    status, body, tries = serving.search(port)
    body = body if isinstance(body, dict) else {"body": body}
    return {"status": status, "results": len(body.get("results") or []), "tries": tries,
            "top": (body.get("results") or [None])[0], "gate": body.get("gate"), "error": body.get("error"),
            "health": health.get("status"), "ready_s": round(ready, 1)}


def problems(report: dict[str, Any], kill: bool) -> list[str]:
    """What a rehearsal must show before anyone rents a GPU (issue 20's criteria); empty when all hold."""
    if report.get("error"):
        return [f"the rehearsal stopped: {report['error']}"]
    if "job" not in report:
        return ["the rehearsal stopped before the job ended"]
    out = []
    if report["job"]["status"] != "SUCCEEDED":
        out.append(f"job ended {report['job']['status']}")
        return out
    gpu_types = {"gpu_train", "gpu_llm"}
    out += [f"no {t} node started" for t in sorted(gpu_types) if not report["nodes_started"].get(t)]
    r = report["refine"]
    if r["backend"] != "vllm" or not r.get("generated") or r["accepted"] + r["rejected"] != r["generated"]:
        out.append(f"refine counts do not add up: {r}")
    if report["index"]["shards"] != 4 or report["index"]["kind"] != "ivf":
        out.append(f"index is {report['index']}")
    if kill and report["fault"]["train_restarts"] < 1:
        out.append("no Train restart was recorded after the node loss")
    if report["serve"]["status"] != 200 or report["serve"]["results"] != 10:
        out.append(f"search answered {report['serve']}")
    return out


def _exit_on_term(signum, frame) -> None:
    raise SystemExit(f"rehearse: stopped by signal {signum}")


def rehearse(opts: Options) -> dict[str, Any]:
    """Run the rehearsal; returns the report written to `<out>/rehearsal.json` (with a `problems` list)."""
    from geoloc_ray.config import load_config
    from geoloc_ray.runtime import use_storage

    check_checkout(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _exit_on_term)  # `timeout`, a CI runner: stop the cluster on the way out
    t0 = time.monotonic()
    world, models = make_world(opts), make_models(opts)
    s3 = start_s3(BUCKET)
    cluster: FakeCluster | None = None
    run_id = time.strftime("%Y%m%d-%H%M%S")
    world_uri, run_uri = f"s3://{BUCKET}/world", f"s3://{BUCKET}/runs/{run_id}"
    report: dict[str, Any] = {"config": str(opts.config), "world": str(world), "artifacts": run_uri}
    try:
        overrides = job_overrides(s3, run_uri, world_uri, models)
        cfg = load_config(str(opts.config), overrides)
        overrides += absolute_interpreter(cfg)
        report["world_files"] = upload_folder(s3, str(world), world_uri, world_renames(world, cfg))
        use_storage(cfg)
        cluster = start_fake_cluster(opts.cluster_yaml, opts.sizes_yaml, REPO)
        publish = cluster.ray_python("-m", "geoloc_ray.cluster_types", str(cluster.temp_dir / "autoscaling.yaml"),
                                     cluster.gcs_address)
        report["published_node_types"] = publish.stdout.strip()
        job_id = f"rehearsal-{run_id}"
        entry = ["python", str(REPO / "jobs" / "pipeline.py"), "--config", str(opts.config),
                 *(a for o in overrides for a in ("--set", o))]
        jobs.submit(cluster, job_id, entry, runtime_env())
        status, fault, wall = jobs.watch(cluster, job_id, opts.kill_stage, opts.job_timeout_s)
        (opts.out / "job.log").write_text(jobs.job_logs(cluster, job_id))
        restarts = jobs.train_restarts(cluster)
        report |= {"job": {"id": job_id, "status": status, "wall_s": round(wall, 1)},
                   "nodes_started": jobs.nodes_started(cluster),
                   "fault": {**asdict(fault or jobs.Fault()), "killed_node_type": fault.node_type if fault else None,
                             "train_restarts": sum(restarts.values()), "restarts_by_run": restarts}}
        if status == "SUCCEEDED":
            report |= read_outcome(cfg)
            report["serve"] = serve_and_query(cluster, cfg, opts)
            report["nodes_started"] = jobs.nodes_started(cluster)  # serving may have brought more
    except Exception as exc:  # recorded for the report, then raised: a rehearsal never hides its failure
        report["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        report["wall_s"] = round(time.monotonic() - t0, 1)
        report["problems"] = problems(report, opts.kill_stage is not None)
        if cluster is not None:
            try:
                if report["problems"]:  # the session's logs (every node's) go with the report, for the post-mortem
                    shutil.copytree(cluster.temp_dir / "session_latest" / "logs", opts.out / "ray_logs",
                                    dirs_exist_ok=True, ignore_dangling_symlinks=True)
            except (OSError, shutil.Error) as exc:  # logs still being written: the report matters more
                report["logs_copy_error"] = str(exc)[:500]
            finally:
                report["processes_stopped"] = cluster.stop()
        s3.stop()
        (opts.out / "rehearsal.json").write_text(json.dumps(report, indent=2, default=str))
    return report
