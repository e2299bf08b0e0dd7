"""The application's arguments (serve_config.yaml `applications[].args`), validated by Serve at build time.

`build_app(args: AppArgs)` is a typed application builder: Serve validates `args` into `AppArgs` before calling
it, so a typo in a key or a bad value fails `serve run` / `serve deploy` before any replica starts. The knobs are
the config's `serve:` section (`ServeAppConfig`), defined once for both.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config
from geoloc_ray.config.loading import DeviceChoice
from geoloc_ray.config.sections import ServeAppConfig

APP_NAME = "geoloc"
API_KEY_ENV = "GEOLOC_API_KEY"
MAX_K = 100  # DESIGN.md section 4: k in 1..100
MAX_OFFSET = 10_000  # paging deeper than this is a crawl, not a search: refused (422)


class AppArgs(ServeAppConfig):
    """Which run to serve (`artifacts`, `storage_options`) and where the models compute (`device`, the run
    config's root key) plus every knob of the `serve:` config section."""

    artifacts: str  # a run's artifacts folder or URI
    storage_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per protocol, e.g. {"s3": {...}}
    # Resolved in each model replica (geoloc_ray.devices): auto = the GPU Ray gave it (num_gpus), else the CPU.
    device: DeviceChoice = "auto"

    @classmethod
    def from_config(cls, cfg: Config) -> AppArgs:
        """`geoloc-ray serve`: the run config -> app args, knob by knob by field name (nothing mapped by hand)."""
        knobs = cfg.serve.model_dump(include=set(ServeAppConfig.model_fields))
        return cls(artifacts=cfg.artifacts, storage_options=dict(cfg.data.storage_options), device=cfg.device,
                   **knobs)

    def run_uri(self) -> str:
        """Local paths are made absolute where build_app runs: replicas may start in another directory."""
        return io.absolute_if_local(self.artifacts)

    def model_name(self) -> str:
        return self.model or artifacts.MOE

    def model_uri(self) -> str:
        return artifacts.model_dir(self.run_uri(), self.model_name())

    def actor_options(self, gpu: bool) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus}
        if gpu and self.num_gpus > 0:
            opts["num_gpus"] = self.num_gpus
        return opts


def expert_deployment(platform: str) -> str:
    return f"ExpertHead_{platform}"


def shard_deployment(number: int) -> str:
    return f"IndexShard_{number}"
