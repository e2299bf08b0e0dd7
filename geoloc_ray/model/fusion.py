"""Exact PE-MoE fusion as one inner product (DESIGN.md "Exact fusion in one search").

With unit vectors, sum_k g_k cos(t_k, v_k) = < concat_k(g_k t_k), concat_k(v_k) >: index each gallery image once
as the concatenation of its expert embeddings and search with the gated query concatenation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def static_weights(batch: int, experts: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The static ensemble: every expert weighs 1/K for every query."""
    return torch.full((batch, experts), 1.0 / experts, device=device)


def as_weights(weights: Sequence[float] | torch.Tensor, batch: int, experts: int,
               device: str | torch.device = "cpu") -> torch.Tensor:
    """Fixed weights, one row per query: a (K,) vector is broadcast over the batch."""
    w = torch.as_tensor(weights, dtype=torch.float32, device=device)
    if w.dim() == 1:
        w = w.unsqueeze(0).expand(batch, -1)
    if w.shape != (batch, experts):
        raise ValueError(f"weights must be ({experts},) or ({batch}, {experts}), got {tuple(w.shape)}")
    return w


def fuse_query(parts: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """concat_k(g_k * t_k): parts are K (B, D) expert query embeddings, weights (B, K)."""
    if weights.shape[1] != len(parts):
        raise ValueError(f"{len(parts)} expert embeddings but {weights.shape[1]} weights per query")
    units = [F.normalize(p, dim=-1) for p in parts]
    return torch.cat([w.unsqueeze(-1) * t for w, t in zip(weights.unbind(1), units, strict=True)], dim=-1)


def fuse_gallery(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """concat_k(v_k): parts are K (N, D) expert image embeddings."""
    return torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1)


def fused_scores(text_parts: Sequence[torch.Tensor], image_parts: Sequence[torch.Tensor],
                 weights: torch.Tensor) -> torch.Tensor:
    """The reference (Q, N) score matrix sum_k g_k cos(t_k, v_k), computed expert by expert."""
    scores = 0
    for k, (t, v) in enumerate(zip(text_parts, image_parts, strict=True)):
        cos = F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).T
        scores = scores + weights[:, k : k + 1] * cos
    return scores
