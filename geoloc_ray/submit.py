"""RoboSense Track 4 submission: one line per query, `q_id id1 ... id10` (11 fields, ids without extension)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config
from geoloc_ray.corpus.robosense import list_gallery, read_queries

log = logging.getLogger(__name__)
TOP_K = 10


class SubmissionError(ValueError):
    """A submission that would be rejected; the message names the line."""


def format_lines(query_ids: list[str], ranked_ids: list[list[str]]) -> list[str]:
    return [" ".join([qid, *ids]) for qid, ids in zip(query_ids, ranked_ids, strict=True)]


def validate_submission(lines: list[str], query_ids: list[str], gallery_ids: set[str], k: int = TOP_K) -> None:
    """Every query exactly once, in order, with k distinct known gallery ids without extension."""
    if len(lines) != len(query_ids):
        raise SubmissionError(f"{len(lines)} lines for {len(query_ids)} queries")
    for lineno, (line, qid) in enumerate(zip(lines, query_ids, strict=True), start=1):
        fields = line.split()
        if len(fields) != k + 1:
            raise SubmissionError(f"line {lineno}: {len(fields)} fields, expected {k + 1}")
        if fields[0] != qid:
            raise SubmissionError(f"line {lineno}: query id {fields[0]!r}, expected {qid!r}")
        ids = fields[1:]
        if len(set(ids)) != k:
            raise SubmissionError(f"line {lineno}: repeated gallery ids")
        unknown = [i for i in ids if i not in gallery_ids]
        if unknown:
            raise SubmissionError(f"line {lineno}: ids not in the gallery (or with an extension): {unknown[:3]}")


def diverse_top(ranked: np.ndarray, vectors: np.ndarray, k: int, max_cosine: float) -> list[list[int]]:
    """Per query, walk the ranked row ids and skip a candidate whose vector has cosine > `max_cosine` with one
    already chosen (a near-duplicate of the same place), until k are chosen; when the list runs out first,
    the best skipped ones fill the rest, so every answer still has k distinct ids.

    The flat Track 4 gallery has no location ids: similarity stands in for "one image per place".
    """
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    out = []
    for row in ranked:
        row = [int(i) for i in row if i >= 0]
        chosen: list[int] = []
        for i in row:
            if not chosen or float(np.max(unit[chosen] @ unit[i])) <= max_cosine:
                chosen.append(i)
                if len(chosen) == k:
                    break
        chosen += [i for i in row if i not in chosen][: k - len(chosen)]
        out.append(chosen)
    return out


def rank_gallery(cfg: Config, queries: np.ndarray, gallery: np.ndarray) -> list[list[int]]:
    """The top-10 row ids per query: exact PE-MoE ranking, near-duplicates skipped unless `submit.diverse` is off."""
    from geoloc_ray.index.faiss_index import exact_search

    s = cfg.submit
    if not s.diverse:
        return exact_search(queries, gallery, TOP_K)[1].tolist()
    ranked = exact_search(queries, gallery, max(s.candidates, TOP_K))[1]
    return diverse_top(ranked, gallery, TOP_K, s.max_cosine)


def run_submit(cfg: Config, queries_uri: str, gallery_uri: str, out_uri: str) -> dict[str, Any]:
    """Rank the flat gallery for each query with the trained PE-MoE model and write a validated submission."""
    import ray.data

    from geoloc_ray.embedding import embed_images, query_vectors
    from geoloc_ray.model import load_model
    from geoloc_ray.preprocess.text import clean_query
    from geoloc_ray.runtime import init_ray, use_storage

    use_storage(cfg)
    queries = read_queries(queries_uri)
    gallery = list_gallery(gallery_uri)
    model_uri = artifacts.model_dir(cfg, artifacts.MOE)
    artifacts.require(artifacts.model_manifest(cfg, artifacts.MOE), "train")
    init_ray(cfg)
    rows = ray.data.from_items([{"image_id": g.image_id, "image_uri": g.image_uri} for g in gallery])
    frame = embed_images(rows, {"embedding": (model_uri, list(cfg.model.platforms))}, cfg.index, device=cfg.device)
    skipped = sorted({g.image_id for g in gallery} - set(frame["image_id"]))
    if skipped:
        log.warning("%d gallery images could not be decoded and are left out: %s", len(skipped), skipped[:5])
    if len(frame) < TOP_K:
        raise ValueError(f"only {len(frame)} decodable gallery images: a submission needs {TOP_K} per query")
    model = load_model(model_uri).eval()
    texts = [clean_query(q.text) for q in queries]
    ranked = rank_gallery(cfg, query_vectors(model, texts).vectors, np.stack(frame["embedding"].to_numpy()))
    ids = frame["image_id"].to_numpy()
    lines = format_lines([q.query_id for q in queries], [[str(ids[j]) for j in row] for row in ranked])
    validate_submission(lines, [q.query_id for q in queries], set(map(str, ids)))
    io.write_text(out_uri, "\n".join(lines) + "\n")
    return {"out": out_uri, "queries": len(queries), "gallery": len(gallery), "skipped_images": skipped,
            "diverse": cfg.submit.diverse}
