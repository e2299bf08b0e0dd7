"""The types a training worker passes between its modules: the job it runs, its step context, a step's loss.

They live apart so `loop -> kinds -> steps -> encode` import them without importing one another backwards (a
cycle even under type checking made the worker's modules hard to read and to test one at a time). A leaf module:
it imports nothing of `geoloc_ray.train` at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from geoloc_ray.config import Config

if TYPE_CHECKING:
    import torch

    from geoloc_ray.train.batches import TextSampler
    from geoloc_ray.train.cache import TrunkCache
    from geoloc_ray.train.shards import ShardEpochs

# (loss to minimise, batch accuracy for the log): both tensors on the worker's device, read by the loop only every
# `train.report_every_steps` (a float here would wait for the GPU at every step)
Loss = tuple["torch.Tensor", "torch.Tensor"]


@dataclass
class JobSpec:
    """What one TorchTrainer run trains; serialisable into `train_loop_config`."""

    name: str
    kind: str  # a key of `kinds.KINDS`: pairs | triplets | gate | gate_fused
    head: str | None = None  # the head being trained (None for the gate)
    init: str | None = None  # model URI to start from (None: build fresh from config)
    init_head: str | None = None  # start `head` as a copy of this head of `init` (heads start from stage 0's)
    image_trunk: bool = False  # train the image trunk too (stage 0 of the embedded default)
    text_layers: bool = True  # train the head's copy of the pretrained text layers (else only its projection)
    epochs: int = 1
    lr: float = 2e-5
    seed: int = 0
    steps_per_epoch: int = 1  # steps EACH worker takes per epoch, for the schedule (the driver counts the rows)
    # pairs: each row of a platform other than `head`'s weighs this much in the loss (None: every row weighs 1).
    other_platform_weight: float | None = None
    batch_size: int | None = None  # rows per worker and step (None: train.batch_size); stage 2 has its own
    grad_cache_chunk: int = 0  # triplets: images through the trainable layers at a time (0: all at once)
    local_shuffle: bool = True  # shuffle the streamed batches locally (False: the rows come shuffled, `TrainData`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateRows:
    """What the gate kinds read on a worker, prepared once before the first epoch (`Kind.prepare`): the shard's
    query rows; for `gate_fused` also the held-out gallery under each frozen expert, its location keys, and the
    frozen starting gate its anchor pulls toward (prior `platform_gate`)."""

    rows: dict[str, np.ndarray]
    gallery: list[torch.Tensor] | None = None
    gallery_keys: torch.Tensor | None = None
    anchor_gate: Any | None = None


@dataclass(frozen=True)
class StepContext:
    """What a kind's batches and loss read on one worker. Immutable: the worker's setup builds it whole, kind state
    included (`state`, from `Kind.prepare`); a step's row counts come as a copy (`dataclasses.replace`)."""

    model: Any
    job: JobSpec
    cfg: Config
    rng: np.random.Generator
    device: Any
    epochs: ShardEpochs  # pairs and triplets: this worker's Ray Data shard, epoch by epoch
    sampler: TextSampler
    preprocess: Callable[..., torch.Tensor]
    augment: Any | None
    cache: TrunkCache
    parallel: Callable[..., Loss] | None = None  # the kind's loss through DDP (None: one worker, no wrapper)
    state: GateRows | None = None  # the kind's own prepared state (None: the kind needs none)
    sizes: list[int] | None = None  # this step's rows on every worker (None: one worker)
