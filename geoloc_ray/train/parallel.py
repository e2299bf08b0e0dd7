"""Data parallelism inside a train worker: DDP over the parts that learn, and the few collectives the steps need.

Ray Train (or a test's gloo group) sets up torch.distributed; with one worker nothing here communicates and no
wrapper is made, so a single-worker fit costs what it did. Imported inside functions: it imports torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(this worker's rank, number of workers); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _wire(device: Any) -> torch.device:
    """Where a collective's tensors must live: NCCL moves CUDA tensors only, gloo CPU ones."""
    return torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")


def step_sizes(rows: int, device: Any = "cpu") -> list[int]:
    """Every worker's row count for this step, in rank order (one small all-gather)."""
    mine = torch.tensor([rows], dtype=torch.long, device=_wire(device))
    out = [torch.zeros_like(mine) for _ in range(world()[1])]
    dist.all_gather(out, mine)
    return [int(x) for x in out]


def window_sizes(rows: list[int], window: int, device: Any = "cpu") -> list[list[int]]:
    """Every worker's row counts of its next `window` batches (0 past its last), in rank order: one all-gather."""
    mine = torch.zeros(window, dtype=torch.long)
    mine[: len(rows)] = torch.as_tensor(rows, dtype=torch.long)
    mine = mine.to(_wire(device))
    out = [torch.zeros_like(mine) for _ in range(world()[1])]
    dist.all_gather(out, mine)
    return torch.stack(out).tolist()


def agreed(batches: Iterator[Any], rows: Callable[[Any], int], device: Any, window: int = 1
           ) -> Iterator[tuple[Any, list[int] | None]]:
    """(batch, every worker's rows) while EVERY worker still has a batch. Shards may differ by a few rows (a
    filter, a ragged split): a worker with more steps would wait forever in the next all-reduce, so it drops the
    rest of its epoch instead. The workers agree once per `window` steps, not per step: each reads up to `window`
    batches ahead, and one all-gather of their row counts says how many steps all of them take and every step's
    sizes (the gathered contrastive loss needs them), so no step waits on the host. The price is `window` batches
    held in host memory (production: 20 x 128 images at 384 px, ~1.1 GB per worker). One worker: the batches as
    they come, sizes None."""
    if world()[1] == 1:
        for batch in batches:
            yield batch, None
        return
    it = iter(batches)
    while True:
        ahead = list(islice(it, window))
        counts = window_sizes([rows(b) for b in ahead], window, device)
        steps = min(sum(1 for n in worker if n > 0) for worker in counts)
        for i in range(steps):
            yield ahead[i], [worker[i] for worker in counts]
        if steps < window:
            return


def gather_rows(x: torch.Tensor, sizes: list[int] | None = None, grad: bool = False) -> torch.Tensor:
    """Every worker's `x` concatenated in rank order (row counts may differ: padded for the wire, then trimmed).
    With `grad`, each worker's rows keep their autograd path back to it (torch.distributed.nn's all_gather, whose
    backward sums every worker's gradient for them: open_clip's gather_with_grad)."""
    n = world()[1]
    if n == 1:
        return x
    sizes = sizes if sizes is not None else step_sizes(len(x), x.device)
    pad = max(sizes) - len(x)
    wire = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
    wire = wire.to(_wire(x.device)).contiguous()
    if grad:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # "deprecated" for a private successor; this one is the documented API
            warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather", FutureWarning)
            parts = list(all_gather(wire))
    else:
        parts = [torch.empty_like(wire) for _ in range(n)]
        dist.all_gather(parts, wire)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(x.device)


def gather_objects(obj: Any) -> list[Any]:
    """A small picklable value from every worker, in rank order (node ids for the manifest)."""
    if world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


class TrainableParts(nn.Module):
    """Only the parts of the model that learn (the job's head, the gate, the image trunk in stage 0), so DDP
    broadcasts and all-reduces exactly their parameters; `forward` is the kind's loss over the whole model.

    The heads run through split calls (frozen trunk output -> head), so no single module's forward is the step:
    the loss function is. The frozen trunk stays outside DDP's view (identical on every worker by construction).
    """

    def __init__(self, model: nn.Module, loss: Callable[..., Any]):
        super().__init__()
        self.parts = nn.ModuleList([m for _, m in model.components() if any(p.requires_grad for p in m.parameters())])
        self.loss = loss

    def forward(self, *args: Any, run: Callable[[], Any] | None = None) -> Any:
        """The kind's loss on (ctx, batch); or `run()`, the forward of one of several backward calls in a step
        (GradCache's chunks: each must pass through DDP for its backward to be reduced, or skipped under no_sync)."""
        return run() if run is not None else self.loss(*args)


def data_parallel(model: nn.Module, loss: Callable[..., Any]) -> Callable[..., Any] | None:
    """The kind's loss wrapped in DDP (bucketed gradient all-reduce overlapping backward) with several workers;
    None with one (no wrapper, no overhead). Building it broadcasts rank 0's trainable weights."""
    if world()[1] == 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    # device_ids None: a single-device module stays where it is, on the CPU or the worker's GPU
    return DistributedDataParallel(TrainableParts(model, loss))
