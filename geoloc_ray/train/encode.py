"""The encoders a train step calls, over a worker's `StepContext`: the frozen trunk (no activations kept, its
outputs cached per statement) and the trainable head, under bf16 autocast where configured.

Host data crosses to a GPU through `devices.to_device` (pinned, non-blocking): a plain `.to("cuda")` of host memory
waits for the GPU to finish its queued work first. Images cross as uint8 and are augmented and normalised there.

torch is imported inside the functions: the recipe imports this module (through `kinds` and `steps`) at CLI start.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from geoloc_ray.devices import to_device

if TYPE_CHECKING:
    import torch

    from geoloc_ray.train.worker_types import StepContext

GALLERY_BATCH = 256  # images per forward pass when embedding the fused gate's held-out gallery
# texts per call of a head's text layers, grouped by length: 118 demo statements' layers fwd+bwd took 235 ms in one
# padded batch, 204 / 177 / 185 ms in chunks of 16 / 32 / 64 (2 threads, AMD EPYC)
TAIL_CHUNK = 32


def autocast(ctx: StepContext):
    """bf16 matmuls where the hardware has them; losses are computed in fp32."""
    import torch

    return torch.autocast(torch.device(ctx.device).type, dtype=torch.bfloat16, enabled=ctx.cfg.train.bf16)


def uint8_on_device(ctx: StepContext, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) images on the worker's device (a quarter of float32's bytes over PCIe)."""
    import torch

    return to_device(torch.from_numpy(np.ascontiguousarray(images)), ctx.device)


def pixels(ctx: StepContext, images: np.ndarray, platforms: np.ndarray) -> torch.Tensor:
    """Model input, made on the device; satellite images (only) get the report's augmentation, anew every step."""
    mask = np.asarray(platforms) == "satellite"
    return ctx.preprocess(uint8_on_device(ctx, images), augment=ctx.augment, augment_mask=mask)


def image(ctx: StepContext, x: torch.Tensor) -> torch.Tensor:
    import torch

    model, head = ctx.model, ctx.job.head
    if ctx.job.image_trunk:
        return model.image_head(head, model.image_trunk_output(x))
    with torch.no_grad():
        trunk = model.image_trunk_output(x)
    return model.image_head(head, trunk)


def image_stages(ctx: StepContext) -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]:
    """The image encoder in two parts for a chunked step (`grad_cache`): the constant part, run once per chunk
    (host pixels to the device, and the frozen trunk's output), and the part that trains (the head; the trunk
    too when the job trains it), which runs again with a graph. Both as `image` under autocast; fp32 out."""
    import torch

    def constant(x: torch.Tensor) -> Any:
        x = to_device(x, ctx.device)
        if ctx.job.image_trunk:
            return x
        with torch.no_grad(), autocast(ctx):
            return ctx.model.image_trunk_output(x)

    def trainable(x: Any) -> torch.Tensor:
        with autocast(ctx):
            v = image(ctx, x) if ctx.job.image_trunk else ctx.model.image_head(ctx.job.head, x)
        return v.float()

    return constant, trainable


def query_text(ctx: StepContext, texts: list[str]) -> torch.Tensor:
    """Whole texts through the frozen trunk (no activations kept) and the head, its layers by length (`tail`).
    Tokenised on the host, so each text's length is known there (split on the device's mask would wait for it)."""
    import torch
    import torch.nn.functional as F

    from geoloc_ray.model.text_tower import tokenize

    tokens = tokenize(ctx.model.tokenizer, texts, ctx.model.model_cfg.text.max_length, "cpu")
    lengths = tokens["attention_mask"].sum(dim=1).tolist()
    with torch.no_grad():
        trunk = ctx.model.text_trunk_output({k: to_device(v, ctx.device) for k, v in tokens.items()})
    head = ctx.model.heads[ctx.job.head].text
    return F.normalize(head.proj(tail(ctx, head, split(trunk, lengths))), dim=-1)


def split(trunk, lengths: list[int]) -> list:
    """`TextTrunkOutput.split` with the lengths known on the host."""
    from geoloc_ray.model import TextTrunkOutput

    return [TextTrunkOutput(trunk.hidden[i : i + 1, :n], trunk.attention_mask[i : i + 1, :n], trunk.pooled[i : i + 1])
            for i, n in enumerate(lengths)]


def tail(ctx: StepContext, head, parts: list) -> torch.Tensor:
    """Pooled outputs of the head's text layers (the part that trains) for per-text trunk outputs, in their order.

    Run over chunks of similar length: one padded batch spent half its tokens on padding (the demo's statements),
    and the layers' matmuls pay for every one. Padding is masked, so the result is the same up to rounding.
    """
    import torch

    from geoloc_ray.model import TextTrunkOutput

    order = sorted(range(len(parts)), key=lambda i: parts[i].hidden.shape[1])  # trimmed: no GPU sync per text
    chunks = [TextTrunkOutput.cat([parts[i] for i in order[s : s + TAIL_CHUNK]]) for s in range(0, len(order), TAIL_CHUNK)]
    with autocast(ctx):
        pooled = torch.cat([head.tail(_on_device(ctx, chunk)).float() for chunk in chunks])
    return pooled[to_device(torch.as_tensor(order).argsort(), pooled.device)]


def _on_device(ctx: StepContext, trunk):
    """A trunk output (cached on the host, or already on the device) on the worker's device."""
    from dataclasses import fields, replace

    return replace(trunk, **{f.name: to_device(getattr(trunk, f.name), ctx.device) for f in fields(trunk)})


def trunk_outputs(ctx: StepContext, statements: list[str]) -> list:
    import torch

    with torch.no_grad(), autocast(ctx):
        out = ctx.model.text_trunk_output(statements)
    return [o.to("cpu") for o in out.split()]


def tail_features(ctx: StepContext, statements: list[str]) -> list:
    """Pooled features of the job's head text layers, when they are locked (a fixed function of a statement)."""
    import torch

    with torch.no_grad(), autocast(ctx):
        return list(ctx.model.heads[ctx.job.head].text.tail(ctx.model.text_trunk_output(statements)).float().cpu())


def trunk_features(ctx: StepContext, statements: list[str]) -> list:
    import torch

    with torch.no_grad(), autocast(ctx):
        return list(ctx.model.text_trunk_output(statements).pooled.float().cpu())


def fused_features(ctx: StepContext, statements: list[str]) -> list:
    """(trunk query feature, [each frozen expert's pooled text feature]) per statement, from one trunk call."""
    import torch

    with torch.no_grad(), autocast(ctx):
        trunk = ctx.model.text_trunk_output(statements)
        pooled = trunk.pooled.float().cpu()
        tails = [ctx.model.heads[k].text.tail(trunk).float().cpu() for k in ctx.model.platforms]
    return [(pooled[i], [t[i] for t in tails]) for i in range(len(statements))]


def cached(ctx: StepContext, groups: list[list[str]], compute) -> dict[str, Any]:
    unique = sorted({s for g in groups for s in g})
    return dict(zip(unique, ctx.cache.get(unique, partial(compute, ctx)), strict=True))


def group_mean(features: dict[str, torch.Tensor], groups: list[list[str]]) -> torch.Tensor:
    """A multi-statement text is the mean of its statements' features."""
    import torch

    return torch.stack([torch.stack([features[s] for s in g]).mean(0) for g in groups])


def statement_text(ctx: StepContext, groups: list[list[str]]) -> torch.Tensor:
    """Unit embeddings of multi-statement texts: each distinct statement goes through the head's text layers once
    per step from its cached trunk output (or, with locked text layers, its cached pooled feature), a text is
    the mean of its statements' pooled features, then the projection."""
    import torch.nn.functional as F

    head = ctx.model.heads[ctx.job.head].text
    if ctx.job.text_layers:
        trunk = cached(ctx, groups, trunk_outputs)
        unique = sorted(trunk)
        features = dict(zip(unique, tail(ctx, head, [trunk[s] for s in unique]), strict=True))
    else:
        features = {s: to_device(f, ctx.device) for s, f in cached(ctx, groups, tail_features).items()}
    return F.normalize(head.proj(group_mean(features, groups)), dim=-1)


def expert_gallery(ctx: StepContext, images: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
    """Each frozen expert's unit vectors of these uint8 (N, H, W, 3) images (no augmentation: a fixed gallery), a
    batch at a time. A tensor is taken as is (the planner's fake images); host arrays cross pinned."""
    import torch

    parts: list[list[torch.Tensor]] = [[] for _ in ctx.model.platforms]
    with torch.no_grad(), autocast(ctx):
        for i in range(0, len(images), GALLERY_BATCH):
            batch = images[i : i + GALLERY_BATCH]
            x = batch.to(ctx.device) if isinstance(batch, torch.Tensor) else uint8_on_device(ctx, batch)
            trunk = ctx.model.image_trunk_output(ctx.preprocess(x))
            for k, name in enumerate(ctx.model.platforms):
                parts[k].append(ctx.model.image_head(name, trunk).float())
    empty = torch.zeros(0, ctx.model.model_cfg.embed_dim, device=ctx.device)
    return [torch.cat(p) if p else empty for p in parts]
