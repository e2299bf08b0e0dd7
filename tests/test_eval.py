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


def _by_hand(moe, queries, gallery_vectors: np.ndarray) -> np.ndarray:
    """sum_k g_k(q) cos(t_k(q), v_k(I)), ranked: the method's definition, one expert at a time."""
    dim = moe.model_cfg.embed_dim
    with torch.no_grad():
        trunk = moe.text_trunk_output(queries["query"].tolist())
        gate = moe.gate(trunk).numpy()
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
