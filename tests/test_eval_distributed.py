"""Eval off the driver: the file-by-file search tasks equal one search over the whole gallery, every model's
heads run on one shared trunk pass, and the distributed stage reports what the in-process reference does
without collecting a dataset in the driver."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import prepared_world_with_model

torch = pytest.importorskip("torch")

PLATFORMS = ["satellite", "drone", "ground"]


def _write_files(frame, vector_columns: list[str], folder: Path, files: int) -> None:
    """The frame as eval's writers leave it: parquet files with fixed-size list vectors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    for i, chunk in enumerate(np.array_split(np.arange(len(frame)), files)):
        part = frame.iloc[chunk]
        table = pa.Table.from_pandas(part.drop(columns=vector_columns), preserve_index=False)
        for c in vector_columns:
            vecs = np.stack(part[c].to_numpy()).astype(np.float32)
            table = table.append_column(c, pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)),
                                                                            vecs.shape[1]))
        pq.write_table(table, folder / f"{i:06d}_000000.parquet")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_search_tasks_over_files_equal_one_search_over_the_whole_gallery(tmp_path):
    """Four gallery files, a block of queries: each probe kind (one head, static, gate, oracle, places, a view)
    ranks as the reference's exact search over the concatenated gallery does."""
    from geoloc_ray.eval.evaluate import _hit_ranks
    from geoloc_ray.eval.queries import gate_column, head_column
    from geoloc_ray.eval.routing import oracle_weights, routed_query
    from geoloc_ray.eval.search import Probe, gallery_stats, places_search, search_block
    from geoloc_ray.index.faiss_index import exact_search
    from geoloc_ray.index.stream import list_parts

    rng = np.random.default_rng(3)
    dim, n, nq = 8, 90, 14
    centers = rng.normal(size=(30, 3 * dim))
    locations = np.array([f"loc{i % 30:02d}" for i in range(n)], dtype=object)
    clean = _unit(centers[np.arange(n) % 30].reshape(n, 3, dim) + 0.5 * rng.normal(size=(n, 3, dim))).reshape(n, -1)
    noisy = _unit(clean.reshape(n, 3, dim) + 0.5 * rng.normal(size=(n, 3, dim))).reshape(n, -1)
    gallery = pd.DataFrame({"image_id": [f"img{i:03d}" for i in range(n)], "location_id": locations,
                            "moe": list(clean), "moe@noise-1": list(noisy)})
    _write_files(gallery, ["moe", "moe@noise-1"], tmp_path / "gallery", files=4)
    pick = rng.choice(n, nq, replace=False)
    heads = {p: _unit(rng.normal(size=(nq, dim))) for p in PLATFORMS}
    gate = rng.dirichlet(np.ones(3), nq).astype(np.float32)
    queries = pd.DataFrame({"qid": np.arange(nq), "image_id": gallery["image_id"].to_numpy()[pick],
                            "location_id": locations[pick], "platform": [PLATFORMS[i % 3] for i in range(nq)],
                            **{head_column("moe", p): list(v) for p, v in heads.items()},
                            gate_column("moe"): list(gate)})
    _write_files(queries, [*(head_column("moe", p) for p in PLATFORMS), gate_column("moe")], tmp_path / "queries",
                 files=2)
    experts, all_columns = tuple(PLATFORMS), tuple(range(3 * dim))
    probes = [Probe("expert_drone", ("drone",), None, tuple(range(dim, 2 * dim)), (None,)),
              Probe("static_ensemble", experts, "static", all_columns, (None, "noise-1")),
              Probe("moe", experts, "gate", all_columns, (None, "noise-1"), gate=("moe", experts)),
              Probe("moe_places", experts, "gate", all_columns, (None,), places=True, gate=("moe", experts)),
              Probe("oracle_gate", experts, "oracle", all_columns, (None,))]
    got = search_block(list_parts(str(tmp_path / "queries")), list_parts(str(tmp_path / "gallery")), "moe", probes, 10)

    parts = [heads[p] for p in PLATFORMS]
    weights = {"static_ensemble": np.full((nq, 3), 1 / 3, np.float32), "moe": gate, "moe_places": gate,
               "oracle_gate": oracle_weights(queries["platform"].tolist(), experts)}
    vectors = {name: routed_query(parts, w) for name, w in weights.items()} | {"expert_drone": heads["drone"]}
    assert list(got["qid"]) == list(range(nq))
    for p in probes:
        for view in p.views:
            g = np.stack(gallery["moe" if view is None else f"moe@{view}"].to_numpy())[:, list(p.columns)]
            ranked = places_search(vectors[p.name], g, locations, 10) if p.places else exact_search(
                vectors[p.name], g, 10)[1]
            expected = _hit_ranks(ranked, gallery, queries)
            np.testing.assert_array_equal(got["ranks"][(p.name, view)][0], expected[0], err_msg=f"{p.name} {view}")
            np.testing.assert_array_equal(got["ranks"][(p.name, view)][1], expected[1], err_msg=f"{p.name} {view}")
        if p.weights is not None:
            np.testing.assert_allclose(got["weights"][p.name], weights[p.name], rtol=1e-6)
    assert set(got["weights"]) == {"static_ensemble", "moe", "moe_places", "oracle_gate"}
    stats = gallery_stats(list_parts(str(tmp_path / "gallery")), ["loc00", "nowhere"])
    assert stats == {"gallery": n, "locations": 30, "counts": {"loc00": 3, "nowhere": 0}}


def test_places_merge_keeps_each_locations_best_image_across_files(tmp_path):
    """The 12 best images are one location spread over three files: k distinct places still come out."""
    from geoloc_ray.eval.metrics import first_per_group
    from geoloc_ray.eval.search import TopPlaces, _file_places

    rng = np.random.default_rng(5)
    query = _unit(rng.normal(size=(1, 6)))
    vectors = _unit(rng.normal(size=(60, 6)))
    locations = np.array([f"far{i % 20}" for i in range(60)], dtype=object)
    locations[np.argsort(-(vectors @ query[0]))[:12]] = "near"
    images = np.array([f"i{i}" for i in range(60)], dtype=object)
    top = TopPlaces(1, 5)
    for rows in np.array_split(np.arange(60), 3):
        scores, ids = _file_places(query, vectors[rows], locations[rows], 5)
        top.add(scores, np.where(ids >= 0, images[rows][np.clip(ids, 0, None)], None),
                np.where(ids >= 0, locations[rows][np.clip(ids, 0, None)], None))
    expected = first_per_group(np.argsort(-(query @ vectors.T), axis=1), locations, 5)
    assert top.result()[0].tolist() == [images[expected[0]].tolist()]


@pytest.fixture(scope="module")
def shared_models(tmp_path_factory):
    """Three checkpoints of one stage 0 (the same image and text trunk, their own heads) and one whose image
    trunk differs."""
    from geoloc_ray.config import ModelConfig
    from geoloc_ray.model import build_model, save_model

    root = tmp_path_factory.mktemp("models")
    specs = {"unified": (["unified"], False, 0), "aligned": (["aligned"], False, 0), "moe": (PLATFORMS, True, 0),
             "other": (["unified"], False, 1)}
    uris = {}
    for name, (heads, gate, seed) in specs.items():
        uris[name] = str(root / name)
        save_model(build_model(ModelConfig(), heads=heads, gate=gate, seed=seed), uris[name])
    return uris


def _count_calls(module, seen: list):
    original = module.forward

    def counted(*args, **kwargs):
        seen.append(len(args[0]) if hasattr(args[0], "__len__") else 1)
        return original(*args, **kwargs)

    module.forward = counted


def test_image_embedder_runs_one_trunk_pass_for_every_model_that_shares_it(shared_models):
    from geoloc_ray.embedding import ImageEmbedder, image_vectors, input_size, view_column
    from geoloc_ray.model import load_model

    models = {"unified": (shared_models["unified"], ["unified"]), "aligned": (shared_models["aligned"], ["aligned"]),
              "moe": (shared_models["moe"], PLATFORMS), "other": (shared_models["other"], ["unified"])}
    embedder = ImageEmbedder(models, views={"flip": lambda px: px[:, ::-1].copy()}, bf16=False, device="cpu")
    trunks = {id(m.image_trunk) for m, _ in embedder.models.values()}
    assert len(trunks) == 2  # one stage 0 for three models, "other" keeps its own
    seen: list = []
    for module in {id(m.image_trunk): m.image_trunk for m, _ in embedder.models.values()}.values():
        _count_calls(module, seen)
    rng = np.random.default_rng(0)
    size = embedder.size
    pixels = rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    out = embedder({"pixels": pixels, "image_id": np.array([f"i{i}" for i in range(5)])})
    assert seen == [5] * 4  # 2 trunks x 2 views, not 4 models x 2 views
    for name, (uri, heads) in models.items():
        own = load_model(uri).eval()
        assert input_size(own) == size
        for column, px in ((name, pixels), (view_column(name, "flip"), pixels[:, ::-1].copy())):
            np.testing.assert_allclose(out[column], image_vectors(own, px, heads), atol=1e-5)


def test_query_encoder_runs_one_text_trunk_pass_and_gives_each_models_heads_and_gates(shared_models):
    from geoloc_ray.embedding import head_query_vectors
    from geoloc_ray.eval.queries import QueryEncoder, QueryModel, gate_column, head_column
    from geoloc_ray.model import load_model

    specs = {"unified": QueryModel(shared_models["unified"], ("unified",)),
             "moe": QueryModel(shared_models["moe"], tuple(PLATFORMS), ("ground", "satellite", "drone")),
             "other": QueryModel(shared_models["other"], ("unified",))}
    encoder = QueryEncoder(specs, bf16=False, device="cpu")
    text_trunks = {id(m.text_trunk): m.text_trunk for m, _ in encoder.models.values()}
    assert len(text_trunks) == 1 and all(m.image_trunk is None for m, _ in encoder.models.values())
    seen: list = []
    _count_calls(next(iter(text_trunks.values())), seen)
    texts = np.array(["a red roof", "a river bridge", "a park"], dtype=object)
    out = encoder({"query": texts, "qid": np.arange(3)})
    assert len(seen) == 1  # one trunk pass for the three models
    for name, spec in specs.items():
        model = load_model(spec.uri).eval()
        parts, gate = head_query_vectors(model, texts.tolist(), spec.heads, with_gate=spec.gate_order is not None)
        for h in spec.heads:
            np.testing.assert_allclose(out[head_column(name, h)], parts[h], atol=1e-5)
        if spec.gate_order:
            order = [model.gate.platforms.index(p) for p in spec.gate_order]
            np.testing.assert_allclose(out[gate_column(name)], gate[:, order], atol=1e-6)
    assert list(out["qid"]) == [0, 1, 2]


@pytest.fixture(scope="module")
def eval_world(tmp_path_factory, ray_session):
    """A prepared demo world with models/{unified,aligned,moe,gate} from one stage 0 (random heads)."""
    from geoloc_ray import artifacts
    from geoloc_ray.model import build_model, save_model

    settings = {"index": {"actors": {"batch_size": 4}}, "eval": {"corruptions": ["noise", "occlusion"], "severities": [1],
                                                      "plots": False}}
    cfg, _, _ = prepared_world_with_model(tmp_path_factory.mktemp("eval"), locations=10, seed=2, model_name="moe",
                                          settings=settings)
    for name, heads, gate in (("unified", ["unified"], False), ("aligned", ["aligned"], False),
                              ("gate", ["unified"], True)):
        save_model(build_model(cfg.model, heads=heads, gate=gate, seed=0).eval(), artifacts.model_dir(cfg, name))
    return cfg


def test_distributed_eval_reports_what_the_in_process_reference_does(eval_world, monkeypatch):
    import ray.data

    from geoloc_ray import artifacts, io
    from geoloc_ray.eval import distributed
    from geoloc_ray.eval.evaluate import (
        _platform_gate_model,
        embed_gallery,
        encode_queries,
        gallery_heads,
        load_queries,
        run_eval,
        score_variant,
        variants,
    )
    from geoloc_ray.eval.report import is_diagnostic
    from geoloc_ray.model import load_model

    cfg = eval_world

    def collect(*args, **kwargs):
        raise AssertionError("eval collected a dataset in the driver")

    with monkeypatch.context() as m:
        m.setattr(ray.data.Dataset, "to_pandas", collect)
        m.setattr(distributed, "QUERIES_PER_TASK", 7)  # several query blocks
        results = run_eval(cfg)
    assert not io.exists(artifacts.eval_work(cfg))

    # The reference: the gallery collected here, every variant encoded and searched in this process.
    chosen = variants(cfg)
    heads = gallery_heads(chosen)
    corruptions = [("noise", 1), ("occlusion", 1)]
    queries = load_queries(cfg)
    gallery = embed_gallery(cfg, {m: (artifacts.model_dir(cfg, m), h) for m, h in heads.items()}, corruptions)
    gate_model = _platform_gate_model(cfg, chosen)
    assert results["meta"]["gallery"] == len(gallery) and results["meta"]["queries"] == len(queries) > 7
    per_query = io.read_parquet(artifacts.per_query(cfg))
    for name in heads:
        model = load_model(artifacts.model_dir(cfg, name)).eval()
        cache: dict = {}
        for v in [v for v in chosen if v.model == name]:
            qv = encode_queries(v, model, queries, cache, gate_model)
            ref = score_variant(v, model, queries, gallery, heads[name], list(cfg.eval.ks),
                                [] if is_diagnostic(v.name) else corruptions, qv)
            got = results["variants"][v.name]
            for level in ("location", "image"):
                assert got[level] == pytest.approx(ref["metrics"][level], abs=1e-9), (v.name, level)
            assert got["per_platform"].keys() == ref["metrics"]["per_platform"].keys()
            for platform, block in ref["metrics"]["per_platform"].items():
                assert got["per_platform"][platform]["queries"] == block["queries"]
                assert got["per_platform"][platform]["location"] == pytest.approx(block["location"], abs=1e-9)
            assert results["curves"][v.name] == pytest.approx(ref["curve"], abs=1e-9)
            assert (per_query[f"{v.name}:hit@10"].to_numpy() == (ref["ranks"] < 10)).all()
            for (kind, severity), block in ref["corruptions"].items():
                for level in ("location", "image"):
                    got_block = results["corruptions"][kind][str(severity)][v.name][level]
                    assert got_block == pytest.approx(block[level], abs=1e-9), (v.name, kind, level)
            if ref["gate"] is not None and not v.places:
                assert results["gate"]["by_variant"][v.name]["accuracy"] == pytest.approx(ref["gate"]["accuracy"])
    assert set(results["variants"]) == {v.name for v in chosen}
    assert set(results["corruptions"]) == {"noise", "occlusion"}
