"""Per-kind batch iteration and loss for the train loop: pairs, triplets (hard negatives), gate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from geoloc_ray.config import Config
from geoloc_ray.train.batches import location_codes, sample_texts
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


class _Runner:
    def __init__(self, model, job, cfg: Config, rng: np.random.Generator, device):
        from geoloc_ray.model import SatelliteAugment, image_preprocess

        self.model, self.job, self.cfg, self.rng, self.device = model, job, cfg, rng, device
        self.preprocess = image_preprocess(model)
        self.augment = None
        if cfg.preprocess.augment.enabled:
            self.augment = SatelliteAugment(cfg.preprocess.augment, seed=int(rng.integers(2**31)))

    def batches(self, shard, epoch: int) -> Iterator[dict[str, Any]]:
        return _iter(shard, self.cfg.train.batch_size, self.job.seed + epoch)

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
        t = m.text_head(head, trunk)
        if self.job.image_trunk:
            v = m.image_head(head, m.image_trunk_output(pixels))
        else:
            with torch.no_grad():
                image_trunk = m.image_trunk_output(pixels)
            v = m.image_head(head, image_trunk)
        return t, v


class PairRunner(_Runner):
    """In-batch InfoNCE on (image, one of its texts)."""

    def loss(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, float]:
        texts = sample_texts(batch["texts"], self.rng, self.cfg.train.statements_per_text)
        with self.autocast():
            t, v = self.encode(texts, self.pixels(batch["pixels"], batch["platform"]))
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
    """The gate sees only the frozen trunk's query feature: compute it once, then train the MLP on it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.features: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    def _cache(self, shard) -> None:
        platforms = self.model.platforms
        feats, labels = [], []
        for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
            with torch.no_grad():
                feats.append(self.model.text_trunk_output([str(t) for t in batch["text"]]).pooled.cpu())
            labels.append(torch.as_tensor([platforms.index(p) for p in batch["platform"]]))
        self.features, self.labels = torch.cat(feats), torch.cat(labels)

    def batches(self, shard, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        if self.features is None:
            self._cache(shard)
        order = torch.from_numpy(self.rng.permutation(len(self.features)))
        bs = self.cfg.train.batch_size
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            yield {"x": self.features[idx].to(self.device), "y": self.labels[idx].to(self.device)}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        logits = self.model.gate.logits(batch["x"])
        return gate_loss(logits, batch["y"]), float(logits.argmax(1).eq(batch["y"]).float().mean())


def make_runner(kind: str, model, job, cfg: Config, rng: np.random.Generator, device) -> _Runner:
    runners = {"pairs": PairRunner, "triplets": TripletRunner, "gate": GateRunner}
    if kind not in runners:
        raise ValueError(f"unknown job kind {kind!r}; expected one of {sorted(runners)}")
    return runners[kind](model, job, cfg, rng, device)
