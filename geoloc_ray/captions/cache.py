"""The refinement cache: JSON-lines shards under `refined/cache/`, keyed by (texts, platform, prompt, model).

Every writer adds a new uniquely named shard and never rewrites one, so concurrent actors cannot clobber each
other and a killed job loses only the batch it was computing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from typing import Any

from geoloc_ray import io

log = logging.getLogger(__name__)

SHARD_GLOB = "part-*.jsonl"


def cache_key(texts: list[str], platform: str, prompt_id: str, model_id: str) -> str:
    blob = json.dumps([list(texts), platform, prompt_id, model_id], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _new_shard_name() -> str:
    return f"part-{time.time_ns()}-{uuid.uuid4().hex[:12]}.jsonl"


def write_shard(cache_uri: str, entries: list[dict[str, Any]]) -> str | None:
    """Write entries as a new shard; locally through a temp file and a rename, so no reader sees half."""
    if not entries:
        return None
    name = _new_shard_name()
    uri = io.join(cache_uri, name)
    body = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
    if io.is_local(cache_uri):
        tmp = io.join(cache_uri, f".tmp-{name}")
        io.write_text(tmp, body)
        os.replace(tmp, uri)
    else:
        io.write_text(uri, body)  # object stores publish a put whole
    return uri


def shard_uris(cache_uri: str) -> list[str]:
    return io.glob(io.join(cache_uri, SHARD_GLOB)) if io.exists(cache_uri) else []


def _read_shard(uri: str) -> list[dict[str, Any]]:
    rows = []
    for line in io.read_text(uri).splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping a malformed line in cache shard %s", uri)
    return [r for r in rows if isinstance(r, dict) and "key" in r]


class RefineCache:
    """An in-memory view of all shards plus the entries computed since the last flush."""

    def __init__(self, uri: str):
        self.uri = uri
        self.entries: dict[str, dict[str, Any]] = {}
        self.pending: list[dict[str, Any]] = []

    def load(self) -> int:
        for shard in shard_uris(self.uri):
            for row in _read_shard(shard):
                self.entries[row["key"]] = row
        return len(self.entries)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, entry: dict[str, Any]) -> None:
        self.entries[entry["key"]] = entry
        self.pending.append(entry)

    def flush(self) -> str | None:
        uri = write_shard(self.uri, self.pending)
        self.pending = []
        return uri


def compact_cache(cache_uri: str) -> int:
    """Merge the shards into one (safe beside writers: only shards it read are removed); returns the count."""
    shards = shard_uris(cache_uri)
    if len(shards) <= 1:
        return sum(len(_read_shard(s)) for s in shards)
    merged: dict[str, dict[str, Any]] = {}
    for shard in shards:
        for row in _read_shard(shard):
            merged[row["key"]] = row
    write_shard(cache_uri, list(merged.values()))
    for shard in shards:  # killed here: some duplicates remain, which is harmless
        io.remove(shard, recursive=False)
    return len(merged)
