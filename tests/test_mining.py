import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geoloc_ray.config import HardNegativeConfig
from geoloc_ray.train.mining import mined_rows
from geoloc_ray.train.mining_tasks import select_negatives
from tests.helpers import prepared_world_with_model

PLATFORMS = ["satellite", "drone", "ground"]


def test_select_negatives_never_returns_the_query_location():
    neighbours = np.array([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    gallery_locs = np.array(["A", "A", "B", "C", "B"])
    out = select_negatives(neighbours, np.array(["A", "B"]), gallery_locs, HardNegativeConfig(per_query=2))
    assert out == [[2, 3], [3, 1]]
    for q, negs in zip(["A", "B"], out, strict=True):
        assert all(gallery_locs[i] != q for i in negs)


def test_skip_top_and_missing_ids():
    neighbours = np.array([[5, -1, 2, 3, 4]])
    gallery_locs = np.array(["Q", "Q", "X", "Y", "Z", "W"])
    out = select_negatives(neighbours, np.array(["Q"]), gallery_locs,
                           HardNegativeConfig(per_query=2, skip_top=1))
    assert out == [[2, 3]]


def _frames(rng, n_locs=12, per_loc=3, dim=8):
    rows, queries = [], []
    centers = rng.normal(size=(n_locs, dim))
    for loc in range(n_locs):
        for j in range(per_loc):
            platform = ["satellite", "drone", "ground"][j % 3]
            vec = centers[loc] + 0.1 * rng.normal(size=dim)
            vec /= np.linalg.norm(vec)
            rows.append({"image_id": f"{loc:04d}/{j}.jpg", "image_uri": f"/g/{loc:04d}/{j}.jpg",
                         "location_id": f"{loc:04d}", "platform": platform,
                         "satellite": vec.astype(np.float32)})
            queries.append({"query": f"q{loc}-{j}", "image_id": f"{loc:04d}/{j}.jpg",
                            "image_uri": f"/g/{loc:04d}/{j}.jpg", "location_id": f"{loc:04d}",
                            "platform": platform, "embedding": vec.astype(np.float32)})
    return pd.DataFrame(queries), pd.DataFrame(rows)


def test_mined_rows_are_flagembedding_records_without_same_location_negatives():
    queries, gallery = _frames(np.random.default_rng(0))
    hn = HardNegativeConfig(top_k=10, per_query=3)
    rows = mined_rows("satellite", queries, gallery, hn)
    assert rows and all(r["platform"] == "satellite" for r in rows)
    for r in rows:
        assert {"query", "image_id", "image_uri", "neg_ids", "neg_uris", "neg_location_ids"} <= set(r)
        assert len(r["neg_ids"]) == 3
        assert r["location_id"] not in r["neg_location_ids"]
        assert all(uri.startswith("/g/") for uri in r["neg_uris"])


def test_platform_gallery_mines_only_within_the_platform():
    queries, gallery = _frames(np.random.default_rng(1))
    rows = mined_rows("satellite", queries, gallery, HardNegativeConfig(top_k=10, per_query=2, gallery="platform"))
    platform_of = dict(zip(gallery["image_id"], gallery["platform"], strict=True))
    assert rows and all(platform_of[n] == "satellite" for r in rows for n in r["neg_ids"])


def test_mixed_gallery_negatives_are_the_nearest_other_locations():
    queries, gallery = _frames(np.random.default_rng(2))
    rows = mined_rows("satellite", queries, gallery, HardNegativeConfig(top_k=36, per_query=1))
    vecs = {r.image_id: r.satellite for r in gallery.itertuples()}
    for r in rows:
        q = next(x.embedding for x in queries.itertuples() if x.query == r["query"])
        others = [v @ q for iid, v in vecs.items() if not iid.startswith(r["location_id"])]
        assert np.isclose(vecs[r["neg_ids"][0]] @ q, max(others), atol=1e-5)


def test_held_out_locations_are_stable_and_about_the_requested_fraction():
    from geoloc_ray.train.data import split_locations

    locations = [f"{i:04d}" for i in range(2000)]
    held = split_locations(locations, 0.12)
    assert held == split_locations(list(reversed(locations)), 0.12)  # order does not matter
    assert 0.09 < len(held) / len(locations) < 0.15
    assert split_locations(locations, 0.0) == set()
    assert split_locations(locations[:100], 0.12) == {x for x in held if x in set(locations[:100])}
    few = [x for x in locations if x not in held][:5]  # no hash of these falls under 12%
    assert split_locations(few, 0.12) == split_locations(few[::-1], 0.12) and len(split_locations(few, 0.12)) == 1
    assert split_locations(few, 0.0) == set() and split_locations(few[:1], 0.12) == set()


def test_mining_reruns_only_when_the_stage1_experts_or_the_settings_change():
    from geoloc_ray.train.mining import is_current, mining_key

    hn = HardNegativeConfig(per_query=2)
    versions = {"satellite": "aa11", "drone": "bb22", "ground": "cc33"}
    key = mining_key(versions, hn, {"0001", "0002"})
    manifest = {**key, "summary": {"satellite": {"rows": 5}}}  # what mining wrote, read back
    assert is_current(manifest, mining_key(dict(versions), hn, ["0002", "0001"]))  # a resumed run: no re-mining
    assert not is_current(None, key)  # never mined (or stopped before the manifest, written last)
    assert not is_current(manifest, mining_key({**versions, "drone": "dd44"}, hn, {"0001", "0002"}))
    assert not is_current(manifest, mining_key(versions, HardNegativeConfig(per_query=3), {"0001", "0002"}))
    assert not is_current(manifest, mining_key(versions, hn, {"0001"}))


def test_query_blocks_hold_at_least_the_asked_rows():
    from geoloc_ray.index.stream import Part
    from geoloc_ray.train.mining_tasks import query_blocks

    parts = [Part(f"p{i}", 0, n) for i, n in enumerate([3, 3, 5, 1, 2])]
    assert [[p.uri for p in b] for b in query_blocks(parts, 6)] == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    assert len(query_blocks(parts, 1)) == 5 and len(query_blocks(parts, 100)) == 1 and query_blocks([], 4) == []


def _mixed_world(rng, n_locs=10, views=4, texts=3, dim=8):
    """Driver frames as the old mining had them: a vector column per expert, several texts per image."""
    centers = rng.normal(size=(n_locs, dim))
    gallery, queries = [], []
    for loc in range(n_locs):
        for j in range(views):
            iid, platform = f"{loc:04d}/{j}.jpg", PLATFORMS[j % 3]
            meta = {"image_id": iid, "image_uri": f"/g/{iid}", "location_id": f"{loc:04d}", "platform": platform}
            unit = [(v := centers[loc] + 0.3 * rng.normal(size=dim)) / np.linalg.norm(v) for _ in PLATFORMS]
            gallery.append(meta | {p: u.astype(np.float32) for p, u in zip(PLATFORMS, unit, strict=True)})
            queries += [meta | {"query": f"q{loc}-{j}-{t}", "embedding": rng.normal(size=dim).astype(np.float32)}
                        for t in range(texts)]
    return pd.DataFrame(queries), pd.DataFrame(gallery)


def _write_parts(frame, vector_columns: list[str], folder: str, files: int) -> None:
    """The frame as Ray Data + `plain_vectors` leave it on storage: parquet files with fixed-size list vectors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    Path(folder).mkdir(parents=True)
    for i, chunk in enumerate(np.array_split(np.arange(len(frame)), files)):
        part = frame.iloc[chunk]
        table = pa.Table.from_pandas(part.drop(columns=vector_columns), preserve_index=False)
        for c in vector_columns:
            vecs = np.stack(part[c].to_numpy()).astype(np.float32)
            flat = pa.array(vecs.reshape(-1))
            table = table.append_column(c, pa.FixedSizeListArray.from_arrays(flat, vecs.shape[1]))
        pq.write_table(table, f"{folder}/{i:06d}_000000.parquet")


def _record_set(rows) -> set:
    return {(r["query"], r["image_id"], tuple(r["neg_ids"]), tuple(r["neg_uris"]), tuple(r["neg_location_ids"]))
            for r in rows}


def _read_rows(run: str, platform: str) -> list[dict]:
    from geoloc_ray import artifacts, io

    return io.read_parquet(artifacts.mined(run, platform)).to_dict("records")


@pytest.mark.parametrize("gallery", ["mixed", "platform"])
def test_mining_tasks_give_the_driver_mining_s_records(ray_session, tmp_path, gallery):
    from geoloc_ray import artifacts
    from geoloc_ray.train.mining import mine_embeddings

    queries, frame = _mixed_world(np.random.default_rng(3))
    run = str(tmp_path / "run")
    _write_parts(frame, PLATFORMS, artifacts.mined_gallery_embeddings(run), files=3)
    _write_parts(queries, ["embedding"], artifacts.mined_query_embeddings(run), files=5)
    hn = HardNegativeConfig(top_k=12, per_query=3, skip_top=1, gallery=gallery)
    summary = mine_embeddings(run, PLATFORMS, hn, rows_per_task=40, num_cpus=0.5)  # 120 queries: 3 tasks
    for p in PLATFORMS:
        reference = mined_rows(p, queries, frame, hn)
        assert summary[p] == {"queries": int((queries["platform"] == p).sum()), "rows": len(reference),
                              "dropped": int((queries["platform"] == p).sum()) - len(reference)}
        assert _record_set(_read_rows(run, p)) == _record_set(reference)
        assert len(list(Path(artifacts.mined(run, p)).glob("part-*.parquet"))) == 3  # one part per task


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory, ray_session):
    """A small prepared demo world and one random-weight model with every expert head (the stage-1 experts)."""
    settings = {"index": {"actors": {"batch_size": 8}}, "train": {"hard_negatives": {"top_k": 12, "per_query": 2, "skip_top": 1}}}
    cfg, _, uri = prepared_world_with_model(tmp_path_factory.mktemp("mining"), locations=14, seed=5,
                                            model_name="stage1", settings=settings)
    return cfg, uri


def test_distributed_mining_equals_the_driver_mining_on_the_demo_world(demo_world, monkeypatch):
    import ray.data

    from geoloc_ray import artifacts, io
    from geoloc_ray.embedding import embed_images, embed_texts
    from geoloc_ray.train.data import Source, triplets_dataset
    from geoloc_ray.train.mining import gallery_rows, mine, query_rows

    cfg, uri = demo_world
    experts, train_uri = {p: uri for p in PLATFORMS}, artifacts.prepared(cfg, "train")
    held_out = {sorted(io.read_parquet(train_uri, columns=["location_id"])["location_id"])[0]}

    def collect(*args, **kwargs):
        raise AssertionError("mining collected a dataset in the driver")

    with monkeypatch.context() as m:
        m.setattr(ray.data.Dataset, "to_pandas", collect)
        mined = mine(cfg, experts, train_uri, held_out)
    assert not mined["reused"] and not io.exists(artifacts.mined_work(cfg))
    assert mine(cfg, experts, train_uri, held_out) == {"reused": True, "platforms": mined["platforms"]}

    # The old driver mining: both embeddings collected here, one exact search per platform in this process.
    gallery = embed_images(gallery_rows(train_uri, held_out), {p: (uri, [p]) for p in PLATFORMS}, cfg.index)
    queries = embed_texts(query_rows(train_uri, held_out), {p: (uri, p) for p in PLATFORMS}, cfg.index)
    for p in PLATFORMS:
        reference = mined_rows(p, queries, gallery, cfg.train.hard_negatives)
        rows = _read_rows(cfg.artifacts, p)
        assert reference and _record_set(rows) == _record_set(reference)
        assert not held_out & ({r["location_id"] for r in rows} | {n for r in rows for n in r["neg_location_ids"]})
        assert mined["platforms"][p]["rows"] == len(rows)
        assert triplets_dataset(Source(artifacts.mined(cfg, p)), 64).rows == len(rows)  # stage 2 reads it


def test_mining_imports_no_ray_torch_or_faiss():
    code = ("import sys, geoloc_ray.train.mining; "
            "heavy = [m for m in ('ray', 'torch', 'faiss', 'pandas') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_mined_batch_decodes_each_image_once_and_drops_a_row_whose_image_is_broken(tmp_path, monkeypatch):
    from PIL import Image

    from geoloc_ray.preprocess import images
    from geoloc_ray.train.data import decode_triplet_batch

    uris = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{i}.png")
        uris.append(str(tmp_path / f"{i}.png"))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    broken = str(tmp_path / "broken.png")
    calls = []
    decode = images.decode_pixels
    monkeypatch.setattr("geoloc_ray.train.data.decode_pixels", lambda u, s: (calls.append(list(u)), decode(u, s))[1])
    batch = {"query": np.array(["q0", "q1", "q2"]), "location_id": np.array(["a", "b", "c"]),
             "platform": np.array(["drone", "ground", "drone"]),
             "image_uri": np.array([uris[0], uris[1], uris[0]]),
             "neg_uris": [np.array([uris[1], uris[2]]), np.array([uris[0], broken]), np.array([uris[2], uris[1]])],
             "neg_location_ids": [np.array(["b", "c"]), np.array(["a", "x"]), np.array(["c", "b"])]}
    out = decode_triplet_batch(batch, size=8)
    assert len(calls) == 1 and sorted(calls[0]) == sorted([*uris, broken])  # four distinct files, one pass
    assert list(out["query"]) == ["q0", "q2"]  # q1's second negative is broken: the row goes, the others stay
    assert out["pixels"].shape == (2, 8, 8, 3) and out["neg_pixels"].shape == (2, 2, 8, 8, 3)
    red, green, blue = (decode([u], 8)[0][0] for u in uris)
    assert np.array_equal(out["pixels"][1], red) and np.array_equal(out["neg_pixels"][1, 0], blue)
    assert np.array_equal(out["neg_pixels"][0, 1], blue) and np.array_equal(out["neg_pixels"][1, 1], green)
    assert out["neg_location_ids"].tolist() == [["b", "c"], ["c", "b"]]
