"""The embedding module: the one query-vector helper, image embedding with pixel views, and its place in the
layers (it imports nothing from train/ or eval/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.helpers import assert_close_scaled, write_jpeg  # noqa: E402

PLATFORMS = ["satellite", "drone", "ground"]
TEXTS = ["a tall white office tower", "red brick house", "a stadium next to a river", "a park", "a bridge"]


@pytest.fixture(scope="module")
def moe():
    from geoloc_ray.config import ModelConfig
    from geoloc_ray.model import build_model

    torch.set_num_threads(2)
    return build_model(ModelConfig(), heads=PLATFORMS, gate=True, seed=0).eval()


@pytest.fixture(scope="module")
def saved_moe(moe, tmp_path_factory) -> str:
    from geoloc_ray.config import Config
    from geoloc_ray.model import save_model

    uri = str(tmp_path_factory.mktemp("run") / "models" / "moe")
    save_model(moe, uri, Config())
    return uri


def test_embedding_imports_nothing_above_it():
    code = ("import sys, geoloc_ray.embedding; "
            "bad = [m for m in sys.modules if m.startswith(('geoloc_ray.train', 'geoloc_ray.eval'))]; "
            "assert not bad, bad; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_query_vectors_match_the_model_in_every_mode(moe):
    from geoloc_ray.embedding import query_vectors

    with torch.no_grad():
        trunk = moe.text_trunk_output(TEXTS)
        single = moe.text_head("drone", trunk)
        fused = moe.fused_query(trunk, weights="gate")
        static = moe.fused_query(trunk, weights="static", heads=PLATFORMS[:2])
        gate = moe.gate(trunk)
    out = query_vectors(moe, TEXTS, ["drone"], weights=None, batch_size=2)  # batches of 2, 2 and 1
    assert out.vectors.dtype == np.float32 and out.gate is None
    assert_close_scaled(torch.from_numpy(out.vectors), single)
    gated = query_vectors(moe, TEXTS, with_gate=True, batch_size=3)
    assert gated.vectors.shape == (len(TEXTS), 3 * moe.model_cfg.embed_dim)
    assert_close_scaled(torch.from_numpy(gated.vectors), fused)
    assert_close_scaled(torch.from_numpy(gated.gate), gate)
    assert_close_scaled(torch.from_numpy(query_vectors(moe, TEXTS, PLATFORMS[:2], "static").vectors), static)


def test_query_vectors_of_no_texts_and_a_bad_request(moe):
    from geoloc_ray.embedding import query_vectors

    assert query_vectors(moe, [], ["ground"], weights=None).vectors.shape == (0, moe.model_cfg.embed_dim)
    assert query_vectors(moe, []).vectors.shape == (0, 3 * moe.model_cfg.embed_dim)
    with pytest.raises(ValueError, match="one head"):
        query_vectors(moe, TEXTS, PLATFORMS, weights=None)


def test_image_embedder_adds_a_column_per_view_and_drops_undecodable_rows(moe, saved_moe, tmp_path: Path):
    from geoloc_ray.embedding import ImageEmbedder, image_vectors, input_size, view_column

    size = input_size(moe)
    uris = []
    for i, color in enumerate([(200, 40, 40), (20, 160, 90), (10, 10, 220)]):
        write_jpeg(tmp_path / f"{i}.jpg", color, size)
        uris.append(str(tmp_path / f"{i}.jpg"))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    uris.insert(1, str(tmp_path / "broken.jpg"))

    def invert(px: np.ndarray) -> np.ndarray:
        assert len(px), "views only see decoded pixels"
        return 255 - px

    embedder = ImageEmbedder({"emb": (saved_moe, PLATFORMS)}, views={"inverted": invert})
    out = embedder({"image_id": np.array(["a", "broken", "b", "c"]), "image_uri": np.array(uris)})
    assert list(out["image_id"]) == ["a", "b", "c"]
    from geoloc_ray.preprocess.images import decode_pixels

    pixels, ok = decode_pixels([uris[i] for i in (0, 2, 3)], size)
    assert ok == [True, True, True]
    np.testing.assert_allclose(out["emb"], image_vectors(moe, pixels, PLATFORMS), atol=1e-5)
    np.testing.assert_allclose(out[view_column("emb", "inverted")], image_vectors(moe, invert(pixels), PLATFORMS),
                               atol=1e-5)
    empty = embedder({"image_id": np.array(["broken"]), "image_uri": np.array([uris[1]])})
    assert empty["emb"].shape == empty[view_column("emb", "inverted")].shape == (0, 3 * moe.model_cfg.embed_dim)


def test_decode_pixels_reports_broken_and_missing_files(tmp_path: Path):
    from geoloc_ray.preprocess.images import decode_pixels

    write_jpeg(tmp_path / "ok.jpg", size=16)
    (tmp_path / "bad.jpg").write_bytes(b"")
    pixels, ok = decode_pixels([tmp_path / "ok.jpg", tmp_path / "bad.jpg", tmp_path / "missing.jpg"], 8)
    assert ok == [True, False, False]
    assert pixels.shape == (3, 8, 8, 3) and pixels.dtype == np.uint8 and not pixels[1:].any()


def test_embedding_actor_uses_the_device_it_was_given(saved_moe, ray_session, monkeypatch):
    """CPU here (no GPU, or a Ray worker given none); CUDA only when torch sees one and Ray did not withhold it;
    `device: cpu` keeps it on the CPU even then."""
    import ray

    from geoloc_ray import devices, embedding

    embedder = embedding.ImageEmbedder({"emb": (saved_moe, PLATFORMS)}, bf16=True, compile=True)
    assert embedder.device == "cpu" and next(iter(embedder.models.values()))[0].device.type == "cpu"
    assert ray.get(ray.remote(num_cpus=0.1)(devices.ray_withheld_gpus).remote())  # a worker given no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device("auto") == "cuda"  # the driver (or a process outside Ray) takes what torch sees
    assert embedding.TextEmbedder({}, device="cpu").device == "cpu"
    monkeypatch.setattr(devices, "ray_gpus_assigned", lambda: False)
    assert devices.resolve_device("auto") == "cpu"


def test_decode_threads_keep_row_order_and_drop_the_same_rows(saved_moe, tmp_path: Path):
    from geoloc_ray.embedding import ImageEmbedder

    uris = []
    for i in range(7):
        write_jpeg(tmp_path / f"{i}.jpg", (30 * i, 200 - 20 * i, 90), 40)
        uris.append(str(tmp_path / f"{i}.jpg"))
    uris[4] = str(tmp_path / "missing.jpg")
    batch = {"image_id": np.array([f"r{i}" for i in range(7)]), "image_uri": np.array(uris)}
    one = ImageEmbedder({"emb": (saved_moe, PLATFORMS)})(dict(batch))
    three = ImageEmbedder({"emb": (saved_moe, PLATFORMS)}, decode_threads=3)(dict(batch))
    assert list(three["image_id"]) == list(one["image_id"]) == ["r0", "r1", "r2", "r3", "r5", "r6"]
    np.testing.assert_allclose(three["emb"], one["emb"], atol=1e-5)


def test_gpu_embedding_bench_runs_the_actor_class(tmp_path: Path):
    """The bench's CPU mode, so the GPU benchmark cannot rot between device runs."""
    import json

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(root / "bench" / "gpu_embedding.py"), "--device", "cpu", "--quick",
                    "--out", str(tmp_path)], check=True, timeout=600, capture_output=True)
    result = json.loads((tmp_path / "gpu_embedding.json").read_text())
    assert result["code"] == "geoloc_ray.embedding.ImageEmbedder" and result["device"] == "cpu"
    assert {r["actor_device"] for r in result["runs"]} == {"cpu"}
    assert all(r["images_per_s"] > 0 and r["gflops_per_image"] > 0 for r in result["runs"])


def test_decode_stage_drops_undecodable_rows_and_sizes_to_the_tower(moe, saved_moe, tmp_path: Path):
    """The CPU stage before the actors: uint8 pixels at the model's input size, broken rows gone, other columns
    kept in step; the actor then takes those pixels as they are (no second decode)."""
    from geoloc_ray.embedding import (
        ImageEmbedder,
        decode_images,
        image_vectors,
        input_size,
        models_input_size,
    )

    size = models_input_size({"emb": (saved_moe, PLATFORMS)})
    assert size == input_size(moe)
    uris = []
    for i in range(3):
        write_jpeg(tmp_path / f"{i}.jpg", (60 * i, 90, 200 - 50 * i), 2 * size + 10)  # resized (draft-decoded)
        uris.append(str(tmp_path / f"{i}.jpg"))
    uris.insert(2, str(tmp_path / "missing.jpg"))
    out = decode_images({"image_id": np.array(["a", "b", "gone", "c"]), "image_uri": np.array(uris)}, size)
    assert list(out["image_id"]) == ["a", "b", "c"] and len(out["image_uri"]) == 3
    assert out["pixels"].shape == (3, size, size, 3) and out["pixels"].dtype == np.uint8
    embedded = ImageEmbedder({"emb": (saved_moe, PLATFORMS)})(dict(out))
    assert list(embedded["image_id"]) == ["a", "b", "c"] and "pixels" not in embedded
    np.testing.assert_allclose(embedded["emb"], image_vectors(moe, out["pixels"], PLATFORMS), atol=1e-5)


def test_uint8_pixels_normalised_on_the_device_match_the_host_path(moe):
    """model_pixels copies uint8 and normalises where the model is; the values are the host conversion's."""
    from geoloc_ray.embedding import model_pixels
    from geoloc_ray.model import image_preprocess

    size = image_preprocess(moe).size
    pixels = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    on_device = model_pixels(moe, pixels)
    host = image_preprocess(moe)(pixels)
    assert on_device.device == moe.device and on_device.dtype == torch.float32
    torch.testing.assert_close(on_device, host)


def test_text_embedder_batches_by_the_config_key(saved_moe, moe, monkeypatch):
    """`index.text_batch_size` reaches the trunk calls (was a hard-coded 256)."""
    from geoloc_ray import embedding
    from geoloc_ray.config import IndexConfig

    assert IndexConfig(text_batch_size=3).text_batch_size == 3
    calls = []
    real = embedding.query_vectors
    monkeypatch.setattr(embedding, "query_vectors",
                        lambda *a, **k: calls.append(k["batch_size"]) or real(*a, **k))
    embedder = embedding.TextEmbedder({p: (saved_moe, p) for p in PLATFORMS}, batch_size=2)
    out = embedder({"query": np.array(TEXTS), "platform": np.array(["drone"] * len(TEXTS))})
    assert calls == [2] and out["embedding"].shape == (len(TEXTS), moe.model_cfg.embed_dim)
    expected = real(moe, TEXTS, ["drone"], weights=None).vectors
    np.testing.assert_allclose(out["embedding"], expected, atol=1e-5)
