"""The per-worker training loop Ray Train runs: one plain function for every stage (nanoGPT-style).

A job's kind (a key of `kinds.KINDS`) says what trains, on which batches, under which loss: `pairs`
(contrastive on image/text pairs: stage 0 and expert stage 1), `triplets` (stage 2 with mined hard negatives),
`gate` (platform classification on trunk query features), `gate_fused` (the gate tuned on the fused retrieval
loss over held-out locations, experts frozen). Each epoch ends with
`ray.train.report(metrics, checkpoint)`; a restarted worker resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from geoloc_ray.config import Config
from geoloc_ray.train.kinds import kind_of
from geoloc_ray.train.steps import StepContext, make_context

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"


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
    steps_per_epoch: int = 1  # for the learning-rate schedule (the driver counts the dataset)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _init_model(cfg: Config, job: JobSpec):
    from geoloc_ray.model import build_model, load_model

    kind = kind_of(job.kind)
    if job.init is None:
        model = build_model(cfg.model, heads=[job.head], gate=False, seed=job.seed)
    else:
        model = load_model(job.init)
        if job.init_head is not None and job.head is not None and job.init_head != job.head:
            model.copy_head(job.init_head, job.head)
        if not kind.all_heads:
            for name in [n for n in model.head_names if n != job.head]:
                del model.heads[name]  # an expert run carries only its own head
        if kind.fresh_gate:
            model.add_gate()
    _set_trainable(model, job)
    return model


def _set_trainable(model, job: JobSpec) -> None:
    model.set_trainable(image_trunk=job.image_trunk, heads=[job.head] if job.head else [],
                        gate=kind_of(job.kind).trains_gate)
    if job.head and not job.text_layers:
        model.heads[job.head].text.tail.requires_grad_(False)
        model.train(model.training)


def make_optimizer(model, job: JobSpec, cfg: Config):
    """AdamW with the pretrained text layers at a smaller lr; linear warmup then cosine decay."""
    import math

    import torch

    text_tail = {id(p) for name, p in model.named_parameters() if ".text.tail." in name}
    params = model.trainable_parameters()
    groups = [
        {"params": [p for p in params if id(p) not in text_tail], "lr": job.lr},
        {"params": [p for p in params if id(p) in text_tail], "lr": job.lr * cfg.train.text_lr_scale},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.train.weight_decay)
    total = max(1, job.epochs * job.steps_per_epoch)
    warmup = int(cfg.train.warmup_fraction * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def sync_gradients(params: list) -> None:
    """Average gradients over the data-parallel workers (what DDP does; our heads run through split calls)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def broadcast_parameters(model) -> None:
    """Start every worker from rank 0's weights."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in model.state_dict().values():
            dist.broadcast(p, src=0)


def run_epoch(ctx: StepContext, epoch: int, optimizer, scheduler, params: list) -> tuple[int, dict[str, float]]:
    """One epoch of steps; (steps, summed loss and batch accuracy). The benchmark times this very function."""
    kind = kind_of(ctx.job.kind)
    totals = {"loss": 0.0, "acc": 0.0}
    n_steps = 0
    for batch in kind.batches(ctx, epoch):
        loss, acc = kind.loss(ctx, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync_gradients(params)
        optimizer.step()
        scheduler.step()
        totals["loss"] += float(loss.detach())
        totals["acc"] += acc
        n_steps += 1
    return n_steps, totals


def _restore() -> tuple[Any, int]:
    """(model, first epoch) from the last reported checkpoint, or (None, 0) on a fresh start."""
    import ray.train
    import torch

    from geoloc_ray.model import load_model

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, 0
    with checkpoint.as_directory() as d:
        model = load_model(d)
        state = json.loads(open(os.path.join(d, STATE_FILE)).read())
        opt_state = torch.load(os.path.join(d, OPTIMIZER_FILE), weights_only=True)
    return (model, opt_state), int(state["epoch"]) + 1


def _report(model, optimizer, scheduler, cfg: Config, job: JobSpec, metrics: dict[str, Any]) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (weights as safetensors + optimizer + epoch)."""
    import ray.train
    import torch

    from geoloc_ray.model import save_model

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_model(model, d, cfg, extra={"job": job.to_dict(), "epoch": metrics["epoch"]})
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   os.path.join(d, OPTIMIZER_FILE))
        with open(os.path.join(d, STATE_FILE), "w") as f:
            json.dump({"epoch": metrics["epoch"], "job": job.to_dict()}, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch

    from geoloc_ray.runtime import use_storage

    cfg = Config.model_validate(config["cfg"])
    use_storage(cfg)  # this worker may read s3:// checkpoints through a custom endpoint
    job = JobSpec(**config["job"])
    rank = ray.train.get_context().get_world_rank()
    # Threads = the CPUs this worker was given (several trainers share a node): more would only thrash.
    torch.set_num_threads(cfg.train.torch_threads or max(1, int(config.get("cpus", cfg.train.cpus_per_worker))))
    torch.manual_seed(job.seed + rank)
    rng = np.random.default_rng(job.seed + 1000 * rank)

    restored, start_epoch = _restore()
    if restored is None:
        model = _init_model(cfg, job)
    else:
        print(f"[{job.name}] resuming from the checkpoint of epoch {start_epoch - 1}", flush=True)
        model, opt_state = restored
        _set_trainable(model, job)
    optimizer, scheduler = make_optimizer(model, job, cfg)
    if restored is not None:
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
    device = ray.train.torch.get_device()
    model.to(device)
    broadcast_parameters(model)
    params = model.trainable_parameters()
    ctx = make_context(model, job, cfg, rng, device, ray.train.get_dataset_shard("train"))

    # Every rank must make the same report calls, so the interval comes from the driver's step count.
    report_every = max(1, -(-cfg.train.report_every_steps // max(1, job.steps_per_epoch)))
    for epoch in range(start_epoch, job.epochs):
        t0 = time.perf_counter()
        model.train()
        n_steps, totals = run_epoch(ctx, epoch, optimizer, scheduler, params)
        metrics = {
            "job": job.name, "epoch": epoch, "steps": n_steps,
            "loss": totals["loss"] / max(n_steps, 1), "batch_acc": totals["acc"] / max(n_steps, 1),
            "epoch_s": time.perf_counter() - t0, "resumed_from_epoch": start_epoch,
            "lr": optimizer.param_groups[0]["lr"],
        }
        if rank == 0:
            print(f"[{job.name}] epoch {epoch + 1}/{job.epochs} loss {metrics['loss']:.4f} "
                  f"acc {metrics['batch_acc']:.3f} ({n_steps} steps, {metrics['epoch_s']:.1f}s)", flush=True)
        last = epoch == job.epochs - 1
        if last or (epoch + 1) % cfg.train.checkpoint_every_epochs == 0:
            _report(model, optimizer, scheduler, cfg, job, metrics)
        elif (epoch + 1) % report_every == 0:
            ray.train.report(metrics)
