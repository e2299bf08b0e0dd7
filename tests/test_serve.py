"""Serve pieces without Ray: degradation maths, shard merging, app args, serve_config.yaml, body limit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel

from geoloc_ray.serve.fanout import (
    ShardHits,
    finite_or_none,
    fused_vector,
    merge_hits,
    one_per_location,
    pick,
    renormalised_weights,
)
from geoloc_ray.serve.settings import AppArgs

REPO = Path(__file__).resolve().parent.parent
PLATFORMS = ["satellite", "drone", "ground"]


def test_import_is_light():
    code = "import sys, geoloc_ray.serve; print(sorted(m for m in ('torch', 'ray', 'fastapi') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_renormalised_weights():
    assert renormalised_weights([0.5, 0.3, 0.2], [True, True, True]) == pytest.approx([0.5, 0.3, 0.2])
    assert renormalised_weights([0.5, 0.3, 0.2], [True, False, True]) == pytest.approx([0.5 / 0.7, 0, 0.2 / 0.7])
    assert renormalised_weights([1.0, 0.0, 0.0], [False, True, True]) == pytest.approx([0, 0.5, 0.5])
    assert renormalised_weights([0.2, 0.3, 0.5], [False, False, False]) == [0, 0, 0]


def _unit(rng, d):
    v = rng.normal(size=d).astype(np.float32)
    return v / np.linalg.norm(v)


def test_fused_vector_scores_are_the_gated_expert_cosines():
    rng = np.random.default_rng(0)
    t = {p: _unit(rng, 8) for p in PLATFORMS}
    v = {p: _unit(rng, 8) for p in PLATFORMS}
    gallery = np.concatenate([v[p] for p in PLATFORMS])
    gate = [0.5, 0.3, 0.2]
    q, used = fused_vector(gate, PLATFORMS, t, 8)
    assert used == pytest.approx(gate)
    assert q @ gallery == pytest.approx(sum(g * t[p] @ v[p] for g, p in zip(gate, PLATFORMS, strict=True)))
    q, used = fused_vector(gate, PLATFORMS, {**t, "drone": None}, 8)  # the drone expert did not answer
    assert used == pytest.approx([0.5 / 0.7, 0.0, 0.2 / 0.7])
    assert np.all(q[8:16] == 0)
    assert q @ gallery == pytest.approx((0.5 * t["satellite"] @ v["satellite"] + 0.2 * t["ground"] @ v["ground"]) / 0.7)


def test_merge_hits_orders_across_shards_and_truncates():
    a = ShardHits(0, "b1", "m", [0.9, 0.5, 0.1], [{"image_id": "a0"}, {"image_id": "a1"}, {"image_id": "a2"}])
    b = ShardHits(1, "b1", "m", [0.7, 0.6], [{"image_id": "b0"}, {"image_id": "b1"}])
    merged = merge_hits([a, b], 4)
    assert [r["image_id"] for _, r in merged] == ["a0", "b0", "b1", "a1"]
    assert [s for s, _ in merged] == pytest.approx([0.9, 0.7, 0.6, 0.5])
    assert len(merge_hits([a, b], 100)) == 5
    assert merge_hits([ShardHits(0, "b1", "m", [], [])], 3) == []
    c = ShardHits(1, "b2", "m", [0.95, 0.4], [{"image_id": "a1"}, {"image_id": "c1"}])  # mid-swap: a1 twice
    merged = merge_hits([a, c], 3)
    assert [r["image_id"] for _, r in merged] == ["a1", "a0", "c1"]
    assert [s for s, _ in merged] == pytest.approx([0.95, 0.9, 0.4])


def _hits(shard: int, rows: list[tuple[float, str, str]]) -> ShardHits:
    """(score, image_id, location_id) rows, best first, as one shard answers."""
    return ShardHits(shard, "b1", "m", [r[0] for r in rows], [{"image_id": r[1], "location_id": r[2]} for r in rows])


def test_group_by_location_keeps_each_places_best_image_and_asks_for_more():
    a = _hits(0, [(0.9, "a0", "L1"), (0.8, "a1", "L1"), (0.5, "a2", "L2")])
    b = _hits(1, [(0.85, "b0", "L1"), (0.7, "b1", "L3"), (0.6, "b2", "L3")])
    assert [r["image_id"] for _, r in one_per_location(merge_hits([a, b], 6))] == ["a0", "b1", "a2"]
    # images: the top 3 of the merged ranking at depth 3, final at once
    ranked, final = pick([a, b], 3, 3, "image")
    assert [r["image_id"] for _, r in ranked] == ["a0", "b0", "a1"] and final
    # places: the merged top 3 is one place (L1 three times) and the shards are still full: search deeper
    ranked, final = pick([a, b], 3, 3, "location")
    assert [r["location_id"] for _, r in ranked] == ["L1"] and not final
    # every shard answered fewer than the depth asked for: the gallery is exhausted, what there is is final
    ranked, final = pick([a, b], 12, 5, "location")
    assert [r["image_id"] for _, r in ranked] == ["a0", "b1", "a2"] and final
    assert [s for s, _ in ranked] == pytest.approx([0.9, 0.7, 0.5])


def test_the_ingress_searches_deeper_until_it_has_k_places():
    """The 40 best images are one place: depth 4k = 20 holds 1 place, so the ingress asks the shards again."""
    import asyncio

    from geoloc_ray.serve.ingress import SearchIngress
    from geoloc_ray.serve.schemas import SearchRequest

    locations = ["L0"] * 40 + [f"L{i}" for i in range(1, 61)]
    rows = [{"image_id": f"i{i}", "location_id": loc} for i, loc in enumerate(locations)]
    asked: list[int] = []

    async def shard_hits(qvec, depth, platforms, model_version):
        asked.append(depth)
        return [ShardHits(0, "b1", "m", list(np.linspace(1, 0, 100)[:depth]), rows[:depth])], []

    ingress = object.__new__(SearchIngress.func_or_class)
    ingress._shard_hits = shard_hits
    body = SearchRequest(query="x", k=5, offset=1, group_by="location")
    ranked, build, failed = asyncio.run(ingress._ranked(None, body, "m"))
    assert [r["location_id"] for _, r in ranked] == ["L0", "L1", "L2", "L3", "L4", "L5"]  # offset + k
    assert asked == [24, 96] and build == "b1" and failed == []


class KBody(BaseModel):  # module level: the annotations here are strings FastAPI resolves by name
    k: int


def test_key_gate_answers_401_before_anything_reads_the_body():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from geoloc_ray.serve.access import KeyGate
    from geoloc_ray.serve.errors import BodyLimit, install_error_handlers

    policy = {"key": "s3cret", "docs": "key"}
    rejected: list[str] = []
    api = FastAPI()
    install_error_handlers(api, lambda request: None)
    api.add_middleware(BodyLimit, max_bytes=100)
    api.add_middleware(KeyGate, policy=lambda: (policy["key"], policy["docs"]), on_reject=rejected.append)

    @api.post("/search")
    async def search(body: KBody) -> dict:
        return {"k": body.k}

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    client, key = TestClient(api), {"X-API-Key": "s3cret"}
    for data in (b'{"k": "x"}', b"not json", b"{" + b"x" * 500 + b"}"):  # 422, 400, 413 with the key
        r = client.post("/search", content=data, headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
    assert rejected == ["/search"] * 3
    assert client.post("/search", json={"k": "x"}, headers=key).status_code == 422
    assert client.post("/search", json={"k": 2}, headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.post("/search", json={"k": 2}, headers=key).json() == {"k": 2}
    assert client.get("/healthz").status_code == 200  # probes need no key (the ingress trims the body)
    assert client.get("/openapi.json").status_code == 401 and client.get("/docs").status_code == 401
    assert client.get("/openapi.json", headers=key).json()["openapi"].startswith("3.")
    policy["docs"] = "public"
    assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200
    policy["docs"] = "off"
    for path in ("/openapi.json", "/docs", "/redoc"):
        r = client.get(path, headers=key)
        assert r.status_code == 404 and r.json()["error"] == "not_found", path
    policy.update(key=None, docs="key")  # no key configured: nothing changes
    assert client.post("/search", json={"k": "x"}).status_code == 422
    assert client.get("/openapi.json").status_code == 200


def test_finite_or_none():
    assert finite_or_none(1.5) == 1.5 and finite_or_none(np.float32(2)) == 2.0
    assert finite_or_none(float("nan")) is None and finite_or_none(None) is None and finite_or_none("x") is None


def test_app_args(tmp_path, monkeypatch):
    from geoloc_ray.config import Config

    a = AppArgs(artifacts="runs/demo")
    assert (a.num_cpus, a.max_query_chars, a.index_build, a.replicas.expert) == (0.25, 1000, "latest", 1)
    monkeypatch.chdir(tmp_path)
    assert a.model_uri() == str(tmp_path / "runs/demo/models/moe")  # made absolute where build_app runs
    assert AppArgs(artifacts="s3://bucket/run", model="moe-untuned").model_uri() == "s3://bucket/run/models/moe-untuned"
    with pytest.raises(ValueError, match="top_k"):
        AppArgs.model_validate({"artifacts": "x", "top_k": 3})
    with pytest.raises(ValueError, match="port"):  # geoloc-ray serve's listener, not an app arg
        AppArgs.model_validate({"artifacts": "x", "port": 80})
    with pytest.raises(ValueError):
        AppArgs(artifacts="x", num_cpus=0)
    cfg = Config.model_validate({"artifacts": "runs/x", "serve": {"api_key": "k", "replicas": {"expert": 2}}})
    b = AppArgs.from_config(cfg)
    # the config resolved the relative path where it was loaded
    assert (b.artifacts, b.api_key, b.replicas.expert) == (str(tmp_path / "runs/x"), "k", 2)
    assert AppArgs(artifacts="x", num_gpus=0.5).actor_options(gpu=True) == {"num_cpus": 0.25, "num_gpus": 0.5}
    assert AppArgs(artifacts="x", num_gpus=0.5).actor_options(gpu=False) == {"num_cpus": 0.25}


# Every knob of the app at a value other than its default.
KNOBS = {"model": "moe-untuned", "index_build": "20250101-000000", "api_key": "k", "docs": "off",
         "max_query_chars": 500,
         "max_batch_size": 8, "batch_wait_timeout_s": 0.002, "num_cpus": 0.5, "num_gpus": 0.25,
         "replicas": {"ingress": 2, "encoder": 3, "expert": 4, "shard": 5}, "max_ongoing_requests": 32,
         "torch_threads": 2, "expert_timeout_s": 3.0, "shard_timeout_s": 4.0, "thumbnail_px": 96}


def test_every_app_arg_is_reachable_from_the_configs():
    import yaml

    from geoloc_ray.config import Config, load_config
    from geoloc_ray.config.sections import ServeAppConfig

    assert set(KNOBS) == set(ServeAppConfig.model_fields)
    assert set(AppArgs.model_fields) == set(KNOBS) | {"artifacts", "storage_options", "device"}
    args = AppArgs.from_config(Config.model_validate({"artifacts": "s3://b/run", "device": "cpu", "serve": KNOBS}))
    assert args.model_dump(include=set(KNOBS)) == KNOBS  # from_config carries every knob
    assert args.device == "cpu"  # and the run's root `device`
    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert set(raw["applications"][0]["args"]) == set(AppArgs.model_fields)  # serve_config.yaml lists them all
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.serve.model_fields_set >= set(KNOBS)  # and so does the default profile
    assert AppArgs.from_config(demo) == AppArgs.model_validate({**raw["applications"][0]["args"],
                                                                "artifacts": demo.artifacts})


def test_serve_config_serves_the_demo_run():
    """`serve run serve_config.yaml` from the repo root after `make demo` (default config: artifacts/demo)."""
    import yaml

    from geoloc_ray.config import Config

    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert raw["applications"][0]["args"]["artifacts"] == demo["artifacts"] == Config.model_fields["artifacts"].default
    assert "geoloc-ray demo" in (REPO / "Makefile").read_text()  # make demo: the default config, nothing else


def test_build_app_is_a_typed_application_builder():
    """Serve validates serve_config.yaml `args` into the builder's pydantic annotation (a string would not)."""
    import inspect

    from geoloc_ray.serve.app import build_app

    (param,) = inspect.signature(build_app).parameters.values()
    assert param.annotation is AppArgs


def _fake_run(root: Path, index_version: str) -> None:
    """Just the manifests build_app reads (it binds deployments; nothing starts)."""
    (root / "models/moe").mkdir(parents=True)
    (root / "models/moe/manifest.json").write_text(json.dumps({"model_version": "v1", "platforms": PLATFORMS}))
    (root / "index/build-1").mkdir(parents=True)
    (root / "index/LATEST.json").write_text(json.dumps({"build": "build-1"}))
    manifest = {"build": "build-1", "model_version": index_version, "experts": PLATFORMS,
                "shards": [{"file": "s0"}, {"file": "s1"}]}
    (root / "index/build-1/manifest.json").write_text(json.dumps(manifest))


def test_build_app_binds_the_graph_and_refuses_a_mismatched_index(tmp_path):
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from geoloc_ray.artifacts import MissingArtifactError
    from geoloc_ray.index.store import IndexMismatchError
    from geoloc_ray.serve.app import build_app

    def build(args: dict) -> Application:  # what `serve run` / `serve deploy` do with serve_config.yaml `args`
        return call_user_app_builder_with_args_if_necessary(build_app, args)

    _fake_run(tmp_path / "good", "v1")
    assert isinstance(build({"artifacts": str(tmp_path / "good")}), Application)
    _fake_run(tmp_path / "bad", "v2")
    with pytest.raises(IndexMismatchError, match="rebuild the index"):
        build({"artifacts": str(tmp_path / "bad")})
    with pytest.raises(MissingArtifactError, match="geoloc-ray train"):
        build({"artifacts": str(tmp_path / "none")})
    with pytest.raises(ValueError, match="build folder name"):
        build({"artifacts": str(tmp_path / "good"), "index_build": "../good/index/build-1"})
    with pytest.raises(ValueError, match="max_batch_size"):
        build({"artifacts": str(tmp_path / "good"), "max_batch_size": 0})


def test_body_limit_answers_json_413():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from geoloc_ray.serve.errors import BodyLimit, install_error_handlers

    api = FastAPI()
    install_error_handlers(api, lambda request: None)
    api.add_middleware(BodyLimit, max_bytes=100)

    @api.post("/echo")
    async def echo(body: dict) -> dict:
        return body

    client = TestClient(api)
    assert client.post("/echo", json={"a": 1}).json() == {"a": 1}
    r = client.post("/echo", json={"a": "x" * 200})
    assert r.status_code == 413 and r.json()["error"] == "content_too_large"

    def chunks():  # no Content-Length: counted while read
        yield b'{"a": "'
        yield b"x" * 200
        yield b'"}'

    r = client.post("/echo", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "content_too_large", r.text


def test_breaker_leaves_a_component_out_until_its_probe_answers():
    import asyncio

    from geoloc_ray.serve.breaker import Breaker

    async def scenario() -> list[bool]:
        breaker, calls = Breaker(probe_every_s=0.01), []

        async def probe():
            calls.append(1)
            if len(calls) < 3:
                raise TimeoutError("still restarting")

        breaker.trip("ExpertHead_drone", probe)
        breaker.trip("ExpertHead_drone", probe)  # already down: no second probe
        seen = [breaker.is_down("ExpertHead_drone"), breaker.is_down("ExpertHead_ground")]
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not breaker.is_down("ExpertHead_drone"):
                break
        return [*seen, breaker.is_down("ExpertHead_drone"), len(calls) == 3]

    assert asyncio.run(scenario()) == [True, False, False, True]


def test_only_timeouts_and_dead_replicas_mark_a_component_down():
    from ray.exceptions import ActorDiedError, RayTaskError

    from geoloc_ray.serve.breaker import is_unavailable
    from geoloc_ray.serve.experts import InjectedFailure

    raised_in_replica = RayTaskError("embed", "Traceback ...", InjectedFailure("drill")).as_instanceof_cause()
    assert isinstance(raised_in_replica, InjectedFailure) and not is_unavailable(raised_in_replica)
    assert is_unavailable(TimeoutError()) and is_unavailable(ActorDiedError())


def test_grafana_dashboard_queries_only_metrics_the_code_exports():
    """docs/grafana: every `ray_geoloc_*` series is a Counter / Histogram defined in geoloc_ray (Ray adds `ray_`)."""
    import re

    dashboard = json.loads((REPO / "docs" / "grafana" / "geoloc_dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    source = "\n".join(f.read_text() for f in (REPO / "geoloc_ray").rglob("*.py"))
    defined = {name: kind for kind, name in re.findall(r'(Counter|Histogram|Gauge)\(\s*"(geoloc_\w+)"', source)}
    assert {"geoloc_search_latency_ms", "geoloc_search_requests_total", "geoloc_component_failures_total"} <= set(defined)
    used = set()
    for series in re.findall(r"\bray_(geoloc_\w+)", " ".join(exprs)):
        base = re.sub(r"_(bucket|sum|count)$", "", series)
        assert defined.get(base) == "Histogram" if base != series else series in defined, series
        used.add(base)
    assert used == set(defined)  # and every metric the app exports has a panel
    assert {p["datasource"] for p in dashboard["panels"]} == {"${datasource}"}  # Ray's dashboards' variable
