"""One training step per kind of job: plain batch sources and loss functions over a worker's `StepContext`.

pairs: in-batch InfoNCE on (image, a query-like text of 1..N of its statements): stage 0 and expert stage 1.
triplets: stage 2, in-batch negatives plus each query's mined hard negatives (never of its own location).
gate: the platform of each query's image, from the frozen trunk's query feature.
gate_fused: the gate on the fused retrieval loss over held-out locations, experts frozen.
torch is imported inside the functions: the recipe imports this module (through `kinds`) on the CLI path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from geoloc_ray.config import Config
from geoloc_ray.train import shards
from geoloc_ray.train.cache import TrunkCache

if TYPE_CHECKING:
    import torch

    from geoloc_ray.train.batches import TextSampler
    from geoloc_ray.train.loop import JobSpec

Loss = tuple["torch.Tensor", float]  # (loss to minimise, batch accuracy for the log)


@dataclass
class StepContext:
    """What a kind's batches and loss read on one worker; the gate kinds fill `rows` (and `gallery`) once."""

    model: Any
    job: JobSpec
    cfg: Config
    rng: np.random.Generator
    device: Any
    shard: Any  # this worker's Ray Data shard
    epochs: shards.ShardEpochs
    sampler: TextSampler
    preprocess: Callable[..., torch.Tensor]
    augment: Any | None
    cache: TrunkCache
    rows: dict[str, np.ndarray] | None = None
    gallery: list[torch.Tensor] | None = None  # gate_fused: each expert's vectors of the held-out images


def _unstyler(cfg: Config) -> Callable[[str], str] | None:
    """The inverse of the refiner's platform phrasing, from the same vocabulary the refine stage used."""
    if cfg.train.style_dropout <= 0:
        return None
    from geoloc_ray.captions.rules import style_patterns, unstyle
    from geoloc_ray.captions.vocabulary import load_vocabulary

    return partial(unstyle, patterns=style_patterns(load_vocabulary(cfg.refine.vocabulary)))


def make_context(model, job: JobSpec, cfg: Config, rng: np.random.Generator, device, shard) -> StepContext:
    """The worker's step context; the augmentation's seed is the first draw from `rng` (then the text sampler's)."""
    from geoloc_ray.model import SatelliteAugment, image_preprocess
    from geoloc_ray.train.batches import TextSampler

    preprocess = image_preprocess(model)
    sampler = TextSampler(rng, cfg.train.statements_per_text, _unstyler(cfg), cfg.train.style_dropout)
    augment = None
    if cfg.preprocess.augment.enabled:
        augment = SatelliteAugment(cfg.preprocess.augment, seed=int(rng.integers(2**31)))
    epochs = shards.ShardEpochs(shard, cfg.train.batch_size, job.seed, cfg.train.cache_shard_mb * 2**20)
    return StepContext(model, job, cfg, rng, device, shard, epochs, sampler, preprocess, augment,
                       TrunkCache(cfg.train.trunk_cache_items))


# ----- batch sources ---------------------------------------------------------------------------------------------
def shard_batches(ctx: StepContext, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """pairs and triplets: the decoded rows Ray Data shards to this worker (kept in memory when small)."""
    return ctx.epochs.batches(epoch)


def gate_batches(ctx: StepContext, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """Row indices into the shard's texts, read once; a fresh order from the worker's generator every epoch."""
    if ctx.rows is None:
        rows = shards.all_rows(ctx.shard, ["texts", "platform"])
        has_text = np.array([len(t) > 0 for t in rows["texts"]], dtype=bool)
        ctx.rows = {k: v[has_text] for k, v in rows.items()}
    return _row_batches(ctx)


def fused_batches(ctx: StepContext, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """As `gate_batches`; the held-out images become a fixed gallery under every (frozen) expert once."""
    if ctx.rows is None:
        rows = shards.all_rows(ctx.shard, ["texts", "location_id", "pixels"])
        ctx.gallery = _expert_gallery(ctx, rows.pop("pixels"))
        ctx.rows = {**rows, "location_id": rows["location_id"].astype(str)}
    return _row_batches(ctx)


def _row_batches(ctx: StepContext) -> Iterator[dict[str, np.ndarray]]:
    for idx in shards.shuffled(ctx.rng, len(ctx.rows["texts"]), ctx.cfg.train.batch_size):
        yield {"rows": idx}


# ----- encoders --------------------------------------------------------------------------------------------------
def _autocast(ctx: StepContext):
    """bf16 matmuls where the hardware has them; losses are computed in fp32."""
    import torch

    return torch.autocast(torch.device(ctx.device).type, dtype=torch.bfloat16, enabled=ctx.cfg.train.bf16)


def _pixels(ctx: StepContext, pixels: np.ndarray, platforms: np.ndarray) -> torch.Tensor:
    """Model input; satellite images (only) get the report's augmentation, anew every step."""
    mask = np.asarray(platforms) == "satellite"
    return ctx.preprocess(pixels, augment=ctx.augment, augment_mask=mask).to(ctx.device)


def _image(ctx: StepContext, pixels: torch.Tensor) -> torch.Tensor:
    import torch

    model, head = ctx.model, ctx.job.head
    if ctx.job.image_trunk:
        return model.image_head(head, model.image_trunk_output(pixels))
    with torch.no_grad():
        trunk = model.image_trunk_output(pixels)
    return model.image_head(head, trunk)


def _query_text(ctx: StepContext, texts: list[str]) -> torch.Tensor:
    """Whole texts through the frozen trunk (no activations kept) and the head."""
    import torch

    with torch.no_grad():
        trunk = ctx.model.text_trunk_output(texts)
    return ctx.model.text_head(ctx.job.head, trunk)


def _trunk_outputs(ctx: StepContext, statements: list[str]) -> list:
    import torch

    with torch.no_grad(), _autocast(ctx):
        out = ctx.model.text_trunk_output(statements)
    return [o.to("cpu") for o in out.split()]


def _tail_features(ctx: StepContext, statements: list[str]) -> list:
    """Pooled features of the job's head text layers, when they are locked (a fixed function of a statement)."""
    import torch

    with torch.no_grad(), _autocast(ctx):
        return list(ctx.model.heads[ctx.job.head].text.tail(ctx.model.text_trunk_output(statements)).float().cpu())


def _trunk_features(ctx: StepContext, statements: list[str]) -> list:
    import torch

    with torch.no_grad(), _autocast(ctx):
        return list(ctx.model.text_trunk_output(statements).pooled.float().cpu())


def _fused_features(ctx: StepContext, statements: list[str]) -> list:
    """(trunk query feature, [each frozen expert's pooled text feature]) per statement, from one trunk call."""
    import torch

    with torch.no_grad(), _autocast(ctx):
        trunk = ctx.model.text_trunk_output(statements)
        pooled = trunk.pooled.float().cpu()
        tails = [ctx.model.heads[k].text.tail(trunk).float().cpu() for k in ctx.model.platforms]
    return [(pooled[i], [t[i] for t in tails]) for i in range(len(statements))]


def _cached(ctx: StepContext, groups: list[list[str]], compute) -> dict[str, Any]:
    unique = sorted({s for g in groups for s in g})
    return dict(zip(unique, ctx.cache.get(unique, partial(compute, ctx)), strict=True))


def _group_mean(features: dict[str, torch.Tensor], groups: list[list[str]]) -> torch.Tensor:
    """A multi-statement text is the mean of its statements' features."""
    import torch

    return torch.stack([torch.stack([features[s] for s in g]).mean(0) for g in groups])


def _statement_text(ctx: StepContext, groups: list[list[str]]) -> torch.Tensor:
    """Unit embeddings of multi-statement texts: each distinct statement goes through the head's text layers once
    per step from its cached trunk output (or, with locked text layers, its cached pooled feature), a text is
    the mean of its statements' pooled features, then the projection."""
    import torch.nn.functional as F

    from geoloc_ray.model import TextTrunkOutput

    head = ctx.model.heads[ctx.job.head].text
    if ctx.job.text_layers:
        trunk = _cached(ctx, groups, _trunk_outputs)
        unique = sorted(trunk)
        with _autocast(ctx):
            pooled = head.tail(TextTrunkOutput.cat([trunk[s] for s in unique]).to(ctx.device)).float()
        features = dict(zip(unique, pooled, strict=True))
    else:
        features = {s: f.to(ctx.device) for s, f in _cached(ctx, groups, _tail_features).items()}
    return F.normalize(head.proj(_group_mean(features, groups)), dim=-1)


def _expert_gallery(ctx: StepContext, pixels: np.ndarray) -> list[torch.Tensor]:
    import torch

    x = ctx.preprocess(pixels).to(ctx.device)  # no augmentation: a fixed gallery
    with torch.no_grad(), _autocast(ctx):
        trunk = ctx.model.image_trunk_output(x)
        return [ctx.model.image_head(k, trunk).float() for k in ctx.model.platforms]


def _accuracy(text: torch.Tensor, image: torch.Tensor) -> float:
    import torch

    with torch.no_grad():
        hits = (text @ image[: len(text)].T).argmax(1).eq(torch.arange(len(text), device=text.device))
        return float(hits.float().mean())


# ----- losses per kind -------------------------------------------------------------------------------------------
def pairs_loss(ctx: StepContext, batch: dict[str, np.ndarray]) -> Loss:
    from geoloc_ray.train.batches import location_codes
    from geoloc_ray.train.losses import info_nce

    pixels = _pixels(ctx, batch["pixels"], batch["platform"])
    if ctx.cfg.train.text_composition == "tokens" and ctx.job.text_layers:
        with _autocast(ctx):
            t = _query_text(ctx, ctx.sampler.texts(batch["texts"]))
            v = _image(ctx, pixels)
    else:
        t = _statement_text(ctx, ctx.sampler.statements(batch["texts"]))
        with _autocast(ctx):
            v = _image(ctx, pixels)
    t, v = t.float(), v.float()
    (locs,) = location_codes(batch["location_id"])
    return info_nce(t, v, locs.to(ctx.device), ctx.cfg.train.temperature), _accuracy(t, v)


def triplets_loss(ctx: StepContext, batch: dict[str, np.ndarray]) -> Loss:
    from geoloc_ray.train.batches import location_codes
    from geoloc_ray.train.losses import info_nce

    pos, neg = batch["pixels"], batch["neg_pixels"]
    b, n = neg.shape[:2]
    platforms = np.concatenate([batch["platform"], np.repeat(batch["platform"], n)])
    pixels = _pixels(ctx, np.concatenate([pos, neg.reshape(b * n, *neg.shape[2:])]), platforms)
    with _autocast(ctx):
        t = _query_text(ctx, [str(q) for q in batch["query"]])
        v_all = _image(ctx, pixels)
    t, v_all = t.float(), v_all.float()
    v, hard = v_all[:b], v_all[b:]
    locs, hard_locs = location_codes(batch["location_id"], batch["neg_location_ids"])
    loss = info_nce(t, v, locs.to(ctx.device), ctx.cfg.train.temperature, hard, hard_locs.to(ctx.device))
    return loss, _accuracy(t, v)


def platform_gate_loss(ctx: StepContext, batch: dict[str, np.ndarray]) -> Loss:
    import torch

    from geoloc_ray.train.losses import gate_loss

    idx = batch["rows"]
    groups = ctx.sampler.statements(ctx.rows["texts"][idx])
    x = _group_mean(_cached(ctx, groups, _trunk_features), groups).to(ctx.device)
    y = torch.as_tensor([ctx.model.platforms.index(p) for p in ctx.rows["platform"][idx]], device=ctx.device)
    logits = ctx.model.gate.logits(x)
    return gate_loss(logits, y), float(logits.argmax(1).eq(y).float().mean())


def fused_gate_loss(ctx: StepContext, batch: dict[str, np.ndarray]) -> Loss:
    """Each query against the whole held-out gallery under S = sum_k g_k S_k; any image of its location counts."""
    import torch
    import torch.nn.functional as F

    from geoloc_ray.train.losses import fused_logits, multi_positive_nce

    idx = batch["rows"]
    groups = ctx.sampler.statements(ctx.rows["texts"][idx])
    features = _cached(ctx, groups, _fused_features)
    x = _group_mean({s: f[0] for s, f in features.items()}, groups).to(ctx.device)
    with torch.no_grad():
        queries = [F.normalize(ctx.model.heads[name].text.proj(
                       _group_mean({s: f[1][k] for s, f in features.items()}, groups).to(ctx.device)), dim=-1)
                   for k, name in enumerate(ctx.model.platforms)]
    per_expert = torch.stack([q @ g.T for q, g in zip(queries, ctx.gallery, strict=True)], dim=1)
    logits = fused_logits(ctx.model.gate(x), per_expert, ctx.cfg.train.temperature)
    locations = ctx.rows["location_id"]
    positives = torch.as_tensor(locations[idx][:, None] == locations[None], device=logits.device)
    top1 = positives.gather(1, logits.argmax(1, keepdim=True)).float().mean()
    return multi_positive_nce(logits, positives), float(top1)
