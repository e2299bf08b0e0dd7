"""The HTTP contract (DESIGN.md section 4) as pydantic models: validation and the OpenAPI document."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from geoloc_ray.config.sections import Platform
from geoloc_ray.serve.settings import MAX_K, MAX_OFFSET


class SearchRequest(BaseModel):
    # Unknown fields are rejected (422), so a typo such as "top_k" is not silently ignored.
    model_config = ConfigDict(extra="forbid")

    query: StrictStr = Field(description="natural-language description of the place; 1..max_query_chars "
                                         "characters (1000 by default) after whitespace normalisation")
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="how many results to return")
    group_by: Literal["image", "location"] = Field(
        "image", description="image: the top images; location: at most one image per location_id (its best), "
                             "so the k results are k distinct places")
    platforms: list[Platform] | None = Field(
        None, min_length=1, max_length=3,
        description="search only the gallery images of these platforms (the exact ranking restricted to them)")
    offset: StrictInt = Field(0, ge=0, le=MAX_OFFSET, description="skip this many results (paging)")


class SearchResult(BaseModel):
    rank: int
    image_id: str
    location_id: str
    platform: str
    score: float = Field(description="fused PE-MoE score sum_k g_k cos(t_k(q), v_k(I))")
    lat: float | None = None
    lon: float | None = None
    thumbnail_url: str


class GateWeights(BaseModel):
    satellite: float = 0.0
    drone: float = 0.0
    ground: float = 0.0


class SearchResponse(BaseModel):
    query: str = Field(description="the query as the model saw it (normalised)")
    k: int
    offset: int = 0
    group_by: str = "image"
    platforms: list[str] | None = None
    results: list[SearchResult]
    gate: GateWeights = Field(description="the gate's expert weights g(q)")
    weights_used: GateWeights = Field(description="weights the fused query used: the gate renormalised over "
                                                  "the experts that answered")
    degraded: bool = Field(description="true when an expert or index shard did not answer")
    failed_experts: list[str] = Field(default_factory=list)
    failed_shards: list[int] = Field(default_factory=list)
    model_version: str
    index_build: str
    took_ms: float


class ErrorBody(BaseModel):
    error: str = Field(description="a short machine-readable code, e.g. invalid_request")
    detail: str = Field(description="what was wrong, for a human")
    errors: list[dict] | None = Field(None, description="per-field problems, for validation errors")


class Health(BaseModel):
    """With an API key set, a request without the key gets `status` only: the rest names versions and errors."""

    status: str = Field(description="ok, or degraded when a component did not answer")
    model_version: str | None = None
    index_build: str | None = None
    components: dict[str, dict] | None = None
    down: list[str] | None = Field(None, description="components searches leave out until they answer")


ERROR_RESPONSES: dict[int | str, dict] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in ((400, "malformed body"), (401, "missing or wrong API key"), (413, "body too large"),
                       (422, "invalid request"), (503, "no expert or no index shard answered"))
}
