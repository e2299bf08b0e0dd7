"""IndexShard deployment: one faiss shard of an index build, its gallery rows, and their thumbnails.

The build comes from user_config `{"index_build": <build folder name> | "latest"}`; `serve deploy` with a new
value swaps it in place (`reconfigure`): the new build is loaded and checked in a thread while the old one keeps
answering, then one assignment switches them. A build made by another model version (or with another shard
count than the app was deployed with) is refused with a clear error: at start-up the replica fails; on a swap it
keeps serving the old build and reports the refusal in `info()` (and so in /healthz).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve

from geoloc_ray import artifacts, io
from geoloc_ray.serve.fanout import ShardHits

log = logging.getLogger("ray.serve")
_HIT_COLUMNS = ["image_id", "location_id", "platform", "lat", "lon"]


@dataclass
class ShardState:
    build: str
    dim: int
    model_version: str
    shard: Any  # geoloc_ray.index.store.Shard
    rows: list[dict[str, Any]]  # this shard's gallery rows by local id
    uri_by_id: dict[str, str]  # image_id -> image_uri, the only way a thumbnail finds a file
    # (platforms) -> (how many rows they hold, faiss search params with an ID selector; None: every row)
    restrictions: dict[tuple[str, ...], tuple[int, Any]] = field(default_factory=dict)

    def restriction(self, platforms: tuple[str, ...]) -> tuple[int, Any]:
        """The rows of `platforms` as a faiss ID selector (built once per platform set, then reused)."""
        from geoloc_ray.index.store import restricted_params

        if platforms not in self.restrictions:
            ids = np.flatnonzero(np.isin([str(r["platform"]) for r in self.rows], platforms))
            params = None if len(ids) in (0, len(self.rows)) else restricted_params(self.shard.index, ids)
            self.restrictions[platforms] = (len(ids), params)
        return self.restrictions[platforms]


def resolve_build(run: str, build: str) -> str:
    """A build URI of run `run` from a build folder name or "latest"; a name is one path segment, never a path."""
    if build == "latest":
        build = io.read_json(artifacts.require(artifacts.index_latest(run), "index"))["build"]
    elif not build or "/" in build or "\\" in build or build in (".", ".."):
        raise ValueError(f"index_build must be a build folder name under {artifacts.index_dir(run)} or 'latest', "
                         f"got {build!r}")
    return artifacts.index_build(run, build)


def load_state(run: str, build: str, number: int, num_shards: int, model: dict[str, Any]) -> ShardState:
    """Read and check one shard of a build against the model's manifest (version, expert order), its shard count
    and checksum (store.check_build, store.load_shard)."""
    from geoloc_ray.index.store import check_build, load_metadata, load_shard, read_manifest

    build_uri = resolve_build(run, build)
    manifest = read_manifest(build_uri)
    check_build(manifest, model)
    if len(manifest["shards"]) != num_shards:
        raise ValueError(f"build {manifest['build']} has {len(manifest['shards'])} shards but the app was deployed "
                         f"with {num_shards}: redeploy (serve deploy with changed args) to change the shard count")
    shard = load_shard(build_uri, manifest, number)
    entry = manifest["shards"][number]
    meta = load_metadata(build_uri, manifest).iloc[entry["offset"] : entry["offset"] + entry["n"]]
    rows = meta[_HIT_COLUMNS].astype(object).to_dict("records")
    uri_by_id = dict(zip(meta["image_id"].astype(str), meta["image_uri"].astype(str), strict=True))
    return ShardState(manifest["build"], int(manifest["dim"]), manifest["model_version"], shard, rows, uri_by_id)


def thumbnail_jpeg(uri: str, px: int) -> bytes:
    """The image at `uri` fitted into px x px, as JPEG."""
    from io import BytesIO

    from PIL import Image

    with Image.open(BytesIO(io.read_bytes(uri))) as img:
        img = img.convert("RGB")
        img.thumbnail((px, px))
        out = BytesIO()
        img.save(out, "JPEG", quality=85)
    return out.getvalue()


@serve.deployment
class IndexShard:
    def __init__(self, number: int, num_shards: int, run: str, model_uri: str, storage: dict,
                 index_build: str = "latest", thumbnail_px: int = 160):
        from geoloc_ray.model import read_manifest

        io.use_storage_options(storage)
        self.number, self.num_shards, self.run = number, num_shards, run
        self.model = read_manifest(model_uri)
        self.thumbnail_px = thumbnail_px
        self.refused: dict[str, str] | None = None
        self.state = self._load(index_build)  # no build to fall back on: a bad one fails the replica
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()

    def _load(self, build: str) -> ShardState:
        return load_state(self.run, build, self.number, self.num_shards, self.model)

    async def reconfigure(self, user_config: dict | None) -> None:
        build = str((user_config or {}).get("index_build", "latest"))
        try:
            if resolve_build(self.run, build).rstrip("/").rsplit("/", 1)[-1] == self.state.build:
                self.refused = None  # already serving it (e.g. the call right after __init__)
                return
            state = await asyncio.to_thread(self._load, build)
        except Exception as exc:  # noqa: BLE001 - keep answering from the current build, say why loudly
            self.refused = {"index_build": build, "error": f"{type(exc).__name__}: {exc}"}
            log.error("IndexShard_%d: refusing index build %r, still serving %s: %s",
                      self.number, build, self.state.build, exc)
            return
        self.state, self.refused = state, None
        log.info("IndexShard_%d: now serving index build %s", self.number, state.build)

    def search(self, query: np.ndarray, k: int, platforms: list[str] | None = None) -> ShardHits:
        """This shard's top-k; with `platforms`, the top-k among those platforms' images (an ID selector in the
        faiss search itself, so it is the index's ranking restricted, not a filtered short list)."""
        state = self.state  # one reference for the whole call: a swap mid-request cannot mix builds
        query = np.asarray(query, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != state.dim:
            raise ValueError(f"query has {query.shape[1]} dims, index build {state.build} has {state.dim}")
        allowed, params = state.restriction(tuple(sorted(platforms))) if platforms else (len(state.rows), None)
        if not allowed:
            return ShardHits(self.number, state.build, state.model_version, [], [])
        scores, ids = state.shard.search(query, k, params)
        offset = state.shard.offset
        keep = [(float(s), int(i) - offset) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
        return ShardHits(self.number, state.build, state.model_version, [s for s, _ in keep],
                         [state.rows[i] for _, i in keep])

    async def thumbnail(self, image_id: str) -> bytes | None:
        """JPEG bytes of a gallery image found BY ID in this shard's rows; None when the id is not here."""
        state = self.state
        uri = state.uri_by_id.get(image_id)
        if uri is None:
            return None
        key = f"{state.build}/{image_id}"
        if key not in self._thumbs:
            try:
                self._thumbs[key] = await asyncio.to_thread(thumbnail_jpeg, uri, self.thumbnail_px)
            except Exception as exc:  # noqa: BLE001 - a broken gallery file is reported as missing, not fatal
                log.warning("IndexShard_%d: cannot read gallery image %s (%s): %s", self.number, image_id, uri, exc)
                return None
            if len(self._thumbs) > 512:
                self._thumbs.popitem(last=False)
        return self._thumbs[key]

    def info(self) -> dict[str, Any]:
        s = self.state
        return {"shard": self.number, "index_build": s.build, "n": len(s.rows), "model_version": s.model_version,
                "refused": self.refused}
