"""Per-kind batch iteration and loss for the train loop: pairs, triplets (hard negatives), gate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from geoloc_ray.config import Config
from geoloc_ray.train.batches import TextSampler, location_codes
from geoloc_ray.train.losses import gate_loss, info_nce


def _iter(shard, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                    local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed):
        if len(next(iter(batch.values()))) >= 2:  # a contrastive step needs at least one negative
            yield batch


def _accuracy(text: torch.Tensor, image: torch.Tensor) -> float:
    with torch.no_grad():
        return float((text @ image[: len(text)].T).argmax(1).eq(torch.arange(len(text))).float().mean())


def sync_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over the data-parallel workers (what DDP does; our heads run through split calls)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Start every worker from rank 0's weights."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in model.state_dict().values():
            dist.broadcast(p, src=0)


def _unstyler(cfg: Config):
    """The inverse of the refiner's platform phrasing, from the same vocabulary the refine stage used."""
    if cfg.train.style_dropout <= 0:
        return None
    from geoloc_ray.captions.rules import style_patterns, unstyle
    from geoloc_ray.captions.vocabulary import load_vocabulary

    patterns = style_patterns(load_vocabulary(cfg.refine.vocabulary))
    return lambda text: unstyle(text, patterns)


class _Runner:
    def __init__(self, model, job, cfg: Config, rng: np.random.Generator, device):
        from geoloc_ray.model import SatelliteAugment, image_preprocess

        self.model, self.job, self.cfg, self.rng, self.device = model, job, cfg, rng, device
        self._kept: dict[str, np.ndarray] | None = None  # this worker's shard, after a first streamed epoch
        self.preprocess = image_preprocess(model)
        self.sampler = TextSampler(rng, cfg.train.statements_per_text, _unstyler(cfg), cfg.train.style_dropout)
        self.augment = None
        if cfg.preprocess.augment.enabled:
            self.augment = SatelliteAugment(cfg.preprocess.augment, seed=int(rng.integers(2**31)))

    def batches(self, shard, epoch: int) -> Iterator[dict[str, Any]]:
        if self._kept is not None:
            return self._memory_batches(epoch)
        return self._streamed_batches(shard, epoch)

    def _streamed_batches(self, shard, epoch: int) -> Iterator[dict[str, Any]]:
        """Stream the shard from Ray Data; keep it when it fits `train.cache_shard_mb`, so later epochs do not
        re-stream it (on a small node the streaming competes with the step for the same cores)."""
        limit, size = self.cfg.train.cache_shard_mb * 2**20, 0
        kept: list[dict[str, np.ndarray]] | None = [] if limit > 0 else None
        for batch in _iter(shard, self.cfg.train.batch_size, self.job.seed + epoch):
            if kept is not None:
                size += sum(v.nbytes for v in batch.values())
                if size <= limit:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        if kept:
            self._kept = {k: np.concatenate([b[k] for b in kept]) for k in kept[0]}

    def _memory_batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        bs, n = self.cfg.train.batch_size, len(next(iter(self._kept.values())))
        order = np.random.default_rng(self.job.seed + epoch).permutation(n)
        for i in range(0, n - 1, bs):  # a contrastive step needs at least one negative
            idx = order[i : i + bs]
            if len(idx) >= 2:
                yield {k: v[idx] for k, v in self._kept.items()}

    def autocast(self):
        """bf16 matmuls where the hardware has them; the loss itself is computed in fp32."""
        device_type = torch.device(self.device).type
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16)

    def pixels(self, pixels: np.ndarray, platforms: np.ndarray) -> torch.Tensor:
        """Model input; satellite images (only) get the report's augmentation, anew every step."""
        return self.preprocess(pixels, augment=self.augment,
                               augment_mask=np.asarray(platforms) == "satellite").to(self.device)

    def encode(self, texts: list[str], pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, head = self.model, self.job.head
        with torch.no_grad():  # the text trunk is frozen: no activations kept for it
            trunk = m.text_trunk_output(texts)
        return m.text_head(head, trunk), self.encode_image(pixels)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        m, head = self.model, self.job.head
        if self.job.image_trunk:
            return m.image_head(head, m.image_trunk_output(pixels))
        with torch.no_grad():
            image_trunk = m.image_trunk_output(pixels)
        return m.image_head(head, image_trunk)


class PairRunner(_Runner):
    """In-batch InfoNCE on (image, a query-like text made of 1..N of its statements)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trunk_cache: dict[str, Any] = {}  # statement -> its frozen text-trunk output (or locked feature)

    def _cached_trunk(self, statements: list[str]):
        from geoloc_ray.model import TextTrunkOutput

        missing = [s for s in statements if s not in self.trunk_cache]
        for i in range(0, len(missing), 256):
            chunk = missing[i : i + 256]
            with torch.no_grad(), self.autocast():
                out = self.model.text_trunk_output(chunk)
            self.trunk_cache.update(zip(chunk, [o.to("cpu") for o in out.split()], strict=True))
        return TextTrunkOutput.cat([self.trunk_cache[s] for s in statements]).to(self.device)

    def statement_text(self, groups: list[list[str]]) -> torch.Tensor:
        """Unit text embeddings of multi-statement texts: each distinct statement goes through the head's text
        layers once per step (its frozen trunk output is cached), a text is the mean of its statements' pooled
        features, then the projection. Locked text layers make the pooled features themselves cacheable."""
        head = self.model.heads[self.job.head].text
        unique = sorted({s for g in groups for s in g})
        if self.job.text_layers:
            with self.autocast():
                pooled = head.tail(self._cached_trunk(unique)).float()
        else:
            missing = [s for s in unique if s not in self.trunk_cache]
            if missing:
                with torch.no_grad(), self.autocast():
                    feats = head.tail(self.model.text_trunk_output(missing)).float().cpu()
                self.trunk_cache.update(zip(missing, feats, strict=True))
            pooled = torch.stack([self.trunk_cache[s] for s in unique]).to(self.device)
        where = {s: i for i, s in enumerate(unique)}
        texts = torch.stack([pooled[[where[s] for s in g]].mean(0) for g in groups])
        return torch.nn.functional.normalize(head.proj(texts), dim=-1)

    def loss(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, float]:
        pixels = self.pixels(batch["pixels"], batch["platform"])
        if self.cfg.train.text_composition == "tokens" and self.job.text_layers:
            with self.autocast():
                t, v = self.encode(self.sampler.texts(batch["texts"]), pixels)
        else:
            t = self.statement_text(self.sampler.statements(batch["texts"]))
            with self.autocast():
                v = self.encode_image(pixels)
        t, v = t.float(), v.float()
        (locs,) = location_codes(batch["location_id"])
        return info_nce(t, v, locs.to(self.device), self.cfg.train.temperature), _accuracy(t, v)


class TripletRunner(_Runner):
    """Stage 2: in-batch negatives plus each query's mined hard negatives (never its own location)."""

    def loss(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, float]:
        pos, neg = batch["pixels"], batch["neg_pixels"]
        b, n = neg.shape[:2]
        platforms = np.concatenate([batch["platform"], np.repeat(batch["platform"], n)])
        pixels = self.pixels(np.concatenate([pos, neg.reshape(b * n, *neg.shape[2:])]), platforms)
        with self.autocast():
            t, v_all = self.encode([str(q) for q in batch["query"]], pixels)
        t, v_all = t.float(), v_all.float()
        v, hard = v_all[:b], v_all[b:]
        locs, hard_locs = location_codes(batch["location_id"], batch["neg_location_ids"])
        loss = info_nce(t, v, locs.to(self.device), self.cfg.train.temperature, hard, hard_locs.to(self.device))
        return loss, _accuracy(t, v)


class GateRunner(_Runner):
    """The gate reads only the frozen trunk's query feature: each statement's feature is computed once, a
    multi-statement query is the mean of its statements' features, and the MLP trains on those."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[tuple[list[str], int]] | None = None
        self.features: dict[str, torch.Tensor] = {}

    def _feature(self, groups: list[list[str]]) -> torch.Tensor:
        missing = sorted({s for g in groups for s in g} - self.features.keys())
        for i in range(0, len(missing), 256):
            chunk = missing[i : i + 256]
            with torch.no_grad(), self.autocast():
                pooled = self.model.text_trunk_output(chunk).pooled.float().cpu()
            self.features.update(zip(chunk, pooled, strict=True))
        return torch.stack([torch.stack([self.features[s] for s in g]).mean(0) for g in groups])

    def batches(self, shard, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        if self.rows is None:
            platforms = self.model.platforms
            self.rows = [(list(t), platforms.index(p)) for b in shard.iter_batches(batch_format="numpy")
                         for t, p in zip(b["texts"], b["platform"], strict=True) if len(t)]
        order = self.rng.permutation(len(self.rows))
        bs = self.cfg.train.batch_size
        for i in range(0, len(order), bs):
            rows = [self.rows[j] for j in order[i : i + bs]]
            x = self._feature(self.sampler.statements([r[0] for r in rows]))
            yield {"x": x.to(self.device), "y": torch.as_tensor([r[1] for r in rows], device=self.device)}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        logits = self.model.gate.logits(batch["x"])
        return gate_loss(logits, batch["y"]), float(logits.argmax(1).eq(batch["y"]).float().mean())


class GateFusedRunner(GateRunner):
    """Tune the gate on the fused retrieval loss (DESIGN: S = sum_k g_k S_k) over held-out locations.

    Experts are frozen, so every expert's text feature per statement and image vector per gallery image is
    computed once; each step scores a batch of queries against the whole held-out gallery and rewards any image
    of the query's location (location-level retrieval, as evaluated).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.experts = list(self.model.platforms)
        self.expert_text: dict[str, list[torch.Tensor]] = {}
        self.gallery: list[torch.Tensor] = []
        self.gallery_locations: np.ndarray | None = None
        self.row_locations: np.ndarray | None = None

    def _load(self, shard) -> None:
        rows, pixels, locations = [], [], []
        for b in shard.iter_batches(batch_format="numpy", batch_size=256):
            for texts, platform, loc in zip(b["texts"], b["platform"], b["location_id"], strict=True):
                rows.append((list(texts), self.model.platforms.index(platform)))
                locations.append(str(loc))
            pixels.append(b["pixels"])
        self.rows, self.row_locations = rows, np.asarray(locations)
        self.gallery_locations = self.row_locations
        x = self.preprocess(np.concatenate(pixels)).to(self.device)  # no augmentation: a fixed gallery
        with torch.no_grad(), self.autocast():
            trunk = self.model.image_trunk_output(x)
            self.gallery = [self.model.image_head(k, trunk).float() for k in self.experts]

    def _expert_text(self, groups: list[list[str]]) -> list[torch.Tensor]:
        unique = sorted({s for g in groups for s in g} - self.expert_text.keys())
        if unique:
            with torch.no_grad(), self.autocast():
                trunk = self.model.text_trunk_output(unique)
                feats = [self.model.heads[k].text.tail(trunk).float().cpu() for k in self.experts]
            for i, s in enumerate(unique):
                self.expert_text[s] = [f[i] for f in feats]
        out = []
        for k, name in enumerate(self.experts):
            pooled = torch.stack([torch.stack([self.expert_text[s][k] for s in g]).mean(0) for g in groups])
            with torch.no_grad():
                out.append(torch.nn.functional.normalize(self.model.heads[name].text.proj(pooled), dim=-1))
        return out

    def batches(self, shard, epoch: int) -> Iterator[dict[str, Any]]:
        if self.rows is None:
            self._load(shard)
        order = self.rng.permutation(len(self.rows))
        bs = self.cfg.train.batch_size
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            groups = self.sampler.statements([self.rows[j][0] for j in idx])
            yield {"x": self._feature(groups).to(self.device), "texts": self._expert_text(groups),
                   "positives": torch.as_tensor(self.row_locations[idx][:, None] == self.gallery_locations[None])}

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, float]:
        weights = self.model.gate(batch["x"])  # (B, K)
        per_expert = torch.stack([t @ g.T for t, g in zip(batch["texts"], self.gallery, strict=True)], dim=1)
        logits = (weights[:, :, None] * per_expert).sum(1) / self.cfg.train.temperature  # (B, N)
        positives = batch["positives"].to(logits.device)
        loss = (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~positives, float("-inf")), 1))
        top1 = positives.gather(1, logits.argmax(1, keepdim=True)).float().mean()
        return loss.mean(), float(top1)


def make_runner(kind: str, model, job, cfg: Config, rng: np.random.Generator, device) -> _Runner:
    runners = {"pairs": PairRunner, "triplets": TripletRunner, "gate": GateRunner, "gate_fused": GateFusedRunner}
    if kind not in runners:
        raise ValueError(f"unknown job kind {kind!r}; expected one of {sorted(runners)}")
    return runners[kind](model, job, cfg, rng, device)
