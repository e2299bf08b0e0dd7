"""Eval off the driver: the vectors on storage, the searches in Ray tasks, the hit ranks back to the driver.

1. Ray Data embeds the test gallery on the embedding actor pool (`index.*` resources: GPUs when
   `index.actors.num_gpus`): each image is decoded once, corrupted per view, and every view goes through each
   distinct frozen image trunk once, every model's heads applied to that output; the vectors are written to
   `eval/work/gallery`.
2. Ray Data encodes the test queries the same way (`eval/queries.py`): one text-trunk pass for every model's
   heads and gates, written to `eval/work/queries`.
3. One Ray task per (block of queries, model) streams the gallery files and returns hit ranks (`eval/search.py`).

The driver keeps the query table, file lists and per-query ranks: its memory does not grow with the gallery.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config
from geoloc_ray.eval.corruptions import corrupt
from geoloc_ray.eval.evaluate import Variant, _columns_for, corruption_view
from geoloc_ray.eval.queries import QueryModel, query_embedding_dataset, vector_columns
from geoloc_ray.eval.report import is_diagnostic
from geoloc_ray.eval.routing import MIX_POINT, ORACLE_MIX, PLATFORM_GATE, oracle_mix
from geoloc_ray.eval.search import Probe, gallery_stats, search_block
from geoloc_ray.index.stream import as_fixed_size_list, list_parts
from geoloc_ray.train.mining_tasks import query_blocks

log = logging.getLogger(__name__)

QUERIES_PER_TASK = 20_000  # a task per (block, model): each streams the whole gallery once for its block
GALLERY_COLUMNS = ["image_id", "location_id"]


@dataclass(frozen=True)
class Found:
    """What the searches return: per variant and view (None = clean) each query's (location, image) hit ranks in
    query order, each routed variant's weights, and the gallery's counts."""

    ranks: dict[str, dict[str | None, tuple[np.ndarray, np.ndarray]]]
    weights: dict[str, np.ndarray]
    gallery: dict[str, Any]


def probes(chosen: list[Variant], heads: dict[str, list[str]], corruptions: list[tuple[str, int]],
           embed_dims: dict[str, int]) -> dict[str, list[Probe]]:
    """Each model's variants as search probes: the gallery columns they score, the views they are scored on
    (corruptions for ladder variants, not diagnostics) and where their routing weights come from."""
    views = tuple(corruption_view(k, s) for k, s in corruptions)
    out: dict[str, list[Probe]] = {}
    for v in chosen:
        gate = None
        if v.weights == "gate":
            gate = (v.model, v.heads)
        elif v.weights == PLATFORM_GATE:
            gate = (artifacts.GATE, v.heads)
        columns = tuple(int(c) for c in _columns_for(v, heads[v.model], embed_dims[v.model]))
        if v.weights == ORACLE_MIX:  # one probe per grid point, clean view; `pick_mixes` keeps each platform's best
            out.setdefault(v.model, []).extend(Probe(f"{v.name}{MIX_POINT}{i}", v.heads, "fixed", columns, (None,),
                                                     fixed=w) for i, w in enumerate(v.grid))
            continue
        out.setdefault(v.model, []).append(Probe(
            v.name, v.heads, v.weights, columns, (None, *(() if is_diagnostic(v.name) else views)), v.places,
            gate))
    return out


def pick_mixes(found: Found, chosen: list[Variant], platforms: list[str]) -> Found:
    """Each oracle_mix variant's grid-point results collapsed into one: per query platform, the best point's."""
    ranks, weights = dict(found.ranks), dict(found.weights)
    for v in [v for v in chosen if v.weights == ORACLE_MIX]:
        names = [f"{v.name}{MIX_POINT}{i}" for i in range(len(v.grid))]
        best, w, picked = oracle_mix([ranks[n][None] for n in names], np.asarray(v.grid), platforms)
        for n in names:
            ranks.pop(n), weights.pop(n, None)
        ranks[v.name], weights[v.name] = {None: best}, w
        log.info("%s: best fixed weights per query platform %s", v.name,
                 {p: [round(x, 3) for x in v.grid[i]] for p, i in picked.items()})
    return Found(ranks, weights, found.gallery)


def query_models(chosen: list[Variant], models: dict[str, tuple[str, list[str]]], gate_uri: str | None,
                 gate_temperature: float = 1.0) -> dict[str, QueryModel]:
    """What the query encoder computes: each model's heads, its gate where a variant routes with it, and the
    platform-label gate (models/gate, no heads) for `platform_gate`, routing at the MoE's temperature
    (`model.gate_temperature`): the gate the fused tuning starts from."""
    out = {}
    for name, (uri, heads) in models.items():
        routed = [v for v in chosen if v.model == name and v.weights == "gate"]
        out[name] = QueryModel(uri, tuple(heads), routed[0].heads if routed else None)
        if routed:
            _check_gate(uri, routed[0].heads, f"variant {routed[0].name!r} routes with the model's gate, but {name}")
    platform = [v.heads for v in chosen if v.weights == PLATFORM_GATE]
    if platform:
        if gate_uri is None:
            raise ValueError("platform_gate needs the platform-label gate (models/gate)")
        _check_gate(gate_uri, platform[0], "the platform gate (models/gate)")
        out[artifacts.GATE] = QueryModel(gate_uri, (), platform[0], gate_temperature)
    return out


def _check_gate(uri: str, order: tuple[str, ...], who: str) -> None:
    """From the manifest, before any actor starts: the model has a gate weighing every expert of `order`."""
    from geoloc_ray.model import read_manifest

    manifest = read_manifest(uri)
    if not manifest["gate"]:
        raise ValueError(f"{who} has no gate")
    missing = [p for p in order if p not in manifest["platforms"]]
    if missing:
        raise ValueError(f"{who} has no gate weight for expert(s) {missing}")


def _plain(table, columns: list[str]):
    """Vector columns as fixed-size lists (the search tasks read them with pyarrow alone)."""
    for column in columns if table.num_rows else ():
        table = as_fixed_size_list(table, column)
    return table


def write_gallery(cfg: Config, models: dict[str, tuple[str, list[str]]], corruptions: list[tuple[str, int]]) -> str:
    """The test images under every model, clean and corrupted (one Ray Data pass), streamed to storage."""
    from geoloc_ray.embedding import embedding_dataset, view_column

    ds = io.read_dataset_parquet(artifacts.prepared(cfg, "test"),
                                 columns=["image_id", "image_uri", "location_id", "platform"])
    views = {corruption_view(k, s): partial(corrupt, kind=k, severity=s) for k, s in corruptions}
    columns = [c for m in models for c in (m, *(view_column(m, v) for v in views))]
    out = embedding_dataset(ds, models, cfg.index, views, device=cfg.device).select_columns(
        [*GALLERY_COLUMNS, *columns])
    uri = artifacts.eval_gallery_embeddings(cfg)
    io.write_dataset_parquet(out.map_batches(_plain, fn_kwargs={"columns": columns}, batch_format="pyarrow",
                                             num_cpus=0.25), uri)
    return uri


def write_queries(cfg: Config, queries, models: dict[str, QueryModel]) -> str:
    """Every query under every model's text heads and gates, streamed to storage (rows carry their `qid`)."""
    import ray.data

    frame = queries[["query", "image_id", "location_id", "platform"]].assign(qid=np.arange(len(queries)))
    out = query_embedding_dataset(ray.data.from_pandas(frame), models, cfg.index, device=cfg.device)
    uri = artifacts.eval_query_embeddings(cfg)
    io.write_dataset_parquet(out.map_batches(_plain, fn_kwargs={"columns": vector_columns(models)},
                                             batch_format="pyarrow", num_cpus=0.25), uri)
    return uri


def search(cfg: Config, n_queries: int, query_locations: list[str], plan: dict[str, list[Probe]], max_k: int
           ) -> Found:
    """One task per (query block, model) over the files on storage, a task for the gallery's counts; the
    driver gathers the ranks as the tasks finish."""
    import ray

    storage = io.storage_options()
    gallery_parts = list_parts(artifacts.eval_gallery_embeddings(cfg))
    if not gallery_parts:
        raise ValueError("eval found no test image to search (none decodable)")
    blocks = query_blocks(list_parts(artifacts.eval_query_embeddings(cfg)), QUERIES_PER_TASK)
    task = ray.remote(search_block).options(num_cpus=cfg.index.build_num_cpus, num_gpus=cfg.index.actors.num_gpus)
    refs = [task.remote(block, gallery_parts, model, probes_, max_k, storage)
            for block in blocks for model, probes_ in plan.items()]
    stats = ray.remote(gallery_stats).options(num_cpus=cfg.index.build_num_cpus).remote(
        gallery_parts, sorted(set(query_locations)), storage)
    ranks: dict[str, dict[str | None, tuple[np.ndarray, np.ndarray]]] = {}
    weights: dict[str, np.ndarray] = {}
    pending = refs
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        block = ray.get(done[0])
        qids = block["qid"]
        for (name, view), (loc, img) in block["ranks"].items():
            slot = ranks.setdefault(name, {}).setdefault(view, (np.full(n_queries, -1, np.int32),
                                                                np.full(n_queries, -1, np.int32)))
            slot[0][qids], slot[1][qids] = loc, img
        for name, w in block["weights"].items():
            weights.setdefault(name, np.zeros((n_queries, w.shape[1]), np.float32))[qids] = w
    unfilled = [(n, v) for n, by_view in ranks.items() for v, (loc, _) in by_view.items() if (loc < 0).any()]
    if unfilled:
        raise RuntimeError(f"eval searches left queries without a result: {unfilled[:3]}")
    return Found(ranks, weights, ray.get(stats))


def evaluate_distributed(cfg: Config, queries, chosen: list[Variant], models: dict[str, tuple[str, list[str]]],
                         gate_uri: str | None, corruptions: list[tuple[str, int]], max_k: int) -> Found:
    """Embed, search, gather: the hit ranks of every variant and view; the working folder is removed after."""
    from geoloc_ray.model import read_manifest

    dims = {m: int(read_manifest(uri)["embed_dim"]) for m, (uri, _) in models.items()}
    plan = probes(chosen, {m: h for m, (_, h) in models.items()}, corruptions, dims)
    encoders = query_models(chosen, models, gate_uri, cfg.model.gate_temperature)
    write_gallery(cfg, models, corruptions)
    write_queries(cfg, queries, encoders)
    try:
        found = search(cfg, len(queries), queries["location_id"].tolist(), plan, max_k)
        return pick_mixes(found, chosen, queries["platform"].tolist())
    finally:
        io.remove(artifacts.eval_work(cfg))  # the gallery's vectors: GBs at full scale; the ranks are kept
