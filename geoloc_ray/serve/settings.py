"""The application's arguments (serve_config.yaml `applications[].args`), checked at build time.

A typo in a key or a bad value fails `serve run` / `serve deploy` before any replica starts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from geoloc_ray import io
from geoloc_ray.config import Config

APP_NAME = "geoloc"
API_KEY_ENV = "GEOLOC_API_KEY"
MAX_K = 100  # DESIGN.md section 4: k in 1..100


class Replicas(BaseModel):
    """Fixed replica counts per deployment (serve_config.yaml `deployments[].autoscaling_config` overrides)."""

    model_config = ConfigDict(extra="forbid")

    ingress: int = Field(1, ge=1)
    encoder: int = Field(1, ge=1)
    expert: int = Field(1, ge=1)
    shard: int = Field(1, ge=1)


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    artifacts: str  # a run's artifacts folder or URI (holds models/<model>/ and index/)
    storage_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per protocol, e.g. {"s3": {...}}
    model: str = "moe"  # which model under models/
    index_build: str = "latest"  # a build folder name under index/, or "latest" (index/LATEST.json)
    api_key: str | None = None  # None: env GEOLOC_API_KEY in the ingress replica, else no key
    max_query_chars: int = Field(1000, ge=1)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    num_cpus: float = Field(0.25, gt=0)  # per replica: the default fits the whole graph on 2 CPUs
    num_gpus: float = Field(0.0, ge=0)  # per encoder / expert replica (shards use faiss-cpu)
    replicas: Replicas = Field(default_factory=Replicas)
    max_ongoing_requests: int = Field(64, ge=1)  # per replica; >= max_batch_size so batches can fill
    torch_threads: int = Field(1, ge=1)
    expert_timeout_s: float = Field(10.0, gt=0)  # past this an expert counts as failed (degraded answer)
    shard_timeout_s: float = Field(10.0, gt=0)
    thumbnail_px: int = Field(160, ge=16, le=1024)

    def artifacts_uri(self) -> str:
        """Local paths are made absolute where build_app runs: replicas may start in another directory."""
        return io.absolute_if_local(self.artifacts)

    def model_uri(self) -> str:
        return io.join(self.artifacts_uri(), "models", self.model)

    def index_root(self) -> str:
        return io.join(self.artifacts_uri(), "index")

    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    def actor_options(self, gpu: bool) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus}
        if gpu and self.num_gpus > 0:
            opts["num_gpus"] = self.num_gpus
        return opts

    @classmethod
    def from_config(cls, cfg: Config) -> AppArgs:
        """`geoloc-ray serve`: the run config's `serve` section -> app args."""
        s = cfg.serve
        return cls(
            artifacts=cfg.artifacts, storage_options=dict(cfg.data.storage_options), api_key=s.api_key,
            max_query_chars=s.max_query_chars, max_batch_size=s.max_batch_size,
            batch_wait_timeout_s=s.batch_wait_timeout_s, num_cpus=s.num_cpus, num_gpus=s.num_gpus,
            replicas=Replicas(encoder=s.encoder_replicas, expert=s.expert_replicas, shard=s.shard_replicas),
        )


def expert_deployment(platform: str) -> str:
    return f"ExpertHead_{platform}"


def shard_deployment(number: int) -> str:
    return f"IndexShard_{number}"
