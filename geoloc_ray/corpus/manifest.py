"""A plain manifest (JSONL or parquet): one row per image, for corpora that are not in GeoText layout."""

from __future__ import annotations

import json
from typing import Any

from geoloc_ray import io
from geoloc_ray.config import PlatformRules
from geoloc_ray.corpus.geotext import _reason
from geoloc_ray.corpus.records import MalformedRecord, Record, location_from_image_id, platform_from_path


def _row_to_record(row: dict[str, Any], *, split: str, image_base: str, rules: PlatformRules) -> Record:
    image = row.get("image_uri") or row.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError("missing 'image' (or 'image_uri')")
    image_id = row.get("image_id") or "/".join(image.split("/")[-2:])
    texts = row.get("texts")
    if texts is None:
        caption = row.get("caption")
        texts = [caption] if isinstance(caption, str) else caption
    if texts is None:
        texts = []
    if hasattr(texts, "tolist"):
        texts = texts.tolist()
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError("'texts' must be a list of strings (or 'caption' a string)")
    return Record(
        image_id=str(image_id),
        image_uri=io.resolve(image_base, image),
        platform=row.get("platform") or platform_from_path(str(image_id), rules),
        location_id=str(row.get("location_id") or location_from_image_id(str(image_id))),
        split=str(row.get("split") or split),
        texts=texts,
        lat=_float_or_none(row.get("lat")),
        lon=_float_or_none(row.get("lon")),
    )


def _float_or_none(v: Any) -> float | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    return float(v)


def read_manifest(
    uri: str, *, split: str, image_base: str, rules: PlatformRules
) -> tuple[list[Record], list[MalformedRecord]]:
    """JSONL (line numbers in errors) or parquet (row numbers in errors)."""
    records: list[Record] = []
    bad: list[MalformedRecord] = []
    if uri.endswith(".parquet"):
        rows = [(f"row {i}", r) for i, r in enumerate(io.read_parquet(uri).to_dict("records"))]
    else:
        rows = []
        for lineno, line in enumerate(io.read_text(uri).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                bad.append(MalformedRecord(uri, f"line {lineno}", f"not valid JSON: {exc.msg}"))
    for where, row in rows:
        try:
            if not isinstance(row, dict):
                raise ValueError(f"row must be an object, got {type(row).__name__}")
            records.append(_row_to_record(row, split=split, image_base=image_base, rules=rules))
        except ValueError as exc:
            bad.append(MalformedRecord(uri, where, _reason(exc)))
    return records, bad
