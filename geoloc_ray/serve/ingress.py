"""SearchIngress: the HTTP face of the graph (FastAPI), fanning a query out to the experts and index shards.

POST /search: validate + clean -> QueryEncoder (trunk + gate) -> the expert heads in parallel -> fused query
-> the index shards in parallel -> merged top-k. An expert or shard that fails or times out degrades the answer
(`degraded: true`, named in `failed_experts` / `failed_shards`) instead of failing it.
"""

import asyncio
import os
import time
from importlib import resources
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Query, Request, Security
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from ray import serve

from geoloc_ray.preprocess.text import clean_query
from geoloc_ray.serve import schemas
from geoloc_ray.serve.access import KEY_HEADER, KeyGate, key_ok
from geoloc_ray.serve.breaker import Breaker, is_unavailable
from geoloc_ray.serve.errors import ApiError, BodyLimit, install_error_handlers
from geoloc_ray.serve.fanout import finite_or_none, fused_vector, pick
from geoloc_ray.serve.metrics import NoMetrics
from geoloc_ray.serve.settings import API_KEY_ENV, AppArgs, expert_deployment, shard_deployment

api = FastAPI(title="geoloc_ray", version="1",
              description="Text-to-image cross-modal geo-localization (PE-MoE): describe a place, get the "
                          "matching satellite / drone / ground images.")


def _replica() -> Any:
    """The ingress replica answering (middleware and error handlers run outside its methods); None outside one."""
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().servable_object
    except RayServeException:  # e.g. the FastAPI app under a plain test client
        return None


def _replica_metrics() -> Any:
    ingress = _replica()
    return NoMetrics() if ingress is None else ingress.metrics


def _count_invalid(request: Request) -> None:
    if request.url.path.endswith("/search"):
        _replica_metrics().answered("invalid")


def _replica_policy() -> tuple[str | None, str]:
    """(API key, docs mode) of the ingress replica answering; no key and public docs outside one."""
    ingress = _replica()
    return (None, "public") if ingress is None else (ingress.api_key, ingress.docs)


def _count_unauthorized(path: str) -> None:
    if path.endswith("/search"):
        _replica_metrics().answered("unauthorized")


install_error_handlers(api, _count_invalid)
api.add_middleware(BodyLimit)
api.add_middleware(KeyGate, policy=_replica_policy, on_reject=_count_unauthorized)  # outermost: 401 first
_api_key_header = APIKeyHeader(name=KEY_HEADER, auto_error=False,
                               description="required only when the server is configured with an API key")
_KEYED = [Security(_api_key_header)]  # documents the key in OpenAPI; KeyGate checks it before anything else


async def _call(response: Any, timeout_s: float) -> Any:
    """Await a DeploymentResponse; past the timeout cancel it and raise TimeoutError."""
    try:
        return await asyncio.wait_for(_resolve(response), timeout_s)
    except asyncio.TimeoutError:
        response.cancel()
        raise


async def _resolve(response: Any) -> Any:
    return await response


class ComponentDown(RuntimeError):
    """A component the breaker is leaving out until its probe answers."""


def _result(rank: int, score: float, row: dict[str, Any], root: str) -> dict[str, Any]:
    image_id = str(row["image_id"])
    return {"rank": rank, "image_id": image_id, "location_id": str(row["location_id"]),
            "platform": str(row["platform"]), "score": round(score, 6),
            "lat": finite_or_none(row.get("lat")), "lon": finite_or_none(row.get("lon")),
            "thumbnail_url": f"{root}/thumbnail?id={quote(image_id, safe='')}"}


# Serve pickles the class when it is decorated: every module-level name it uses must be defined above.
@serve.deployment
@serve.ingress(api)
class SearchIngress:
    def __init__(self, encoder: Any, experts: dict[str, Any], shards: list[Any], args: AppArgs):
        import torch  # the fused query is built here with the model library's fuse_query

        from geoloc_ray.serve.metrics import SearchMetrics

        torch.set_num_threads(1)
        self.encoder, self.experts, self.shards = encoder, experts, shards
        self.max_query_chars = args.max_query_chars
        self.expert_timeout_s, self.shard_timeout_s = args.expert_timeout_s, args.shard_timeout_s
        self.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        self.docs = args.docs  # KeyGate reads api_key and docs per request
        self.metrics = SearchMetrics()  # this replica's own; error handlers find it through _replica_metrics
        self.breaker = Breaker()
        self.page = resources.files("geoloc_ray.serve").joinpath("static/index.html").read_text("utf-8")

    def reconfigure(self, user_config: dict | None) -> None:
        """user_config `api_key` rotates the key without a restart (null/"" turns the check off)."""
        if user_config and "api_key" in user_config:
            self.api_key = user_config["api_key"] or None

    # ----- routes ------------------------------------------------------------------------------------------------
    @api.get("/", include_in_schema=False, response_class=HTMLResponse)
    def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz", response_model=schemas.Health)
    async def healthz(self, key: str | None = Security(_api_key_header)) -> Any:
        """Status for probes; with an API key set, the components, versions and errors only with the key."""
        calls = {"QueryEncoder": self.encoder} | {expert_deployment(p): h for p, h in self.experts.items()}
        calls |= {shard_deployment(i): h for i, h in enumerate(self.shards)}
        answers = await asyncio.gather(*[_call(h.info.remote(), 5.0) for h in calls.values()],
                                       return_exceptions=True)
        components = {name: a if isinstance(a, dict) else {"error": f"{type(a).__name__}: {a}"}
                      for name, a in zip(calls, answers, strict=True)}
        ok = not self.breaker.down and all("error" not in c and not c.get("refused") for c in components.values())
        builds = sorted({c["index_build"] for c in components.values() if "index_build" in c})
        version = components["QueryEncoder"].get("model_version")
        if not key_ok(self.api_key, key):
            return JSONResponse({"status": "ok" if ok else "degraded"})
        return {"status": "ok" if ok else "degraded", "model_version": version,
                "index_build": ",".join(builds) or None, "components": components, "down": sorted(self.breaker.down)}

    @api.post("/search", response_model=schemas.SearchResponse, responses=schemas.ERROR_RESPONSES,
              dependencies=_KEYED)
    async def search(self, body: schemas.SearchRequest, request: Request) -> dict:
        """Top-k gallery images (or places) for a description, ranked by the PE-MoE fused score."""
        start = time.perf_counter()
        try:
            answer = await self._search(body, request)
        except ApiError as exc:
            self.metrics.answered({401: "unauthorized", 503: "unavailable"}.get(exc.status, "invalid"))
            raise
        answer["took_ms"] = round((time.perf_counter() - start) * 1000, 2)
        self.metrics.answered("degraded" if answer["degraded"] else "ok", answer["took_ms"])
        return answer

    @api.get("/thumbnail", responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG thumbnail"},
                                      401: schemas.ERROR_RESPONSES[401],
                                      404: {"model": schemas.ErrorBody, "description": "no such gallery image"}},
             dependencies=_KEYED)
    async def thumbnail(self, image_id: str = Query(..., alias="id", min_length=1, max_length=512)) -> Response:
        """A gallery image, resized, found by its id in the index metadata (never by a path)."""
        answers = await asyncio.gather(*[self._guarded(shard_deployment(i), s, "thumbnail", image_id,
                                                       timeout_s=self.shard_timeout_s)
                                         for i, s in enumerate(self.shards)], return_exceptions=True)
        for data in answers:
            if isinstance(data, bytes) and data:
                return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
        if any(isinstance(a, BaseException) for a in answers):
            raise ApiError(503, "unavailable", "an index shard did not answer; try again")
        raise ApiError(404, "not_found", "no gallery image with this id")

    # ----- the search --------------------------------------------------------------------------------------------
    async def _guarded(self, name: str, handle: Any, method: str, *args: Any, timeout_s: float) -> Any:
        """One call to a component; a timeout or a dead replica marks it down (see breaker.py)."""
        if self.breaker.is_down(name):
            raise ComponentDown(f"{name} is restarting")
        try:
            return await _call(getattr(handle, method).remote(*args), timeout_s)
        except Exception as exc:
            if is_unavailable(exc):
                self.breaker.trip(name, lambda: _call(handle.info.remote(), 2.0))
            raise

    def _clean(self, query: str) -> str:
        if len(query) > self.max_query_chars:
            raise ApiError(422, "query_too_long", f"the query has {len(query)} characters; at most "
                                                  f"{self.max_query_chars} are allowed")
        try:
            query.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(422, "invalid_query", "the query is not valid Unicode (lone surrogates)") from None
        cleaned = clean_query(query)
        if not cleaned:
            raise ApiError(422, "empty_query", "the query is empty (or only whitespace / control characters)")
        return cleaned

    async def _search(self, body: schemas.SearchRequest, request: Request) -> dict:
        query = self._clean(body.query)
        try:
            enc = await self._guarded("QueryEncoder", self.encoder, "encode", query, timeout_s=self.expert_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the trunk is shared: without it nothing can answer
            self.metrics.component_failed("QueryEncoder")
            raise ApiError(503, "unavailable", f"the query encoder did not answer ({type(exc).__name__})") from exc
        vectors, failed_experts = await self._expert_vectors(enc)
        if not vectors:
            raise ApiError(503, "unavailable", f"no expert answered (failed: {', '.join(failed_experts)})")
        dim = len(next(iter(vectors.values())))
        qvec, used = fused_vector(enc.gate, enc.platforms, vectors, dim)
        ranked, builds, failed_shards = await self._ranked(qvec, body, enc.model_version)
        root = request.scope.get("root_path", "").rstrip("/")
        results = [_result(rank, score, row, root) for rank, (score, row) in
                   enumerate(ranked[body.offset:], start=body.offset + 1)]
        return {"query": query, "k": body.k, "offset": body.offset, "group_by": body.group_by,
                "platforms": sorted(set(body.platforms)) if body.platforms else None, "results": results,
                "gate": dict(zip(enc.platforms, enc.gate, strict=True)),
                "weights_used": dict(zip(enc.platforms, used, strict=True)),
                "degraded": bool(failed_experts or failed_shards), "failed_experts": failed_experts,
                "failed_shards": failed_shards, "model_version": enc.model_version, "index_build": builds}

    async def _ranked(self, qvec: Any, body: schemas.SearchRequest,
                      model_version: str) -> tuple[list[Any], str, list[int]]:
        """The first offset + k results, searching deeper until that many places (group_by location) are found
        or the (platform-restricted) gallery is exhausted: a top-k is never cut short to fill a page."""
        needed = body.offset + body.k
        depth = needed if body.group_by == "image" else 4 * needed  # a guess at images per place; grows x4
        platforms = sorted(set(body.platforms)) if body.platforms else None
        failed_all: set[int] = set()
        while True:
            hits, failed = await self._shard_hits(qvec, depth, platforms, model_version)
            failed_all.update(failed)
            if not hits:
                raise ApiError(503, "unavailable", "no index shard answered")
            ranked, final = pick(hits, depth, needed, body.group_by)
            if final:
                return ranked, ",".join(sorted({h.build for h in hits})), sorted(failed_all)
            depth *= 4

    async def _expert_vectors(self, enc: Any) -> tuple[dict[str, Any], list[str]]:
        names = [p for p in enc.platforms if p in self.experts]
        answers = await asyncio.gather(*[self._guarded(expert_deployment(p), self.experts[p], "embed", enc.trunk,
                                                       timeout_s=self.expert_timeout_s)
                                         for p in names], return_exceptions=True)
        vectors, failed = {}, [p for p in enc.platforms if p not in self.experts]
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, BaseException) or answer.model_version != enc.model_version:
                failed.append(name)
                self.metrics.component_failed(expert_deployment(name))
            else:
                vectors[name] = answer.vector
        return vectors, failed

    async def _shard_hits(self, qvec: Any, k: int, platforms: list[str] | None,
                          model_version: str) -> tuple[list[Any], list[int]]:
        answers = await asyncio.gather(*[self._guarded(shard_deployment(i), s, "search", qvec, k, platforms,
                                                       timeout_s=self.shard_timeout_s)
                                         for i, s in enumerate(self.shards)], return_exceptions=True)
        hits, failed = [], []
        for number, answer in enumerate(answers):
            if isinstance(answer, BaseException) or answer.model_version != model_version:
                failed.append(number)
                self.metrics.component_failed(shard_deployment(number))
            else:
                hits.append(answer)
        return hits, failed

