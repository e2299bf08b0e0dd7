import numpy as np
import pandas as pd

from geoloc_ray.config import HardNegativeConfig
from geoloc_ray.train.mining import mined_rows, select_negatives


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
