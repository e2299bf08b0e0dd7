"""GeoText-1652 / University-1652 JSON: `train.json` captions are strings, test captions lists of queries."""

from __future__ import annotations

import json
from typing import Any

from geoloc_ray import io
from geoloc_ray.config import PLATFORMS, PlatformRules
from geoloc_ray.corpus.records import MalformedRecord, Record, location_from_image_id, platform_from_path


def load_json_list(uri: str) -> list[Any]:
    """The whole file as a JSON list; a syntax error names the file, line and column."""
    text = io.read_text(uri)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedRecord(uri, f"line {exc.lineno} col {exc.colno}", f"not valid JSON: {exc.msg}") from None
    if not isinstance(data, list):
        raise MalformedRecord(uri, "top level", f"expected a JSON list of records, got {type(data).__name__}")
    return data


def _texts(raw: dict[str, Any]) -> list[str]:
    caption = raw.get("caption")
    if isinstance(caption, str):
        return [caption]
    if isinstance(caption, list) and all(isinstance(c, str) for c in caption):
        return list(caption)
    raise ValueError(f"'caption' must be a string or a list of strings, got {type(caption).__name__}")


def parse_geotext_record(
    raw: Any, *, split: str, image_base: str, rules: PlatformRules, coords: dict[str, dict] | None = None
) -> Record:
    """One GeoText record -> Record; raises ValueError with the reason when a field is missing or wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"record must be an object, got {type(raw).__name__}")
    image_id, image = raw.get("image_id"), raw.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError("missing or empty 'image'")
    if not isinstance(image_id, str) or not image_id:
        image_id = "/".join(image.split("/")[-2:])
    platform = raw.get("platform") or platform_from_path(image_id, rules)
    if platform not in PLATFORMS:
        raise ValueError(f"'platform' must be one of {PLATFORMS}, got {platform!r}")
    location_id = str(raw.get("location_id") or location_from_image_id(image_id))
    where = (coords or {}).get(location_id, {})
    return Record(
        image_id=image_id,
        image_uri=io.resolve(image_base, image),
        platform=platform,
        location_id=location_id,
        split=split,
        texts=_texts(raw),
        lat=where.get("lat"),
        lon=where.get("lon"),
    )


def read_geotext(
    uri: str,
    *,
    split: str,
    image_base: str,
    rules: PlatformRules,
    coords: dict[str, dict] | None = None,
) -> tuple[list[Record], list[MalformedRecord]]:
    """All readable records of one file, and the malformed ones (named by file and index), never silently lost."""
    records: list[Record] = []
    bad: list[MalformedRecord] = []
    for index, raw in enumerate(load_json_list(uri)):
        try:
            records.append(parse_geotext_record(raw, split=split, image_base=image_base, rules=rules, coords=coords))
        except ValueError as exc:
            bad.append(MalformedRecord(uri, f"record {index}", _reason(exc)))
    return records, bad


def _reason(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic ValidationError: keep only the field and message
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors())
    return str(exc)
