"""Eval without Ray: a variant's ranking through the shared query-vector and exact-search helpers is the
PE-MoE score computed by hand, and its blocks have the metrics.json shape."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

PLATFORMS = ["satellite", "drone", "ground"]


@pytest.fixture(scope="module")
def moe():
    from geoloc_ray.config import ModelConfig
    from geoloc_ray.model import build_model

    torch.set_num_threads(2)
    return build_model(ModelConfig(), heads=PLATFORMS, gate=True, seed=0).eval()


@pytest.fixture(scope="module")
def frames(moe):
    import pandas as pd

    from geoloc_ray.embedding import image_vectors, input_size, view_column

    rng = np.random.default_rng(0)
    size = input_size(moe)
    pixels = rng.integers(0, 256, (12, size, size, 3), dtype=np.uint8)
    gallery = pd.DataFrame({"image_id": [f"img{i}" for i in range(12)],
                            "location_id": [f"loc{i // 3}" for i in range(12)],
                            "platform": [PLATFORMS[i % 3] for i in range(12)]})
    gallery["moe"] = list(image_vectors(moe, pixels, PLATFORMS))
    gallery[view_column("moe", "noise-1")] = list(image_vectors(moe, 255 - pixels, PLATFORMS))
    queries = pd.DataFrame({"query": ["a red roof", "a green park", "a river bridge", "a white tower", "a road"],
                            "image_id": ["img0", "img4", "img8", "img10", "img2"],
                            "location_id": ["loc0", "loc1", "loc2", "loc3", "loc0"],
                            "platform": ["satellite", "drone", "ground", "drone", "ground"]})
    return queries, gallery


def _by_hand(moe, queries, gallery_vectors: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """sum_k g_k(q) cos(t_k(q), v_k(I)), ranked: the method's definition, one expert at a time (`weights`
    replaces the gate's g(q))."""
    dim = moe.model_cfg.embed_dim
    with torch.no_grad():
        trunk = moe.text_trunk_output(queries["query"].tolist())
        gate = moe.gate(trunk).numpy() if weights is None else weights
        scores = sum(gate[:, [k]] * (moe.text_head(p, trunk).numpy() @ gallery_vectors[:, k * dim:(k + 1) * dim].T)
                     for k, p in enumerate(PLATFORMS))
    return np.argsort(-scores, axis=1, kind="stable")


def test_moe_variant_ranks_by_the_gated_expert_scores(moe, frames):
    from geoloc_ray import artifacts
    from geoloc_ray.eval.evaluate import Variant, score_variant
    from geoloc_ray.eval.metrics import retrieval_metrics

    queries, gallery = frames
    variant = Variant("moe", artifacts.MOE, tuple(PLATFORMS), "gate")
    scored = score_variant(variant, moe, queries, gallery, PLATFORMS, [1, 5, 10], [("noise", 1)])
    args = (gallery["image_id"].to_numpy(), gallery["location_id"].to_numpy(), queries["image_id"].to_numpy(),
            queries["location_id"].to_numpy(), [1, 5, 10])
    for column, block in (("moe", scored["metrics"]), ("moe@noise-1", scored["corruptions"][("noise", 1)])):
        expected = retrieval_metrics(_by_hand(moe, queries, np.stack(gallery[column].to_numpy()))[:, :10], *args)
        assert {k: block[k] for k in ("location", "image")} == expected
    assert set(scored["metrics"]) == {"location", "image", "per_platform"}
    assert set(scored["metrics"]["location"]) == {"R@1", "R@5", "R@10", "score"}
    assert scored["metrics"]["per_platform"]["drone"]["queries"] == 2
    assert len(scored["curve"]) == 10 and scored["gate"]["accuracy"] >= 0


def test_single_head_variant_uses_only_its_columns(moe, frames):
    from geoloc_ray.eval.evaluate import Variant, score_variant

    queries, gallery = frames
    single = score_variant(Variant("x", "moe", ("drone",), None), moe, queries, gallery, PLATFORMS, [1, 10], [])
    assert single["gate"] is None and single["corruptions"] == {}
    assert set(single["metrics"]["location"]) == {"R@1", "R@10", "score"}


def test_variants_share_one_gallery_column_per_model():
    from geoloc_ray import artifacts
    from geoloc_ray.config import Config
    from geoloc_ray.eval.evaluate import gallery_heads, variants

    heads = gallery_heads(variants(Config()))
    assert heads == {artifacts.UNIFIED: ["unified"], artifacts.ALIGNED: ["aligned"], artifacts.MOE: PLATFORMS}


def test_moe_places_ranks_each_locations_best_image_of_the_moe_ranking(moe, frames):
    from geoloc_ray import artifacts
    from geoloc_ray.config import Config
    from geoloc_ray.eval.evaluate import variants
    from geoloc_ray.eval.metrics import first_per_group, retrieval_metrics

    queries, gallery = frames
    (places,) = [v for v in variants(Config()) if v.name == "moe_places"]
    assert (places.model, places.heads, places.weights, places.places) == (artifacts.MOE, tuple(PLATFORMS), "gate",
                                                                           True)
    scored = _score(places, moe, queries, gallery)
    locations = gallery["location_id"].to_numpy()
    expected = first_per_group(_by_hand(moe, queries, np.stack(gallery["moe"].to_numpy())), locations, 10)
    assert (expected[:, :4] >= 0).all() and (expected[:, 4:] == -1).all()  # 4 locations: 4 places, then none
    args = (gallery["image_id"].to_numpy(), locations, queries["image_id"].to_numpy(),
            queries["location_id"].to_numpy(), [1, 5, 10])
    assert {k: scored["metrics"][k] for k in ("location", "image")} == retrieval_metrics(expected, *args)
    assert set(scored["metrics"]) == {"location", "image", "per_platform"}
    assert set(scored["metrics"]["per_platform"]["drone"]) == {"location", "image", "queries"}


def _score(v, moe, queries, gallery):
    from geoloc_ray.eval.evaluate import score_variant

    return score_variant(v, moe, queries, gallery, PLATFORMS, [1, 5, 10], [])


def test_places_search_goes_deeper_than_its_first_guess():
    """The 40 best images are one location: the first depth (8k) holds one place, the answer needs more."""
    from geoloc_ray.eval.evaluate import places_search
    from geoloc_ray.eval.metrics import first_per_group

    rng = np.random.default_rng(1)
    query = rng.normal(size=(2, 16)).astype(np.float32)
    gallery = rng.normal(size=(300, 16)).astype(np.float32)
    order = np.argsort(-(gallery @ query[0]))
    locations = np.array([f"far{i % 97}" for i in range(300)], dtype=object)
    locations[order[:40]] = "near"
    got = places_search(query, gallery, locations, 5)
    full = np.argsort(-(query @ gallery.T), axis=1, kind="stable")
    np.testing.assert_array_equal(got, first_per_group(full, locations, 5))
    assert len({locations[i] for i in got[0]}) == 5
    assert (places_search(query, gallery, locations, 200)[:, 98:] == -1).all()  # 98 locations in all


def test_report_tables_show_moe_places_after_the_ladder():
    from geoloc_ray.eval.report import corruption_table, ladder_table, platform_table

    block = {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0, "score": 2.0}
    entry = {"location": block, "image": block, "per_platform": {"drone": {"location": block}}}
    results = {"variants": {"moe_places": entry, "moe": entry, "unified": entry},
               "corruptions": {"noise": {"1": {"moe": {"location": block}}}}}
    for table in (ladder_table(results), platform_table(results)):
        assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["unified", "moe", "moe_places"]
    assert corruption_table(results).splitlines()[2] == "| noise | 1 | - | 2.00 | - |"


def _variant(name: str):
    from geoloc_ray.config import Config
    from geoloc_ray.eval.evaluate import variants

    (v,) = [v for v in variants(Config()) if v.name == name]
    return v


def _hand_metrics(moe, queries, gallery, weights: np.ndarray) -> dict:
    from geoloc_ray.eval.metrics import retrieval_metrics

    ranked = _by_hand(moe, queries, np.stack(gallery["moe"].to_numpy()), weights)[:, :10]
    return retrieval_metrics(ranked, gallery["image_id"].to_numpy(), gallery["location_id"].to_numpy(),
                             queries["image_id"].to_numpy(), queries["location_id"].to_numpy(), [1, 5, 10])


def test_oracle_gate_puts_all_weight_on_the_querys_true_platform(moe, frames):
    from geoloc_ray import artifacts
    from geoloc_ray.eval.evaluate import encode_queries
    from geoloc_ray.eval.routing import ORACLE, oracle_weights

    queries, gallery = frames
    oracle = _variant("oracle_gate")
    assert (oracle.model, oracle.heads, oracle.weights) == (artifacts.MOE, tuple(PLATFORMS), ORACLE)
    one_hot = np.eye(3, dtype=np.float32)[[PLATFORMS.index(p) for p in queries["platform"]]]
    np.testing.assert_array_equal(encode_queries(oracle, moe, queries).gate, one_hot)
    np.testing.assert_array_equal(oracle_weights(["ground", "air"], ["drone", "ground"]), [[0, 1], [0.5, 0.5]])
    scored = _score(oracle, moe, queries, gallery)
    assert {k: scored["metrics"][k] for k in ("location", "image")} == _hand_metrics(moe, queries, gallery, one_hot)
    assert scored["gate"]["accuracy"] == 1.0 and scored["corruptions"] == {}
    assert scored["gate"]["mean_weights"]["drone"] == {"satellite": 0.0, "drone": 1.0, "ground": 0.0}


@pytest.fixture(scope="module")
def platform_gate(tmp_path_factory):
    """models/gate as training leaves it: the trunk, a head from stage 0 and the gate trained on platforms."""
    from geoloc_ray import artifacts
    from geoloc_ray.config import Config, ModelConfig
    from geoloc_ray.model import build_model, save_model

    cfg = Config(artifacts=str(tmp_path_factory.mktemp("run")))
    save_model(build_model(ModelConfig(), heads=["unified"], gate=True, seed=7),
               artifacts.model_dir(cfg, artifacts.GATE))
    return cfg


def test_platform_gate_routes_moes_experts_with_the_gate_of_models_gate(moe, frames, platform_gate):
    from geoloc_ray import artifacts
    from geoloc_ray.eval.evaluate import _platform_gate_model, encode_queries
    from geoloc_ray.eval.routing import PLATFORM_GATE

    queries, gallery = frames
    v = _variant("platform_gate")
    assert (v.model, v.heads, v.weights) == (artifacts.MOE, tuple(PLATFORMS), PLATFORM_GATE)
    gate_model = _platform_gate_model(platform_gate, [v])
    with torch.no_grad():
        expected = gate_model.gate(gate_model.text_trunk_output(queries["query"].tolist())).numpy()
        own = moe.gate(moe.text_trunk_output(queries["query"].tolist())).numpy()
    assert not np.allclose(expected, own)  # a different gate than moe's own
    qv = encode_queries(v, moe, queries, gate_model=gate_model)
    np.testing.assert_allclose(qv.gate, expected, rtol=1e-6)
    scored = score_variant_with(v, moe, queries, gallery, qv)
    assert {k: scored["metrics"][k] for k in ("location", "image")} == _hand_metrics(moe, queries, gallery, qv.gate)
    with pytest.raises(ValueError, match="models/gate"):
        encode_queries(v, moe, queries)


def score_variant_with(v, moe, queries, gallery, qv):
    from geoloc_ray.eval.evaluate import score_variant

    return score_variant(v, moe, queries, gallery, PLATFORMS, [1, 5, 10], [], qv)


def test_an_expert_alone_is_that_heads_ranking_over_the_mixed_gallery(moe, frames):
    from geoloc_ray.eval.evaluate import encode_queries
    from geoloc_ray.eval.metrics import per_query_table

    queries, gallery = frames
    cache: dict = {}
    for k, platform in enumerate(PLATFORMS):
        v = _variant(f"expert_{platform}")
        assert (v.heads, v.weights) == ((platform,), None)
        scored = score_variant_with(v, moe, queries, gallery, encode_queries(v, moe, queries, cache))
        only = np.zeros((len(queries), 3), np.float32)
        only[:, k] = 1.0  # weight 1 on this expert: its own cosine, over every gallery image
        hand = _hand_metrics(moe, queries, gallery, only)
        assert {lvl: scored["metrics"][lvl] for lvl in ("location", "image")} == hand
        table = per_query_table(queries, {v.name: scored["ranks"]})
        assert 100 * table[f"{v.name}:hit@1"].mean() == pytest.approx(hand["location"]["R@1"])
        assert 100 * table[f"{v.name}:hit@10"].mean() == pytest.approx(hand["location"]["R@10"])
    # oracle_gate reuses the experts' encodings: no new query vectors beyond the three heads
    encode_queries(_variant("oracle_gate"), moe, queries, cache)
    assert {key for key in cache if key[1] is None} == {((p,), None) for p in PLATFORMS}


def test_report_puts_routing_diagnostics_in_their_own_table_with_the_gate_matrices():
    from geoloc_ray.eval.report import ladder_table, markdown

    block = {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0, "score": 2.0}
    entry = {"location": block, "image": block, "per_platform": {"drone": {"location": block}}}
    matrix = {"mean_weights": {"drone": {"satellite": 0.1, "drone": 0.8, "ground": 0.1}}, "accuracy": 0.5}
    names = ["unified", "moe", "oracle_gate", "platform_gate", "expert_drone"]
    results = {"variants": dict.fromkeys(names, entry),
               "gate": {**matrix, "by_variant": {"moe": matrix, "platform_gate": matrix}}}
    assert [line.split("|")[1].strip() for line in ladder_table(results).splitlines()[2:]] == ["unified", "moe"]
    text = markdown(results)
    routing = text.split("## Routing diagnostics")[1].split("##")[0]
    rows = [line.split("|")[1].strip() for line in routing.splitlines() if line.startswith("|")][2:]
    assert rows == ["moe", "oracle_gate", "platform_gate", "expert_drone"]
    assert "| expert_drone | 1.00 | 3.00 | 2.00 | 2.00 |" in routing
    assert "**platform_gate** (top expert = query platform: 50.0%)" in text
    assert "| drone | 0.10 | 0.80 | 0.10 |" in text


def test_report_says_per_query_platform_whether_its_own_expert_scores_best_alone_and_why_not():
    from geoloc_ray.eval.report import markdown, own_expert_rows

    def entry(sat: float, drone: float, sat_image: float = 10.0) -> dict:
        def block(score: float) -> dict:
            return {"R@1": score, "R@5": score, "R@10": score, "score": score}

        per = {"satellite": {"location": block(sat), "image": block(sat_image), "queries": 61},
               "drone": {"location": block(drone), "image": block(drone), "queries": 366}}
        return {"location": block(drone), "image": block(drone), "per_platform": per}

    # the demo world's pattern (seed 0): the satellite expert loses to the ground expert and to aligned
    results = {"variants": {"aligned": entry(33.61, 25.41, 13.93), "moe": entry(29.51, 26.50),
                            "expert_satellite": entry(29.51, 24.04, 10.66), "expert_drone": entry(28.69, 26.64),
                            "expert_ground": entry(33.61, 23.22)}}
    rows = {r["platform"]: r for r in own_expert_rows(results)}
    assert (rows["satellite"]["best"], rows["drone"]["best"]) == ("ground", "drone")  # no ground queries: no row
    assert set(rows) == {"satellite", "drone"}
    section = markdown(results).split("### Does each platform's own expert score best alone?")[1]
    assert "| satellite | expert_ground | 33.61 | 29.51 | 33.61 |" in section
    assert "- drone queries: their own expert_drone scores best alone (26.64)." in section
    sentence = next(line for line in section.splitlines() if line.startswith("- satellite queries"))
    assert sentence.startswith("- satellite queries: expert_ground alone scores best (33.61), 4.10 above their own "
                               "expert_satellite (29.51; 61 queries, one query moves Score 0.82-1.64).")
    assert "below aligned, the head it specialises from (29.51 vs 33.61; image level 10.66 vs 13.93)" in sentence
    assert "not of the routing" in sentence
    # specialising helped, another expert is still better; a gap of one query is flagged as noise
    results["variants"]["aligned"] = entry(28.0, 25.41, 9.0)
    results["variants"]["expert_ground"] = entry(30.0, 23.22)
    sentence = next(line for line in markdown(results).splitlines() if line.startswith("- satellite queries"))
    assert "within noise" in sentence and "improves on aligned" in sentence and "expert_ground, trained on" in sentence
    # without aligned the report says what to evaluate
    del results["variants"]["aligned"]
    assert "Evaluate `aligned`" in markdown(results)


def test_queries_are_numbered_the_same_whatever_order_the_test_split_was_written_in(tmp_path):
    import pandas as pd

    from geoloc_ray import artifacts, io
    from geoloc_ray.config import Config
    from geoloc_ray.eval.evaluate import load_queries

    test = pd.DataFrame({"image_id": ["b.jpg", "a.jpg", "c.jpg"], "location_id": ["2", "1", "3"],
                         "platform": ["drone", "satellite", "ground"], "texts": [["two", "deux"], ["one"], ["three"]]})
    seen = []
    for order in ([0, 1, 2], [2, 0, 1]):
        cfg = Config(artifacts=str(tmp_path / f"run{order[0]}"))
        io.write_parquet(artifacts.prepared(cfg, "test"), test.iloc[order].reset_index(drop=True))
        seen.append(load_queries(cfg))
    pd.testing.assert_frame_equal(seen[0], seen[1])
    assert seen[0]["query"].tolist() == ["one", "two", "deux", "three"]


def test_every_variant_of_a_model_comes_from_one_trunk_pass_and_matches_the_models_own_fusion(moe, frames):
    from geoloc_ray.embedding import query_vectors
    from geoloc_ray.eval.evaluate import encode_queries

    queries, _ = frames
    texts = queries["query"].tolist()
    seen: list[int] = []
    trunk = moe.text_trunk_output
    moe.text_trunk_output = lambda t: (seen.append(len(t)), trunk(t))[1]
    try:
        cache: dict = {}
        got = {name: encode_queries(_variant(name), moe, queries, cache)
               for name in ["moe", "static_ensemble", "oracle_gate", *(f"expert_{p}" for p in PLATFORMS)]}
    finally:
        del moe.text_trunk_output
    assert sum(seen) == len(texts)  # the queries went through the trunk once, for all six variants
    gated = query_vectors(moe, texts, with_gate=True)  # the model's own fused query (fusion.fuse_query)
    np.testing.assert_allclose(got["moe"].vectors, gated.vectors, atol=1e-5)
    np.testing.assert_allclose(got["moe"].gate, gated.gate, atol=1e-6)
    np.testing.assert_allclose(got["static_ensemble"].vectors, query_vectors(moe, texts, weights="static").vectors,
                               atol=1e-5)
    for p in PLATFORMS:
        np.testing.assert_allclose(got[f"expert_{p}"].vectors, query_vectors(moe, texts, [p], None).vectors, atol=1e-5)


def test_mix_grid_holds_the_vertices_and_equal_weights():
    from geoloc_ray.eval.routing import mix_grid

    grid = mix_grid(3, 6)
    assert grid.shape == (28, 3) and np.allclose(grid.sum(1), 1) and (grid >= 0).all()
    np.testing.assert_allclose(grid[0], [1 / 3] * 3)  # equal weights first: ties go to the static ensemble
    for vertex in np.eye(3):
        assert np.isclose(grid, vertex).all(1).any()
    assert len(np.unique(grid.round(6), axis=0)) == len(grid)
    assert len(mix_grid(3, 4)) == 15 + 1  # 4 divisions: equal weights are not on the grid, so added
    with pytest.raises(ValueError, match="divisions"):
        mix_grid(3, 0)


def test_pick_mix_takes_each_platforms_best_point_on_a_fixed_input():
    from geoloc_ray.eval.routing import oracle_mix, pick_mix

    platforms = ["drone", "drone", "ground", "ground"]
    loc = np.array([[0, 12, 0, 5],   # point 0: drone Score 0.5, ground 0.75 (Score = (hit@1 + hit@10) / 2)
                    [0, 3, 20, 20],  # point 1: drone 0.75 (best), ground 0
                    [9, 9, 0, 0]])   # point 2: drone 0.5, ground 1.0 (best)
    img = loc + 1
    assert pick_mix(loc, platforms) == {"drone": 1, "ground": 2}
    grid = np.array([[1, 0], [0.5, 0.5], [0, 1]], np.float32)
    (best_loc, best_img), weights, picked = oracle_mix([(loc[g], img[g]) for g in range(3)], grid, platforms)
    np.testing.assert_array_equal(best_loc, [0, 3, 0, 0])
    np.testing.assert_array_equal(best_img, [1, 4, 1, 1])
    np.testing.assert_array_equal(weights, grid[[1, 1, 2, 2]])
    assert pick_mix(np.array([[1, 1], [1, 1]]), ["drone", "drone"]) == {"drone": 0}  # a tie: the earlier point
    with pytest.raises(ValueError, match="ranks"):
        pick_mix(loc[:, :3], platforms)


def test_oracle_mix_is_never_below_oracle_gate_or_static_ensemble(moe, frames):
    """On a fixed world: per query platform, the best grid point is at least as good as its vertex (the oracle's
    one-hot) and the equal weights (the static ensemble), both on the grid."""
    from geoloc_ray.eval.evaluate import encode_queries
    from geoloc_ray.eval.report import is_diagnostic
    from geoloc_ray.eval.routing import ORACLE_MIX

    queries, gallery = frames
    mix = _variant("oracle_mix")
    assert mix.weights == ORACLE_MIX and len(mix.grid) == 28 and is_diagnostic("oracle_mix")
    qv = encode_queries(mix, moe, queries)
    assert qv.vectors.shape[:2] == (28, len(queries))
    got = _score(mix, moe, queries, gallery)
    for other in ("oracle_gate", "static_ensemble"):
        theirs = _score(_variant(other), moe, queries, gallery)
        for platform, block in got["metrics"]["per_platform"].items():
            assert block["location"]["score"] >= theirs["metrics"]["per_platform"][platform]["location"]["score"]
    # each query platform's weights are one grid point, and its queries rank as that point ranks them by hand
    for platform, weights in got["gate"]["mean_weights"].items():
        point = np.array([weights[p] for p in PLATFORMS], np.float32)
        assert np.isclose(np.asarray(mix.grid), point, atol=1e-4).all(1).any()
        sel = (queries["platform"] == platform).to_numpy()
        hand = _hand_metrics(moe, queries[sel].reset_index(drop=True), gallery, np.tile(point, (sel.sum(), 1)))
        assert got["metrics"]["per_platform"][platform]["location"] == pytest.approx(hand["location"])
