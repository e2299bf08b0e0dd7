"""The per-worker training loop Ray Train runs: one plain function for every stage (nanoGPT-style).

A job's kind (a key of `kinds.KINDS`) says what trains, on which batches, under which loss: `pairs`
(contrastive on image/text pairs: stage 0 and expert stage 1), `triplets` (stage 2 with mined hard negatives),
`gate` (platform classification on trunk query features), `gate_fused` (the gate tuned on the fused retrieval
loss over held-out locations, experts frozen). Each epoch ends with
`ray.train.report(metrics, checkpoint)`; a restarted worker resumes from the last checkpoint. With several
workers the trainable parts run under DDP and the contrastive losses see the global batch (`parallel`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from geoloc_ray.config import Config
from geoloc_ray.train.kinds import kind_of
from geoloc_ray.train.steps import make_context
from geoloc_ray.train.worker_types import JobSpec, StepContext

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"


def worker_threads(cfg: Config, cpus: float | None) -> int:
    """torch threads = the CPUs this worker was given, rounded (several trainers share a node: more would only
    thrash). Rounded, not truncated: the demo gives a lone fit 1.8 of 2 CPUs, which truncation made 1 thread."""
    return cfg.train.torch_threads or max(1, round(cpus if cpus is not None else cfg.train.cpus_per_worker))


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
    """AdamW with the pretrained text layers at a smaller lr; linear warmup then cosine decay, over the steps this
    worker takes (`job.steps_per_epoch` is per worker)."""
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


def on_device(model, job: JobSpec, cfg: Config, device, opt_state: dict | None = None) -> tuple[Any, Any]:
    """Move the model to `device` (on CUDA under `train.bf16`, its frozen trunks in bf16), then build its optimizer
    and schedule, then restore their state: loaded after the move, AdamW's moments land on the parameters' device
    (a CUDA resume mixes nothing)."""
    import torch

    model.to(device)
    if torch.device(device).type == "cuda" and cfg.train.bf16:
        frozen_trunks_in_bf16(model)
    optimizer, scheduler = make_optimizer(model, job, cfg)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
    return optimizer, scheduler


def setup_context(model, job: JobSpec, cfg: Config, rng: np.random.Generator, device, shard, start_epoch: int = 0,
                  parallel: Any = None) -> StepContext:
    """The worker's whole step context: the common parts, then the state its kind prepares once (the gate kinds'
    rows and gallery; for a resumed worker, from `start_epoch`). Built before the first epoch, never filled later."""
    ctx = make_context(model, job, cfg, rng, device, shard, parallel)
    prepare = kind_of(job.kind).prepare
    return ctx if prepare is None else dataclasses.replace(ctx, state=prepare(ctx, shard, start_epoch))


def _rows(batch: dict[str, Any]) -> int:
    return len(next(iter(batch.values())))


def run_epoch(ctx: StepContext, epoch: int, optimizer, scheduler) -> tuple[int, dict[str, float]]:
    """One epoch of steps; (steps, summed loss and batch accuracy). The benchmark times this very function.

    Every worker takes the same number of steps (`parallel.agreed`, agreed once per `train.report_every_steps`);
    with several, the loss runs through DDP. No step waits on the host: the loss and accuracy are summed on the
    device and read at the end of the epoch (and at each agreement in a long epoch, where the workers meet anyway).
    """
    import torch

    from geoloc_ray.train.parallel import agreed, world

    kind = kind_of(ctx.job.kind)
    every = ctx.cfg.train.report_every_steps
    totals = None  # (summed loss, summed accuracy) on the device
    n_steps = 0
    for batch, sizes in agreed(kind.batches(ctx, epoch), _rows, ctx.device, every):
        optimizer.zero_grad(set_to_none=True)
        loss, acc = kind.run_step(dataclasses.replace(ctx, sizes=sizes), batch)  # forward and backward (one or several, `grad_cache`)
        optimizer.step()
        scheduler.step()
        loss = loss.detach().float().reshape(())
        step = torch.stack([loss, torch.as_tensor(acc, dtype=torch.float32, device=loss.device).reshape(())])
        totals = step if totals is None else totals + step
        n_steps += 1
        if n_steps % every == 0 and ctx.job.steps_per_epoch > every and world()[0] == 0:
            loss_sum, acc_sum = totals.tolist()
            print(f"[{ctx.job.name}] epoch {epoch + 1} step {n_steps}/{ctx.job.steps_per_epoch} "
                  f"loss {loss_sum / n_steps:.4f} acc {acc_sum / n_steps:.3f}", flush=True)
    loss_sum, acc_sum = totals.tolist() if totals is not None else (0.0, 0.0)
    return n_steps, {"loss": loss_sum, "acc": acc_sum}


def frozen_trunks_in_bf16(model) -> list[str]:
    """Cast the trunks that do not train to bf16 (on a GPU worker under `train.bf16`): autocast ran their matmuls
    in bf16 already, but cast the fp32 weights at every call and kept twice their bytes; the heads, the gate and a
    trained trunk keep fp32 weights for AdamW. Returns the names cast."""
    import torch

    cast = []
    for name, module in (("text_trunk", model.text_trunk), ("image_trunk", model.image_trunk)):
        if not any(p.requires_grad for p in module.parameters()):
            module.to(torch.bfloat16)
            cast.append(name)
    return cast


def write_checkpoint(folder: str, model, optimizer, scheduler, cfg: Config, job: JobSpec, epoch: int,
                     training: dict[str, Any] | None = None, frozen_sha: str | None = None) -> None:
    """The epoch's checkpoint: the trained parts' weights (the frozen trunks named by `frozen_sha`, their hash as
    the job started; computed now when not given), optimizer, schedule, epoch, job and where it trained. A fit
    exports the whole model from it (`restore`)."""
    import torch

    from geoloc_ray.model.checkpoint import save_trained

    record = save_trained(model, folder, frozen_sha)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(folder, OPTIMIZER_FILE))
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump({"epoch": epoch, "job": job.to_dict(), "training": training or {}, **record}, f)


def read_checkpoint(folder: str, model, frozen_sha: str | None = None) -> tuple[dict, int, dict[str, Any]]:
    """Load `write_checkpoint`'s trained parts into `model` (built as the job starts, `_init_model`, on the CPU);
    (optimizer + schedule state, first epoch to run, the state file). Refuses frozen parts other than the ones it
    trained against."""
    import torch

    from geoloc_ray.model.checkpoint import load_trained

    state = json.loads(open(os.path.join(folder, STATE_FILE)).read())
    if "frozen_sha256" not in state:
        raise ValueError(f"{folder}: a whole-model checkpoint from before epoch checkpoints held only the trained "
                         "parts; resume it with the code that wrote it, or start the fit anew (a new artifacts URI)")
    load_trained(model, folder, state, frozen_sha)
    opt_state = torch.load(os.path.join(folder, OPTIMIZER_FILE), weights_only=True, map_location="cpu")
    return opt_state, int(state["epoch"]) + 1, state


def restore(folder: str, cfg: Config) -> tuple[Any, dict[str, Any]]:
    """The whole trained model (on the CPU) from an epoch checkpoint, and its state file: what a fit exports."""
    state = json.loads(open(os.path.join(folder, STATE_FILE)).read())
    model = _init_model(cfg, JobSpec(**state["job"]))
    read_checkpoint(folder, model)
    return model, state


def _restore(model, frozen_sha: str) -> tuple[dict | None, int]:
    """(optimizer state, first epoch) after loading the last reported checkpoint into `model`, or (None, 0)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, 0
    with checkpoint.as_directory() as d:
        opt_state, start, _ = read_checkpoint(d, model, frozen_sha)
        return opt_state, start


def _report(model, optimizer, scheduler, cfg: Config, job: JobSpec, metrics: dict[str, Any],
            training: dict[str, Any], frozen_sha: str) -> None:
    """Every rank reports; rank 0 attaches the checkpoint."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(d, model, optimizer, scheduler, cfg, job, metrics["epoch"], training, frozen_sha)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _where() -> dict[str, Any]:
    """The manifest's `extra.training`: how many workers trained, and the Ray node each ran on (rank order)."""
    import ray

    from geoloc_ray.train.parallel import gather_objects, world

    return {"world_size": world()[1], "node_ids": gather_objects(ray.get_runtime_context().get_node_id())}


def _steps_counter(job: JobSpec):
    """geoloc_train_steps_total{job}: optimizer steps per worker (steps/s per job in docs/grafana)."""
    from ray.util.metrics import Counter

    counter = Counter("geoloc_train_steps_total", tag_keys=("job",),
                      description="optimizer steps taken by Ray Train workers, per training job")
    counter.set_default_tags({"job": job.name})
    return counter


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch

    from geoloc_ray.devices import resolve_device
    from geoloc_ray.model.checkpoint import frozen_sha256
    from geoloc_ray.runtime import use_storage
    from geoloc_ray.train.parallel import data_parallel

    cfg = Config.model_validate(config["cfg"])
    use_storage(cfg)  # this worker may read s3:// checkpoints through a custom endpoint
    job = JobSpec(**config["job"])
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(worker_threads(cfg, config.get("cpus")))
    torch.manual_seed(job.seed)  # the same fresh parts on every worker (DDP then broadcasts rank 0's anyway)
    model = _init_model(cfg, job)
    frozen_sha = frozen_sha256(model)  # on the CPU in fp32, before any move or cast: what checkpoints name
    opt_state, start_epoch = _restore(model, frozen_sha)
    if start_epoch:
        print(f"[{job.name}] resuming from the checkpoint of epoch {start_epoch - 1}", flush=True)
    torch.manual_seed(job.seed + rank)
    rng = np.random.default_rng(job.seed + 1000 * rank)
    # The GPU Ray Train gave this worker, unless `device: cpu` (GPU requests kept, computing on the CPU).
    device = ray.train.torch.get_device() if resolve_device(cfg.device) == "cuda" else torch.device("cpu")
    optimizer, scheduler = on_device(model, job, cfg, device, opt_state)
    model.train()  # the gate_fused setup embeds its gallery in the mode every epoch runs in
    ctx = setup_context(model, job, cfg, rng, device, ray.train.get_dataset_shard("train"), start_epoch,
                        data_parallel(model, kind_of(job.kind).loss))
    training = _where()
    steps_counter = _steps_counter(job)

    # Every rank must make the same report calls, so the interval comes from the driver's step count.
    report_every = max(1, -(-cfg.train.report_every_steps // max(1, job.steps_per_epoch)))
    for epoch in range(start_epoch, job.epochs):
        t0 = time.perf_counter()
        model.train()
        n_steps, totals = run_epoch(ctx, epoch, optimizer, scheduler)
        steps_counter.inc(n_steps)
        metrics = {
            "job": job.name, "epoch": epoch, "steps": n_steps, "world_size": training["world_size"],
            "loss": totals["loss"] / max(n_steps, 1), "batch_acc": totals["acc"] / max(n_steps, 1),
            "epoch_s": time.perf_counter() - t0, "resumed_from_epoch": start_epoch,
            "lr": optimizer.param_groups[0]["lr"],
        }
        if rank == 0:
            print(f"[{job.name}] epoch {epoch + 1}/{job.epochs} loss {metrics['loss']:.4f} "
                  f"acc {metrics['batch_acc']:.3f} ({n_steps} steps, {metrics['epoch_s']:.1f}s)", flush=True)
        last = epoch == job.epochs - 1
        if last or (epoch + 1) % cfg.train.checkpoint_every_epochs == 0:
            _report(model, optimizer, scheduler, cfg, job, metrics, training, frozen_sha)
        elif (epoch + 1) % report_every == 0:
            ray.train.report(metrics)
