"""One training step per kind of job: plain batch sources and loss functions over a worker's `StepContext`.
With several workers the contrastive losses see every worker's batch (`train.global_negatives`).

pairs: in-batch InfoNCE on (image, a query-like text of 1..N of its statements): stage 0 and expert stage 1 (an
expert's rows of other platforms weigh `train.expert_replay`'s share, see run.py).
triplets: stage 2, in-batch negatives plus each query's mined hard negatives (never of its own location).
gate: the platform of each query's image, from the frozen trunk's query feature.
gate_fused: the gate on the fused retrieval loss over held-out locations, experts frozen, anchored by a KL term
(`train.gate_fused_anchor`) to the platform gate it starts from or to equal weights (`train.gate_fused_prior`).
torch is imported inside the functions: the recipe imports this module (through `kinds`) on the CLI path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from geoloc_ray.config import Config
from geoloc_ray.devices import to_device
from geoloc_ray.train import encode as enc
from geoloc_ray.train import shards
from geoloc_ray.train.cache import TrunkCache
from geoloc_ray.train.worker_types import GateRows, JobSpec, Loss, StepContext

if TYPE_CHECKING:
    import torch


def _unstyler(cfg: Config) -> Callable[[str], str] | None:
    """The inverse of the refiner's platform phrasing, from the same vocabulary the refine stage used."""
    if cfg.train.style_dropout <= 0:
        return None
    from geoloc_ray.captions.rules import style_patterns, unstyle
    from geoloc_ray.captions.vocabulary import load_vocabulary

    return partial(unstyle, patterns=style_patterns(load_vocabulary(cfg.refine.vocabulary)))


def make_context(model, job: JobSpec, cfg: Config, rng: np.random.Generator, device, shard,
                 parallel: Callable[..., Loss] | None = None) -> StepContext:
    """The worker's step context without the kind's state (`loop.setup_context` adds it); the augmentation's seed
    is the first draw from `rng` (then the text sampler's)."""
    from geoloc_ray.model import SatelliteAugment, image_preprocess
    from geoloc_ray.train.batches import TextSampler

    preprocess = image_preprocess(model)
    sampler = TextSampler(rng, cfg.train.statements_per_text, _unstyler(cfg), cfg.train.style_dropout)
    augment = None
    if cfg.preprocess.augment.enabled:
        augment = SatelliteAugment(cfg.preprocess.augment, seed=int(rng.integers(2**31)))
    batch_size = job.batch_size or cfg.train.batch_size
    epochs = shards.ShardEpochs(shard, batch_size, job.seed, cfg.train.cache_shard_mb * 2**20, job.local_shuffle)
    return StepContext(model, job, cfg, rng, device, epochs, sampler, preprocess, augment,
                       TrunkCache(cfg.train.trunk_cache_items), parallel)


# ----- batch sources ---------------------------------------------------------------------------------------------
def shard_batches(ctx: StepContext, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """pairs and triplets: the decoded rows Ray Data shards to this worker (kept in memory when small)."""
    return ctx.epochs.batches(epoch)


def _with_text(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows with at least one statement (the datasets drop the others already; a query needs one)."""
    has_text = np.array([len(t) > 0 for t in rows["texts"]], dtype=bool)
    return {k: v[has_text] for k, v in rows.items()}


def prepare_gate(ctx: StepContext, shard, start_epoch: int) -> GateRows:
    """gate: the shard's query texts and platforms, read once at the worker's setup."""
    return GateRows(_with_text(shards.all_rows(shard, ["texts", "platform"])))


def prepare_fused(ctx: StepContext, shard, start_epoch: int) -> GateRows:
    """gate_fused: as `prepare_gate`; the held-out images of EVERY worker become a fixed gallery under each frozen
    expert (each worker embeds its own in batches, then they are gathered), so each query is ranked as in eval."""
    from geoloc_ray.train.batches import location_keys
    from geoloc_ray.train.parallel import gather_rows

    rows = shards.all_rows(shard, ["texts", "location_id", "pixels"])
    gallery = [gather_rows(g) for g in enc.expert_gallery(ctx, rows.pop("pixels"))]
    (keys,) = location_keys(rows.pop("location_id"))
    anchor = None
    if ctx.cfg.train.gate_fused_anchor > 0 and ctx.cfg.train.gate_fused_prior == "platform_gate":
        anchor = _starting_gate(ctx, start_epoch)  # the equal prior needs no copy of any gate
    return GateRows(_with_text({**rows, "location_keys": keys.numpy()}), gallery,
                    gather_rows(keys.to(ctx.device)), anchor)


def gate_rows(ctx: StepContext) -> GateRows:
    """The gate kinds' prepared rows; a clear error for a context built without them."""
    if ctx.state is None:
        raise RuntimeError(f"job {ctx.job.name!r} ({ctx.job.kind}) needs its prepared rows: build its context "
                           "with loop.setup_context, not steps.make_context")
    return ctx.state


def gate_batches(ctx: StepContext, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """gate and gate_fused: row indices into the prepared texts, in a fresh order from the worker's generator every
    epoch."""
    for idx in shards.shuffled(ctx.rng, len(gate_rows(ctx).rows["texts"]), ctx.cfg.train.batch_size):
        yield {"rows": idx}


def _starting_gate(ctx: StepContext, epoch: int):
    """A frozen copy of the gate the job started from: the model's own before its first step, else (a worker
    resumed from a checkpoint holds a tuned gate) the one in the job's starting model."""
    import copy

    gate = ctx.model.gate
    if epoch > 0 and ctx.job.init is not None:
        from geoloc_ray.model import load_model

        gate = load_model(ctx.job.init, heads=[]).gate
    return copy.deepcopy(gate).to(ctx.device).eval().requires_grad_(False)


def _accuracy(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        hits = (text @ image[: len(text)].T).argmax(1).eq(torch.arange(len(text), device=text.device))
        return hits.float().mean()


def _contrastive(ctx: StepContext, t: torch.Tensor, v: torch.Tensor, location_ids,
                 hard: torch.Tensor | None = None, hard_ids=None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE on this worker's rows; against every worker's texts, images and hard negatives (gathered with their
    gradients) when there are several workers and `train.global_negatives` is on. Row `weights` are normalised
    by every worker's sum, so the workers' mean loss (DDP's gradient average) is the whole batch's weighted mean."""
    from geoloc_ray.train.batches import location_keys
    from geoloc_ray.train.losses import GlobalBatch, info_nce

    keys = [to_device(k, ctx.device) for k in location_keys(location_ids, *([] if hard is None else [hard_ids]))]
    locs, hard_locs = keys[0], (keys[1] if hard is not None else None)
    everyone = None
    if ctx.sizes is not None and ctx.cfg.train.global_negatives:
        from geoloc_ray.train.parallel import gather_rows, world

        sizes = ctx.sizes
        everyone = GlobalBatch(gather_rows(t, sizes, grad=True), gather_rows(v, sizes, grad=True),
                               gather_rows(locs, sizes), sum(sizes[: world()[0]]))
        if hard is not None:  # mining gives every query the same number of negatives
            per_query = len(hard) // len(t)
            hard_sizes = [n * per_query for n in sizes]
            everyone.hard_negatives = gather_rows(hard, hard_sizes, grad=True)
            everyone.hard_locations = gather_rows(hard_locs, hard_sizes)
    total = None
    if weights is not None and ctx.sizes is not None:
        from geoloc_ray.train.parallel import gather_rows, world

        total = gather_rows(weights, ctx.sizes).sum() / world()[1]
    return info_nce(t, v, locs, ctx.cfg.train.temperature, hard, hard_locs, everyone, weights, total)


def _row_weights(ctx: StepContext, platforms) -> torch.Tensor | None:
    """An expert's own platform weighs 1, the others `job.other_platform_weight` (None: no weighting)."""
    import torch

    w = ctx.job.other_platform_weight
    if w is None:
        return None
    own = to_device(torch.as_tensor(np.asarray(platforms) == ctx.job.head), ctx.device)
    return torch.where(own, 1.0, float(w))


# ----- losses per kind -------------------------------------------------------------------------------------------
def pairs_loss(ctx: StepContext, batch: dict[str, np.ndarray]) -> Loss:
    pixels = enc.pixels(ctx, batch["pixels"], batch["platform"])
    if ctx.cfg.train.text_composition == "tokens" and ctx.job.text_layers:
        with enc.autocast(ctx):
            t = enc.query_text(ctx, ctx.sampler.texts(batch["texts"]))
            v = enc.image(ctx, pixels)
    else:
        t = enc.statement_text(ctx, ctx.sampler.statements(batch["texts"]))
        with enc.autocast(ctx):
            v = enc.image(ctx, pixels)
    t, v = t.float(), v.float()
    loss = _contrastive(ctx, t, v, batch["location_id"], weights=_row_weights(ctx, batch["platform"]))
    return loss, _accuracy(t, v)


def _triplet_images(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The positives, then each row's hard negatives in row order; and each image's platform."""
    pos, neg = batch["pixels"], batch["neg_pixels"]
    b, n = neg.shape[:2]
    platforms = np.concatenate([batch["platform"], np.repeat(batch["platform"], n)])
    return np.concatenate([pos, neg.reshape(b * n, *neg.shape[2:])]), platforms


def _triplets_contrastive(ctx: StepContext, batch: dict[str, np.ndarray], t: torch.Tensor, v_all: torch.Tensor
                          ) -> torch.Tensor:
    b = len(t)
    return _contrastive(ctx, t, v_all[:b], batch["location_id"], v_all[b:], batch["neg_location_ids"])


def triplets_loss(ctx: StepContext, batch: dict[str, np.ndarray]) -> Loss:
    pixels = enc.pixels(ctx, *_triplet_images(batch))
    with enc.autocast(ctx):
        t = enc.query_text(ctx, [str(q) for q in batch["query"]])
        v_all = enc.image(ctx, pixels)
    t, v_all = t.float(), v_all.float()
    return _triplets_contrastive(ctx, batch, t, v_all), _accuracy(t, v_all)


def triplets_step(ctx: StepContext, batch: dict[str, np.ndarray]) -> Loss:
    """Stage 2's forward and backward. With `job.grad_cache_chunk` images pass the trainable layers that many at a
    time (GradCache, `grad_cache`): the positives and hard negatives of a production batch (640 images through 4
    EVA-L blocks) do not fit one GPU's activations at once; the gradients are the one-shot step's."""
    if not ctx.job.grad_cache_chunk:
        return loss_step(ctx, batch, triplets_loss)
    images, platforms = _triplet_images(batch)
    host = ctx.preprocess(images, augment=ctx.augment, augment_mask=platforms == "satellite")  # to the device by chunk
    with enc.autocast(ctx):
        t = enc.query_text(ctx, [str(q) for q in batch["query"]]).float()  # its graph waits for the last chunk
    loss, t_cached, v_cached = cached_triplets(ctx, batch, t, host)
    return loss, _accuracy(t_cached, v_cached)


def cached_triplets(ctx: StepContext, batch: dict[str, np.ndarray], t: torch.Tensor, host: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GradCache part of `triplets_step` (the planner measures it as is): from the query embeddings `t` with
    their graph and every image's model input on the host, through the backward; (loss, text and image
    embeddings), detached."""
    import torch

    from geoloc_ray.train.grad_cache import ChunkedEncoder, chunks

    constant, trainable = enc.image_stages(ctx)
    images = ChunkedEncoder(lambda rows: constant(host[rows]), trainable, chunks(len(host), ctx.job.grad_cache_chunk))
    t_cached, v_cached = t.detach().requires_grad_(), images.embeddings().requires_grad_()
    loss = _triplets_contrastive(ctx, batch, t_cached, v_cached)
    grad_t, grad_v = torch.autograd.grad(loss, [t_cached, v_cached])
    images.backward(grad_v, last=lambda: (t * grad_t).sum(), ddp=ctx.parallel)
    return loss.detach(), t_cached.detach(), v_cached.detach()


def loss_step(ctx: StepContext, batch: dict[str, np.ndarray], loss_of: Callable[..., Loss]) -> Loss:
    """Forward (through DDP with several workers) and backward of a kind whose loss is one graph."""
    loss, acc = (ctx.parallel or loss_of)(ctx, batch)
    loss.backward()
    return loss.detach(), acc


def platform_gate_loss(ctx: StepContext, batch: dict[str, np.ndarray]) -> Loss:
    import torch

    from geoloc_ray.train.losses import gate_loss

    idx, rows = batch["rows"], gate_rows(ctx).rows
    groups = ctx.sampler.statements(rows["texts"][idx])
    x = to_device(enc.group_mean(enc.cached(ctx, groups, enc.trunk_features), groups), ctx.device)
    y = to_device(torch.as_tensor([ctx.model.platforms.index(p) for p in rows["platform"][idx]]), ctx.device)
    logits = ctx.model.gate.logits(x)
    return gate_loss(logits, y), logits.detach().argmax(1).eq(y).float().mean()


def fused_gate_loss(ctx: StepContext, batch: dict[str, np.ndarray]) -> Loss:
    """Each query against the whole held-out gallery under S = sum_k g_k S_k; any image of its location counts."""
    import torch
    import torch.nn.functional as F

    from geoloc_ray.train.losses import fused_logits, gate_anchor, multi_positive_nce

    idx, state = batch["rows"], gate_rows(ctx)
    groups = ctx.sampler.statements(state.rows["texts"][idx])
    features = enc.cached(ctx, groups, enc.fused_features)
    x = to_device(enc.group_mean({s: f[0] for s, f in features.items()}, groups), ctx.device)
    with torch.no_grad():
        queries = [F.normalize(ctx.model.heads[name].text.proj(to_device(
                       enc.group_mean({s: f[1][k] for s, f in features.items()}, groups), ctx.device)), dim=-1)
                   for k, name in enumerate(ctx.model.platforms)]
    per_expert = torch.stack([q @ g.T for q, g in zip(queries, state.gallery, strict=True)], dim=1)
    gate_logits = ctx.model.gate.scaled(ctx.model.gate.logits(x))  # the routing's logits (model.gate_temperature)
    logits = fused_logits(gate_logits.softmax(-1), per_expert, ctx.cfg.train.temperature)
    keys = to_device(torch.as_tensor(state.rows["location_keys"][idx]), logits.device)
    positives = keys[:, None] == state.gallery_keys[None]
    top1 = positives.gather(1, logits.argmax(1, keepdim=True)).float().mean()
    loss = multi_positive_nce(logits, positives)
    if ctx.cfg.train.gate_fused_anchor > 0:  # keep what the many training locations taught (or equal weights)
        starting = state.anchor_gate if state.anchor_gate is not None else ctx.model.gate  # `equal` reads its K
        with torch.no_grad():
            anchor = anchor_weights(ctx.cfg.train.gate_fused_prior, starting, x)
        loss = loss + ctx.cfg.train.gate_fused_anchor * gate_anchor(gate_logits, anchor)
    return loss, top1


def anchor_weights(prior: str, starting_gate, x):
    """The (B, K) weights the fused tuning is pulled toward: the frozen starting gate's (`platform_gate`) or 1/K
    each (`equal`, the static ensemble's)."""
    import torch

    if prior == "equal":
        k = len(starting_gate.platforms)
        return torch.full((x.shape[0], k), 1.0 / k, device=x.device, dtype=torch.float32)
    if prior == "platform_gate":
        return starting_gate(x)
    raise ValueError(f"train.gate_fused_prior must be platform_gate or equal, got {prior!r}")
