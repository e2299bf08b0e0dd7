"""The refinement vocabulary: attribute classes, per-platform visibility and phrasing, forbidden directions.

The packaged `vocabulary.yaml` is the default; a user file is merged on top (mappings merge, lists replace,
a `key+` list appends) and the result is validated once, so a bad regex or an unknown attribute fails at load.
"""

from __future__ import annotations

import hashlib
import re
from functools import cached_property
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from geoloc_ray.config import PLATFORMS

PACKAGED_VOCABULARY = "vocabulary.yaml"


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"bad regex {pattern!r}: {exc}") from None


def _check_patterns(patterns: list[str]) -> list[str]:
    for p in patterns:
        _compile(p)
    return patterns


class AttributeClass(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str
    patterns: list[str] = Field(min_length=1)

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        return _check_patterns(v)


class PlatformStyle(BaseModel):
    model_config = ConfigDict(extra="forbid")

    view: str
    templates: list[str] = Field(min_length=1)

    @field_validator("templates")
    @classmethod
    def _has_slot(cls, v: list[str]) -> list[str]:
        for t in v:
            if "{text}" not in t:
                raise ValueError(f"template {t!r} has no {{text}} slot")
        return v


class Vocabulary(BaseModel):
    """A validated vocabulary; regexes are compiled lazily and cached on the instance."""

    model_config = ConfigDict(extra="forbid", frozen=True, ignored_types=(cached_property,))

    version: int = 1
    attributes: dict[str, AttributeClass] = Field(min_length=1)
    visibility: dict[str, list[str]]
    styles: dict[str, PlatformStyle]
    normalize: list[tuple[str, str]] = Field(default_factory=list)
    filler: list[str] = Field(default_factory=list)
    directional: list[str] = Field(default_factory=list)
    clause_split: str = r",\s*|;\s*|\s+and\s+"
    fallback_keep: int = Field(2, ge=1)

    @field_validator("filler", "directional")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        return _check_patterns(v)

    @field_validator("normalize")
    @classmethod
    def _check_normalize(cls, v: list[tuple[str, str]]) -> list[tuple[str, str]]:
        _check_patterns([p for p, _ in v])
        return v

    @model_validator(mode="after")
    def _check_platforms(self) -> Vocabulary:
        for section in ("visibility", "styles"):
            missing = set(PLATFORMS) - set(getattr(self, section))
            if missing:
                raise ValueError(f"{section} lacks platform(s) {sorted(missing)}")
        for platform, names in self.visibility.items():
            unknown = set(names) - set(self.attributes)
            if unknown:
                raise ValueError(f"visibility.{platform} names unknown attribute(s) {sorted(unknown)}")
        _compile(self.clause_split)
        for platform, style in self.styles.items():
            for t in style.templates:
                if any(_compile(p).search(t) for p in self.directional):
                    raise ValueError(f"styles.{platform} template {t!r} contains a directional word")
        return self

    @cached_property
    def attribute_regex(self) -> dict[str, re.Pattern]:
        return {
            name: _compile("|".join(f"(?:{p})" for p in a.patterns)) for name, a in self.attributes.items()
        }

    @cached_property
    def normalize_regex(self) -> list[tuple[re.Pattern, str]]:
        return [(_compile(p), repl) for p, repl in self.normalize]

    @cached_property
    def filler_regex(self) -> re.Pattern | None:
        return _compile("|".join(f"(?:{p})" for p in self.filler)) if self.filler else None

    @cached_property
    def directional_regex(self) -> re.Pattern | None:
        return _compile("|".join(f"(?:{p})" for p in self.directional)) if self.directional else None

    @cached_property
    def clause_regex(self) -> re.Pattern:
        return _compile(self.clause_split)

    def visible(self, platform: str) -> set[str]:
        return set(self.visibility[platform])

    def with_directional(self, extra: list[str]) -> Vocabulary:
        """A copy that also forbids `extra` (e.g. the config's `preprocess.directional_phrases`)."""
        merged = self.directional + [p for p in extra if p not in self.directional]
        return Vocabulary.model_validate({**self.model_dump(), "directional": merged})

    def fingerprint(self) -> str:
        """Short hash of the whole vocabulary: part of the cache key, so an edit invalidates old entries."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


def merge_vocabulary(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key, other values replace, and a `key+` list is appended to `key`."""
    out = dict(base)
    for key, value in override.items():
        if key.endswith("+"):
            name = key[:-1]
            if not isinstance(value, list):
                raise ValueError(f"'{key}' must be a list to append")
            out[name] = list(out.get(name) or []) + value
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_vocabulary(out[key], value)
        else:
            out[key] = value
    return out


def packaged_vocabulary_text() -> str:
    return resources.files("geoloc_ray.captions").joinpath(PACKAGED_VOCABULARY).read_text(encoding="utf-8")


def load_vocabulary(path: str | None = None) -> Vocabulary:
    """The packaged vocabulary, extended/overridden by the YAML file (local path or URI) at `path`."""
    raw = yaml.safe_load(packaged_vocabulary_text())
    if path:
        from geoloc_ray import io

        user = yaml.safe_load(io.read_text(path)) or {}
        if not isinstance(user, dict):
            raise ValueError(f"{path}: a vocabulary file must be a mapping, got {type(user).__name__}")
        raw = merge_vocabulary(raw, user)
    try:
        return Vocabulary.model_validate(raw)
    except ValueError as exc:
        raise ValueError(f"invalid refine vocabulary ({path or 'packaged'}): {exc}") from None
