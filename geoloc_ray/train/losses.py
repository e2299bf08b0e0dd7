"""Contrastive losses. Images of the same location are not negatives of each other (they are the same place)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def same_location_mask(loc_a: torch.Tensor, loc_b: torch.Tensor) -> torch.Tensor:
    """(A, B) True where the two items show the same location."""
    return loc_a[:, None] == loc_b[None, :]


def info_nce(
    text: torch.Tensor,
    image: torch.Tensor,
    locations: torch.Tensor,
    temperature: float,
    hard_negatives: torch.Tensor | None = None,
    hard_locations: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric in-batch InfoNCE over unit vectors; text i's positive is image i.

    Off-diagonal pairs of the same location are masked out (not pushed apart). `hard_negatives` (N, D) are
    extra image candidates for the text->image direction only (mined: never the query's location).
    """
    logits = text @ image.T / temperature
    same = same_location_mask(locations, locations)
    eye = torch.eye(len(text), dtype=torch.bool, device=text.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    targets = torch.arange(len(text), device=text.device)
    t2i = logits
    if hard_negatives is not None and len(hard_negatives):
        hard = text @ hard_negatives.T / temperature
        if hard_locations is not None:
            hard = hard.masked_fill(same_location_mask(locations, hard_locations), float("-inf"))
        t2i = torch.cat([logits, hard], dim=1)
    return 0.5 * (F.cross_entropy(t2i, targets) + F.cross_entropy(logits.T, targets))


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
