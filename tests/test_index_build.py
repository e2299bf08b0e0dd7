"""The streaming index build (embeddings on storage, shards built in Ray tasks) against the in-memory build, and
the expert-order checks that index, serve and eval share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import prepared_world_with_model

pytest.importorskip("faiss")

PLATFORMS = ["satellite", "drone", "ground"]


def _same_ranking(ids_a, scores_a, ids_b, scores_b, tie: float = 1e-4) -> None:
    """Equal scores (scaled tolerance) and equal ids wherever the next score is not a near tie."""
    np.testing.assert_allclose(scores_a, scores_b, atol=tie)
    clear = np.ones_like(scores_a, dtype=bool)
    gaps = np.abs(np.diff(scores_a, axis=1)) < tie
    clear[:, :-1] &= ~gaps
    clear[:, 1:] &= ~gaps
    assert clear.mean() > 0.5, "too many ties to compare rankings"
    np.testing.assert_array_equal(np.asarray(ids_a)[clear], np.asarray(ids_b)[clear])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, ray_session):
    """A small demo world, prepared, with a random-weight PE-MoE model saved as models/moe."""
    cfg, model, _ = prepared_world_with_model(tmp_path_factory.mktemp("demo"), locations=24, seed=3, model_name="moe",
                                              settings={"index": {"shards": 3, "actors": {"batch_size": 8}}})
    return cfg, model


def test_streaming_build_gives_the_in_memory_build_s_results(demo_run, monkeypatch):
    import ray.data

    from geoloc_ray import artifacts, io
    from geoloc_ray.embedding import ImageEmbedder, query_vectors
    from geoloc_ray.index.build import run_index
    from geoloc_ray.index.faiss_index import IndexSpec, build_index, search
    from geoloc_ray.index.store import GalleryIndex

    cfg, model = demo_run

    def collect(*args, **kwargs):
        raise AssertionError("the index build collected the gallery in the driver")

    monkeypatch.setattr(ray.data.Dataset, "to_pandas", collect)
    summary = run_index(cfg)
    monkeypatch.undo()
    index = GalleryIndex.latest(artifacts.index_dir(cfg))
    assert index.manifest["experts"] == PLATFORMS and len(index.manifest["shards"]) == 3
    assert io.glob(io.join(index.build_uri, "embeddings", "*.parquet"))

    # The in-memory build, as the stage did it before: every vector in one array, one exact index.
    test = io.read_parquet(artifacts.prepared(cfg, "test"))
    frame = ImageEmbedder({"embedding": (artifacts.model_dir(cfg, artifacts.MOE), PLATFORMS)})(
        {"image_id": test["image_id"].to_numpy(), "image_uri": test["image_uri"].to_numpy()})
    assert summary["n"] == len(frame["image_id"]) == len(index.metadata) > 20
    queries = query_vectors(model, [t for texts in test["texts"][:12] for t in list(texts)[:1]]).vectors
    k = 10
    mem_scores, mem_ids = search(build_index(frame["embedding"], IndexSpec("Flat")), queries, k)
    scores, ids = index.search(queries, k)
    _same_ranking(index.metadata["image_id"].to_numpy()[ids], scores, frame["image_id"][mem_ids], mem_scores)


def test_ivf_shards_from_storage_probing_every_list_are_exact(tmp_path: Path):
    """IVF trained once on a sample, shards filled file by file: with nprobe = nlist it must equal exact search."""
    import pandas as pd

    from geoloc_ray.config import Config, IndexConfig
    from geoloc_ray.index.build import write_build
    from geoloc_ray.index.faiss_index import exact_search
    from geoloc_ray.index.store import GalleryIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, 24)).astype(np.float32)
    frame = pd.DataFrame({"image_id": [f"i{n}" for n in range(600)], "location_id": "x", "platform": "drone",
                          "lat": 0.0, "lon": 0.0, "image_uri": "none", "embedding": list(vectors)})
    cfg = Config(artifacts=str(tmp_path), index=IndexConfig(kind="ivf", nlist=8, nprobe=8, shards=2,
                                                            train_sample=300))
    manifest = write_build(cfg, frame, {"model_version": "v1", "platforms": PLATFORMS}, "m")
    assert manifest["spec"]["factory"] == "IVF8,Flat" and [s["n"] for s in manifest["shards"]] == [300, 300]
    queries = rng.standard_normal((5, 24)).astype(np.float32)
    scores, ids = GalleryIndex.latest(str(tmp_path / "index")).search(queries, 7)
    exact_scores, exact_ids = exact_search(queries, vectors, 7)
    _same_ranking(ids, scores, exact_ids, exact_scores)


def test_a_mismatched_expert_order_is_refused(tmp_path: Path):
    import pandas as pd

    from geoloc_ray import artifacts
    from geoloc_ray.config import Config, IndexConfig, config_from_dict
    from geoloc_ray.eval.evaluate import run_eval
    from geoloc_ray.index.build import write_build
    from geoloc_ray.index.store import IndexMismatchError, check_build
    from geoloc_ray.serve.shards import load_state

    cfg = Config(artifacts=str(tmp_path / "art"), index=IndexConfig(shards=1))
    frame = pd.DataFrame({"image_id": ["a", "b"], "location_id": "x", "platform": "drone", "lat": 0.0, "lon": 0.0,
                          "image_uri": "none", "embedding": list(np.eye(2, 6, dtype=np.float32))})
    model = {"model_version": "v1", "platforms": PLATFORMS}
    manifest = write_build(cfg, frame, model, "m")
    check_build(manifest, model)  # the same order passes
    swapped = {**model, "platforms": ["drone", "satellite", "ground"]}
    with pytest.raises(IndexMismatchError, match="order"):
        write_build(cfg, frame, swapped, "m")  # the index stage refuses to build it
    with pytest.raises(IndexMismatchError, match=r"\['drone', 'satellite', 'ground'\]"):
        check_build(manifest, swapped)
    with pytest.raises(IndexMismatchError, match="order"):  # a Serve shard replica refuses to load it
        load_state(cfg.artifacts, "latest", 0, 1, swapped)
    with pytest.raises(IndexMismatchError, match="record"):  # a build from before the order was recorded
        check_build({k: v for k, v in manifest.items() if k != "experts"}, model)
    moe = Path(artifacts.model_manifest(cfg, artifacts.MOE))
    moe.parent.mkdir(parents=True)
    moe.write_text('{"model_version": "v1", "platforms": ["drone", "satellite", "ground"]}')
    with pytest.raises(IndexMismatchError, match="eval gallery"):  # eval refuses before embedding anything
        run_eval(config_from_dict({"artifacts": cfg.artifacts, "eval": {"variants": ["moe"]}}))


def test_vllm_asks_the_node_types_not_the_running_nodes(ray_session, monkeypatch):
    import ray

    from geoloc_ray.captions import vllm_backend as vb
    from geoloc_ray.cluster_types import node_types

    # Autoscaling cluster, GPU workers at 0 right now: the request goes ahead (the autoscaler brings them).
    types = {"head": {"CPU": 0.0}, "gpu_workers": {"CPU": 8.0, "GPU": 4.0}}
    assert vb.gpu_request_error(2, types, "the autoscaler's node types") is None
    error = vb.gpu_request_error(8, types, "the autoscaler's node types")
    assert "'GPU'" in error and "refine.vllm.tensor_parallel_size=8" in error and "node types" in error
    # This local instance has no autoscaler: compared with its nodes, without cluster_resources().
    monkeypatch.setattr(ray, "cluster_resources", lambda: pytest.fail("cluster_resources() at start"))
    assert node_types() is None
    with pytest.raises(RuntimeError, match="current nodes"):
        vb.check_gpus(1)
