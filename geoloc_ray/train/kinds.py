"""The kinds of training job, in the one table both the worker loop and the recipe read.

Per kind: what trains (the job's head, or the gate), which heads of the starting model it keeps, the Ray Dataset
the recipe builds for it, the state the worker prepares once, and the worker's batch source and loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from geoloc_ray.train import data, steps
from geoloc_ray.train.worker_types import Loss, StepContext


@dataclass(frozen=True)
class Kind:
    trains_gate: bool  # the gate learns; otherwise the job's head (and the image trunk when the job says so)
    fresh_gate: bool  # add a new gate to the starting model (the platform gate learns from scratch)
    all_heads: bool  # keep every head of the starting model (the fused loss scores through all experts)
    # driver: (rows, image size) -> the Ray Dataset sharded to workers (pixels decoded as it streams) and its count
    dataset: Callable[[data.Source, int], data.TrainData]
    batches: Callable[[StepContext, int], Iterator[Any]]  # worker: (context, epoch) -> batches
    loss: Callable[[StepContext, Any], Loss]  # worker: (context, batch) -> (loss, batch accuracy)
    # worker: forward and backward of one batch -> (detached loss, batch accuracy); None: `loss`, then backward
    step: Callable[[StepContext, Any], Loss] | None = None
    # worker setup: (context, Ray Data shard, first epoch) -> the kind's state (`StepContext.state`); None: none
    prepare: Callable[[StepContext, Any, int], Any] | None = None

    def run_step(self, ctx: StepContext, batch: Any) -> Loss:
        return self.step(ctx, batch) if self.step is not None else steps.loss_step(ctx, batch, self.loss)


KINDS: dict[str, Kind] = {
    "pairs": Kind(trains_gate=False, fresh_gate=False, all_heads=False, dataset=data.pairs_dataset,
                  batches=steps.shard_batches, loss=steps.pairs_loss),
    "triplets": Kind(trains_gate=False, fresh_gate=False, all_heads=False, dataset=data.triplets_dataset,
                     batches=steps.shard_batches, loss=steps.triplets_loss, step=steps.triplets_step),
    "gate": Kind(trains_gate=True, fresh_gate=True, all_heads=False, dataset=data.texts_dataset,
                 batches=steps.gate_batches, loss=steps.platform_gate_loss, prepare=steps.prepare_gate),
    "gate_fused": Kind(trains_gate=True, fresh_gate=False, all_heads=True, dataset=data.pairs_dataset,
                       batches=steps.gate_batches, loss=steps.fused_gate_loss, prepare=steps.prepare_fused),
}


def kind_of(name: str) -> Kind:
    if name not in KINDS:
        raise ValueError(f"unknown job kind {name!r}; expected one of {sorted(KINDS)}")
    return KINDS[name]
