"""Contrastive losses. Images of the same location are not negatives of each other (they are the same place)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def same_location_mask(loc_a: torch.Tensor, loc_b: torch.Tensor) -> torch.Tensor:
    """(A, B) True where the two items show the same location."""
    return loc_a[:, None] == loc_b[None, :]


@dataclass
class GlobalBatch:
    """Every worker's rows of one step, in rank order (gathered with their gradients); this worker's rows start
    at `offset`. The loss is then this worker's rows of the global loss (open_clip's `local_loss`)."""

    text: torch.Tensor
    image: torch.Tensor
    locations: torch.Tensor
    offset: int
    hard_negatives: torch.Tensor | None = None
    hard_locations: torch.Tensor | None = None


def info_nce(
    text: torch.Tensor,
    image: torch.Tensor,
    locations: torch.Tensor,
    temperature: float,
    hard_negatives: torch.Tensor | None = None,
    hard_locations: torch.Tensor | None = None,
    everyone: GlobalBatch | None = None,
    weights: torch.Tensor | None = None,
    weight_total: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Symmetric in-batch InfoNCE over unit vectors; text i's positive is image i.

    Off-diagonal pairs of the same location are masked out (not pushed apart). `hard_negatives` (N, D) are
    extra image candidates for the text->image direction only (mined: never the query's location). With
    `everyone`, this worker's texts and images are scored against the global batch (and all its hard negatives).
    `weights` (one per row of this worker) make the loss a weighted mean, sum(w * loss) / `weight_total`
    (default sum(w)): a row of weight 0 is a negative for the others and no query itself.
    """
    g = everyone or GlobalBatch(text, image, locations, 0, hard_negatives, hard_locations)
    targets = torch.arange(len(text), device=text.device) + g.offset
    columns = torch.arange(len(g.image), device=text.device)
    masked = same_location_mask(locations, g.locations) & (columns[None, :] != targets[:, None])
    t2i = (text @ g.image.T / temperature).masked_fill(masked, float("-inf"))
    i2t = (image @ g.text.T / temperature).masked_fill(masked, float("-inf"))
    if g.hard_negatives is not None and len(g.hard_negatives):
        hard = text @ g.hard_negatives.T / temperature
        if g.hard_locations is not None:
            hard = hard.masked_fill(same_location_mask(locations, g.hard_locations), float("-inf"))
        t2i = torch.cat([t2i, hard], dim=1)
    if weights is None:
        return 0.5 * (F.cross_entropy(t2i, targets) + F.cross_entropy(i2t, targets))
    per_row = 0.5 * (F.cross_entropy(t2i, targets, reduction="none") + F.cross_entropy(i2t, targets, reduction="none"))
    return (weights * per_row).sum() / (weights.sum() if weight_total is None else weight_total)


def gate_loss(logits: torch.Tensor, platform_ids: torch.Tensor) -> torch.Tensor:
    """The gate is supervised by the platform of each query's positive image."""
    return F.cross_entropy(logits, platform_ids)


def fused_logits(weights: torch.Tensor, per_expert: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, N) fused scores S = sum_k g_k S_k (DESIGN section 1) from gate weights (B, K) and (B, K, N) scores."""
    return (weights[:, :, None] * per_expert).sum(1) / temperature


def multi_positive_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """-log of the softmax mass on any positive (every image of the query's location counts, as in eval)."""
    on_positives = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, 1) - torch.logsumexp(on_positives, 1)).mean()


def gate_anchor(logits: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """KL(anchor || softmax(logits)) per query, averaged: 0 when the gate's weights equal `anchor` (B, K), the
    frozen platform gate's weights on the same queries; its gradient pulls the gate back towards them."""
    return F.kl_div(F.log_softmax(logits, dim=1), anchor, reduction="batchmean")
