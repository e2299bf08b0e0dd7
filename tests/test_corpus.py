import json

import pandas as pd
import pytest

from geoloc_ray.config import DataConfig, PlatformRules
from geoloc_ray.corpus.geotext import load_json_list, read_geotext
from geoloc_ray.corpus.manifest import read_manifest
from geoloc_ray.corpus.read import read_split
from geoloc_ray.corpus.records import MalformedRecord, location_from_image_id, platform_from_path
from geoloc_ray.corpus.robosense import list_gallery, read_queries

RULES = PlatformRules()


@pytest.mark.parametrize(
    "path,platform",
    [
        ("0839/0839.jpg", "satellite"),
        ("train/0839/0839.jpeg", "satellite"),
        ("0839/image-43.jpeg", "drone"),
        ("train/0839/image-01.jpeg", "drone"),
        ("0839/street-01.jpg", "ground"),
        ("0839/0840.jpg", "ground"),  # folder != stem: not the satellite tile
        ("0839/google_image-3.jpg", "ground"),
    ],
)
def test_university1652_platform_rules(path, platform):
    assert platform_from_path(path, RULES) == platform


def test_platform_rules_are_configurable():
    rules = PlatformRules(satellite=r"/sat_", drone=r"/uav_", default="ground")
    assert platform_from_path("12/sat_1.png", rules) == "satellite"
    assert platform_from_path("12/uav_1.png", rules) == "drone"
    assert platform_from_path("12/cam.png", rules) == "ground"


def test_location_is_the_folder():
    assert location_from_image_id("0839/image-43.jpeg") == "0839"
    with pytest.raises(ValueError, match="no location folder"):
        location_from_image_id("image-43.jpeg")


def test_geotext_reader_real_format(geotext_corpus):
    data = DataConfig(root=str(geotext_corpus))
    train, bad = read_split(data, "train")
    test, bad_test = read_split(data, "test")
    assert {r.platform for r in train} == {"satellite", "drone", "ground"}
    sat = next(r for r in train if r.image_id == "0001/0001.jpg")
    assert sat.platform == "satellite" and sat.location_id == "0001" and sat.split == "train"
    assert sat.image_uri == f"{geotext_corpus}/images/train/0001/0001.jpg"
    assert sat.lat == 30.0 and sat.lon == 120.0
    assert len(sat.texts) == 1 and "red gabled roof" in sat.texts[0]
    assert all(len(r.texts) == 1 and r.split == "test" for r in test) and not bad_test
    # the malformed record is reported with file and index, not dropped silently
    assert len(bad) == 1
    assert bad[0].source.endswith("train.json") and bad[0].where == f"record {len(train) + 0}"
    assert "'image'" in str(bad[0])


def test_explicit_platform_field_wins_over_file_name(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps([{"image_id": "0001/image-01.jpeg", "image": "x/0001/image-01.jpeg",
                              "caption": "c", "platform": "ground"}]))
    recs, bad = read_geotext(str(f), split="train", image_base="/img", rules=RULES)
    assert not bad and recs[0].platform == "ground"


def test_bad_platform_value_is_a_malformed_record(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps([{"image": "x/0001/a.jpg", "caption": "c", "platform": "balloon"}]))
    recs, bad = read_geotext(str(f), split="train", image_base="/img", rules=RULES)
    assert not recs and "balloon" in str(bad[0]) and "record 0" in str(bad[0])


def test_broken_json_names_file_line_and_column(tmp_path):
    f = tmp_path / "train.json"
    f.write_text('[\n {"image": "a/b.jpg",\n  "caption": }\n]')
    with pytest.raises(MalformedRecord, match=r"train.json \[line 3 col"):
        load_json_list(str(f))


def test_missing_split_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train file not found"):
        read_split(DataConfig(root=str(tmp_path)), "train")


def test_manifest_jsonl_names_bad_lines(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text("\n".join([
        json.dumps({"image": "0001/0001.jpg", "texts": ["a red roof"]}),
        "{not json",
        json.dumps({"image": "0002/image-01.jpeg", "caption": "a drone shot", "lat": 1.5, "lon": 2.5}),
        json.dumps({"image": "0003/x.jpg", "texts": "not a list"}),
    ]))
    recs, bad = read_manifest(str(f), split="train", image_base=str(tmp_path), rules=RULES)
    assert [r.platform for r in recs] == ["satellite", "drone"]
    assert recs[1].texts == ["a drone shot"] and recs[1].lat == 1.5
    assert [b.where for b in bad] == ["line 2", "line 4"]


def test_manifest_parquet(tmp_path):
    f = tmp_path / "m.parquet"
    pd.DataFrame([{"image": "s3://b/0007/0007.jpg", "texts": ["x"], "location_id": "L7"}]).to_parquet(f)
    recs, bad = read_manifest(str(f), split="test", image_base="/unused", rules=RULES)
    assert not bad and recs[0].image_uri == "s3://b/0007/0007.jpg" and recs[0].location_id == "L7"


def test_robosense_queries_and_gallery(tmp_path):
    q = tmp_path / "queries.txt"
    q.write_text("q_00001\ta red roof by a lake\nq_00002\tstreet view of a cream building\n")
    queries = read_queries(str(q))
    assert [x.query_id for x in queries] == ["q_00001", "q_00002"]
    q.write_text("q_00001\ta red roof\nq_00002 no tab here\n")
    with pytest.raises(MalformedRecord, match=r"queries.txt \[line 2\]"):
        read_queries(str(q))
    g = tmp_path / "gallery"
    g.mkdir()
    for name in ("image_0a1b2c3d.jpeg", "image_ffffffff.jpeg", "notes.txt"):
        (g / name).write_bytes(b"x")
    ids = [x.image_id for x in list_gallery(str(g), strict_names=True)]
    assert ids == ["image_0a1b2c3d", "image_ffffffff"]
    (g / "photo.jpg").write_bytes(b"x")
    with pytest.raises(MalformedRecord, match="image_<8hex>"):
        list_gallery(str(g), strict_names=True)
