"""One training step of a fit, measured without a GPU: the model built on the meta device, materialised as fake
tensors (`FakeTensorMode`: shapes, dtypes and storages, no data), one steady-state step (forward, backward,
AdamW) at the configured batch and image size, peak memory from torch's `MemTracker` and FLOPs from
`FlopCounterMode`. The step runs the worker's own pieces (`encode`, the losses, `grad_cache`, the optimizer of
`make_optimizer`); only where the worker reads data values (text lengths, accuracies) it is given the worst case:
every text `model.text.max_length` tokens.

Fake tensors live on the CPU (torch's autograd engine asks a real CUDA device for a fake CUDA tensor); their sizes
are the GPU's, and CPU autocast to bf16 casts the same matmuls. Not measured: the CUDA context and the caching
allocator's slack, which the planner's headroom is for. Imports torch: imported inside functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from geoloc_ray.config import Config
from geoloc_ray.train import encode as enc
from geoloc_ray.train import steps
from geoloc_ray.train.loop import _set_trainable, make_optimizer, on_device
from geoloc_ray.train.worker_types import JobSpec, StepContext


@dataclass(frozen=True)
class Measurement:
    peak_bytes: int  # one worker's device memory at its highest during the step
    flops: int  # forward + backward matmul/attention FLOPs of the step (FlopCounterMode)
    trainable_params: int
    trainable_bytes: int  # the trainable parameters' own size (DDP keeps one more copy of their gradients)
    at_peak: dict[str, int]  # bytes by kind at the peak: parameters, gradients, optimizer state, activations...


class _Tracker(MemTracker):
    """MemTracker, the global peak only: its per-module accounting refuses a module called twice in one step (the
    head once per GradCache chunk, the text layers once per length chunk) and would walk every module seen at
    every op. Gradient hooks go on the trainable parameters alone (torch refuses a hook on a frozen one)."""

    def _pre_fw_hook(self, module: torch.nn.Module, inputs: Any) -> None:
        pass

    def _post_fw_hook(self, module: torch.nn.Module, inputs: Any, outputs: Any) -> None:
        pass

    def _pre_bw_hook(self, module: torch.nn.Module, args: Any) -> None:
        pass

    def _post_bw_hook(self, module: torch.nn.Module, args: Any) -> None:
        pass

    def track_model(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.track_external(model, optimizer)
        for module in model.modules():
            params = list(module.parameters())
            if params and all(p.requires_grad for p in params):
                self._track_module_params_and_buffers(module, install_grad_hooks=True)


def _meta_model(cfg: Config, job: JobSpec):
    """The fit's model as the worker holds it: its head (every expert for the fused gate), the gate if it has
    one, trunks frozen; architecture only."""
    from geoloc_ray.model import build_model
    from geoloc_ray.train.kinds import kind_of

    kind = kind_of(job.kind)
    heads = list(cfg.model.platforms) if kind.all_heads else [job.head] if job.head else []
    return build_model(cfg.model, heads=heads, gate=kind.trains_gate, device="meta")


def _tokens(cfg: Config, n: int) -> dict[str, torch.Tensor]:
    length = cfg.model.text.max_length
    return {"input_ids": torch.zeros(n, length, dtype=torch.long),
            "attention_mask": torch.ones(n, length, dtype=torch.long)}


def _trunk_parts(ctx: StepContext, n: int) -> list:
    """`n` texts through the frozen text trunk, one output per text (what `TextTrunkOutput.split` gives)."""
    from geoloc_ray.model import TextTrunkOutput

    with torch.no_grad(), enc.autocast(ctx):
        out = ctx.model.text_trunk_output(_tokens(ctx.cfg, n))
    return [TextTrunkOutput(out.hidden[i : i + 1], out.attention_mask[i : i + 1], out.pooled[i : i + 1])
            for i in range(n)]


def _texts(ctx: StepContext, rows: int, per_row: int) -> torch.Tensor:
    """Unit text embeddings of `rows` texts of `per_row` parts each (statements, averaged: `statement_text`), the
    head's text layers with their graph unless the job locks them."""
    import torch.nn.functional as F

    head = ctx.model.heads[ctx.job.head].text
    parts = _trunk_parts(ctx, rows * per_row)
    if ctx.job.text_layers:
        pooled = enc.tail(ctx, head, parts)
    else:
        with torch.no_grad(), enc.autocast(ctx):
            pooled = head.tail(type(parts[0]).cat(parts)).float()
    with enc.autocast(ctx):
        return F.normalize(head.proj(pooled.view(rows, per_row, -1).mean(1)), dim=-1).float()


def _pixels(cfg: Config, n: int) -> torch.Tensor:
    size = cfg.model.image.image_size
    return torch.empty(n, 3, size, size)


def _locations(rows: int) -> np.ndarray:
    return np.array([f"{i:06d}" for i in range(rows)])


def _pairs(ctx: StepContext, rows: int) -> None:
    composed = ctx.cfg.train.text_composition == "features" or not ctx.job.text_layers
    t = _texts(ctx, rows, ctx.cfg.train.statements_per_text if composed else 1)
    with enc.autocast(ctx):
        v = enc.image(ctx, _pixels(ctx.cfg, rows)).float()
    weights = steps._row_weights(ctx, np.array([ctx.job.head] * rows))
    steps._contrastive(ctx, t, v, _locations(rows), weights=weights).backward()


def _triplet_batch(ctx: StepContext, rows: int) -> dict[str, np.ndarray]:
    per_query = ctx.cfg.train.hard_negatives.per_query
    return {"location_id": _locations(rows),
            "neg_location_ids": np.array([[f"n{i:06d}-{k}" for k in range(per_query)] for i in range(rows)])}


def _triplets(ctx: StepContext, rows: int, host: torch.Tensor | None) -> None:
    batch = _triplet_batch(ctx, rows)
    t = _texts(ctx, rows, 1)
    if host is not None:
        steps.cached_triplets(ctx, batch, t, host)
        return
    with enc.autocast(ctx):
        v_all = enc.image(ctx, _pixels(ctx.cfg, rows * (1 + ctx.cfg.train.hard_negatives.per_query))).float()
    steps._triplets_contrastive(ctx, batch, t, v_all).backward()


def _gate(ctx: StepContext, rows: int) -> None:
    from geoloc_ray.train.losses import gate_loss

    per_row = ctx.cfg.train.statements_per_text
    x = torch.cat([p.pooled for p in _trunk_parts(ctx, rows * per_row)]).float().view(rows, per_row, -1).mean(1)
    gate_loss(ctx.model.gate.logits(x), torch.zeros(rows, dtype=torch.long)).backward()


def _gate_fused(ctx: StepContext, rows: int) -> None:
    """The held-out gallery under each frozen expert (a batch of `GALLERY_BATCH` images: the worker's setup
    pass), then the fused loss of `rows` queries against it, anchored to the starting gate's weights."""
    import torch.nn.functional as F

    from geoloc_ray.train.losses import fused_logits, gate_anchor, multi_positive_nce

    size = ctx.cfg.model.image.image_size
    gallery = enc.expert_gallery(ctx, torch.empty(enc.GALLERY_BATCH, size, size, 3, dtype=torch.uint8))
    per_row, model = ctx.cfg.train.statements_per_text, ctx.model
    parts = _trunk_parts(ctx, rows * per_row)
    trunk = type(parts[0]).cat(parts)
    with torch.no_grad(), enc.autocast(ctx):
        queries = [F.normalize(model.heads[k].text.proj(model.heads[k].text.tail(trunk).float()
                                                         .view(rows, per_row, -1).mean(1)), dim=-1).float()
                   for k in model.platforms]
    x = trunk.pooled.float().view(rows, per_row, -1).mean(1)
    per_expert = torch.stack([q @ g.T for q, g in zip(queries, gallery, strict=True)], dim=1)
    gate_logits = model.gate.scaled(model.gate.logits(x))
    logits = fused_logits(gate_logits.softmax(-1), per_expert, ctx.cfg.train.temperature)
    positives = torch.zeros_like(logits, dtype=torch.bool)
    positives[:, 0] = True
    loss = multi_positive_nce(logits, positives)
    if ctx.cfg.train.gate_fused_anchor > 0:  # the frozen starting gate's weights (the gate's shape, no graph)
        with torch.no_grad():
            anchor = steps.anchor_weights(ctx.cfg.train.gate_fused_prior, model.gate, x)
        loss = loss + ctx.cfg.train.gate_fused_anchor * gate_anchor(gate_logits, anchor)
    loss.backward()


def _steady_optimizer(model, optimizer) -> None:
    """AdamW makes its moments at the first step: take one on zero gradients first, so the measured step holds
    them as every later step does."""
    for p in model.trainable_parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_step(cfg: Config, job: JobSpec, rows: int) -> Measurement:
    """Peak memory and FLOPs of one step of `job` at `rows` rows per worker."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    model = _meta_model(cfg, job)
    _set_trainable(model, job)
    on_device(model, job, cfg, "meta")  # the worker's own move (and the dtypes it gives), on the meta device
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu").train()  # fake tensors keep each parameter's dtype and requires_grad
        optimizer, _ = make_optimizer(model, job, cfg)
        _steady_optimizer(model, optimizer)
        ctx = steps.make_context(model, job, cfg, np.random.default_rng(0), "cpu", None)
        host = None
        if job.kind == "triplets" and job.grad_cache_chunk:  # GradCache keeps the batch's pixels on the host
            host = _pixels(cfg, rows * (1 + cfg.train.hard_negatives.per_query))
        tracker, flops = _Tracker(), FlopCounterMode(display=False)
        tracker.track_model(model, optimizer)
        with tracker, flops:
            if job.kind == "triplets":
                _triplets(ctx, rows, host)
            else:
                {"pairs": _pairs, "gate": _gate, "gate_fused": _gate_fused}[job.kind](ctx, rows)
            optimizer.step()
        snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
        trainable = model.trainable_parameters()
        return Measurement(
            peak_bytes=int(snap["Total"]), flops=int(flops.get_total_flops()),
            trainable_params=sum(p.numel() for p in trainable),
            trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
            at_peak={str(k).rsplit(".", 1)[-1].lower(): int(v) for k, v in snap.items() if str(k) != "Total"},
        )
