"""Read a corpus split in any supported format from `data.root` (local path or fsspec URI)."""

from __future__ import annotations

from geoloc_ray import io
from geoloc_ray.config import DataConfig
from geoloc_ray.corpus.geotext import read_geotext
from geoloc_ray.corpus.manifest import read_manifest
from geoloc_ray.corpus.records import MalformedRecord, Record


def load_coordinates(data: DataConfig) -> dict[str, dict]:
    """Optional sidecar `{location_id: {"lat", "lon", ...}}`; absent means no coordinates."""
    if not data.locations_file:
        return {}
    uri = io.resolve(data.root, data.locations_file)
    if not io.exists(uri):
        return {}
    coords = io.read_json(uri)
    if not isinstance(coords, dict):
        raise MalformedRecord(uri, "top level", "expected an object keyed by location id")
    return coords


def read_split(data: DataConfig, split: str) -> tuple[list[Record], list[MalformedRecord]]:
    """Records of `train` or `test`, plus the malformed ones (each named by file and index or line)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    uri = io.resolve(data.root, data.train_file if split == "train" else data.test_file)
    if not io.exists(uri):
        raise FileNotFoundError(f"{split} file not found: {uri} (data.root={data.root})")
    image_base = io.resolve(data.root, data.image_root)
    if data.format == "geotext":
        return read_geotext(
            uri, split=split, image_base=image_base, rules=data.platform_rules, coords=load_coordinates(data)
        )
    if data.format == "manifest":
        return read_manifest(uri, split=split, image_base=image_base, rules=data.platform_rules)
    raise ValueError(
        "data.format 'robosense' has no training records: use `geoloc-ray submit --queries --gallery` for it"
    )
