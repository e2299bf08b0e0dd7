"""One record schema for every corpus, and the platform rules that fill it in."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from geoloc_ray.config import PLATFORMS, PlatformRules

# Columns of prepared/{train,test}.parquet (refined/train.parquet adds `texts_original`).
PREPARED_COLUMNS: tuple[str, ...] = (
    "image_id", "image_uri", "platform", "location_id", "split", "texts", "lat", "lon",
)


class Record(BaseModel):
    """One image of the corpus with its texts (training captions, or test queries)."""

    model_config = ConfigDict(extra="forbid")

    image_id: str = Field(min_length=1)
    image_uri: str = Field(min_length=1)
    platform: str
    location_id: str = Field(min_length=1)
    split: str = "train"
    texts: list[str] = Field(default_factory=list)
    lat: float | None = None
    lon: float | None = None

    @field_validator("platform")
    @classmethod
    def _known_platform(cls, v: str) -> str:
        if v not in PLATFORMS:
            raise ValueError(f"platform must be one of {PLATFORMS}, got {v!r}")
        return v

    def row(self) -> dict[str, Any]:
        return self.model_dump()


class MalformedRecord(ValueError):
    """A record that cannot be read; the message names the file and the record's index or line."""

    def __init__(self, source: str, where: str, reason: str):
        super().__init__(f"{source} [{where}]: {reason}")
        self.source, self.where, self.reason = source, where, reason


@lru_cache(maxsize=32)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE)


def platform_from_path(path: str, rules: PlatformRules) -> str:
    """University-1652 file-name rules: satellite `BBBB/BBBB.jpg`, drone `image-NN.jpeg`, the rest ground."""
    norm = path.replace("\\", "/")
    if _compiled(rules.satellite).search(norm):
        return "satellite"
    if _compiled(rules.drone).search(norm):
        return "drone"
    return rules.default


def location_from_image_id(image_id: str) -> str:
    """The location (building) id is the folder: `0839/image-43.jpeg` -> `0839`."""
    parts = image_id.replace("\\", "/").strip("/").split("/")
    if len(parts) < 2:
        raise ValueError(f"image id {image_id!r} has no location folder (expected LOC/FILE)")
    return parts[-2]
