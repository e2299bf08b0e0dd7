"""The prepare stage end to end on a local Ray instance, on local disk and on a real S3 endpoint (moto)."""

import json

import pytest

from geoloc_ray import io
from geoloc_ray.config import config_from_dict
from geoloc_ray.preprocess.prepare import run_prepare
from geoloc_ray.preprocess.text import default_directional_phrases, is_directional
from tests.helpers import free_port, make_geotext_corpus

pytestmark = pytest.mark.ray


def _check_outputs(artifacts: str):
    train = io.read_parquet(io.join(artifacts, "prepared", "train.parquet"))
    test = io.read_parquet(io.join(artifacts, "prepared", "test.parquet"))
    assert sorted(train.columns) == sorted(
        ["image_id", "image_uri", "platform", "location_id", "split", "texts", "lat", "lon"])
    assert len(train) == 6 and len(test) == 3  # 2 train locations x 3 platforms; corrupt + missing skipped
    assert sorted(train["platform"].unique()) == ["drone", "ground", "satellite"]
    for texts in train["texts"]:
        assert len(texts) >= 2
        assert not any(is_directional(t, default_directional_phrases()) for t in texts)
        assert not any("lake" in t for t in texts)  # the lake was only in a directional sentence
    assert set(test["location_id"]) == {"0003"} and all(len(t) == 1 for t in test["texts"])
    assert train.set_index("image_id").loc["0001/0001.jpg", "lat"] == 30.0
    skipped = io.read_jsonl(io.join(artifacts, "prepared", "skipped.jsonl"))
    by_id = {r.get("image_id") or r["where"]: r for r in skipped}
    assert by_id["0002/image-02.jpeg"]["reason"].startswith("corrupt")
    assert by_id["0002/image-03.jpeg"]["reason"] == "missing"
    malformed = [r for r in skipped if r.get("malformed")]
    assert len(malformed) == 1 and malformed[0]["source"].endswith("train.json")
    assert malformed[0]["where"] == "record 8"
    summary = io.read_json(io.join(artifacts, "prepared", "summary.json"))
    assert summary["skipped_images"] == 2 and summary["malformed_records"] == 1


def test_prepare_local(ray_session, tmp_path):
    root = tmp_path / "corpus"
    make_geotext_corpus(root)
    cfg = config_from_dict({"data": {"root": str(root)}, "artifacts": str(tmp_path / "art")})
    summary = run_prepare(cfg)
    assert summary["rows"]["train"] == {"satellite": 2, "drone": 2, "ground": 2}
    _check_outputs(str(tmp_path / "art"))
    run_prepare(cfg)  # a rerun replaces its outputs instead of appending to them
    _check_outputs(str(tmp_path / "art"))


@pytest.fixture
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_prepare_reads_and_writes_s3(ray_session, tmp_path, s3_endpoint):
    import s3fs

    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**opts)
    fs.mkdir("geoloc")
    root = tmp_path / "corpus"
    make_geotext_corpus(root)
    fs.put(str(root), "geoloc/corpus", recursive=True)
    cfg = config_from_dict({
        "data": {"root": "s3://geoloc/corpus", "storage_options": {"s3": opts}},
        "artifacts": "s3://geoloc/runs/r1",
    })
    run_prepare(cfg)
    assert fs.exists("geoloc/runs/r1/prepared/train.parquet")
    assert not (tmp_path / "s3:").exists()  # nothing leaked to local disk
    _check_outputs("s3://geoloc/runs/r1")
    train = io.read_parquet("s3://geoloc/runs/r1/prepared/train.parquet")
    assert all(u.startswith("s3://geoloc/corpus/images/train/") for u in train["image_uri"])
    assert json.loads(fs.cat("geoloc/runs/r1/prepared/summary.json"))["rows"]["test"]["satellite"] == 1
