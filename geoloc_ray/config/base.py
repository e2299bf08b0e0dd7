"""The one base of every config section, and the shared actor-pool sub-model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ConfigModel(BaseModel):
    """Extra keys forbidden (a typo fails at load time, naming the key); assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ActorPool(ConfigModel):
    """A Ray Data actor pool (`map_batches` over a callable class): how many actors, what each asks of Ray, and
    the rows per call. One definition for every stage that runs one (refine, index embedding)."""

    count: int = Field(1, ge=1)  # actors in the pool (ray.data.ActorPoolStrategy(size=count))
    # Per actor. Fractional CPUs on purpose: whole-CPU actors starve Ray Data's read tasks on small machines.
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0)  # > 0: the actor computes on the GPU Ray gives it (device: auto)
    batch_size: int = Field(64, ge=1)  # rows per actor call


# Keys that moved, old dotted key -> new: a config still using an old key fails naming the new one.
MOVED_KEYS: dict[str, str] = {
    f"{section}.{old}": f"{section}.actors.{new}"
    for section in ("refine", "index")
    for old, new in (("num_actors", "count"), ("actor_num_cpus", "num_cpus"), ("actor_num_gpus", "num_gpus"),
                     ("batch_size", "batch_size"))
}
