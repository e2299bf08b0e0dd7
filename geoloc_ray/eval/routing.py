"""Routing diagnostics: moe's experts under other routings, so the distance between moe and its upper bound
has an explanation. `oracle` weighs each query's true platform (the best any router of these experts could do
without looking at scores); `platform_gate` is the gate trained on platform labels, before fused tuning
(models/gate). Both reuse the experts' single-head query vectors: the query side only, no gallery pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ORACLE, PLATFORM_GATE = "oracle", "platform_gate"  # Variant.weights routed here (not by the model's own gate)


def oracle_weights(query_platforms: Sequence[str], experts: Sequence[str]) -> np.ndarray:
    """(N, K) one-hot on each query's true platform; uniform for a platform no expert covers (no right answer)."""
    experts = list(experts)
    out = np.zeros((len(query_platforms), len(experts)), np.float32)
    for i, platform in enumerate(query_platforms):
        if platform in experts:
            out[i, experts.index(platform)] = 1.0
        else:
            out[i] = 1.0 / len(experts)
    return out


def gate_weights(gate_model: Any, texts: Sequence[str], experts: Sequence[str], batch_size: int = 256
                 ) -> np.ndarray:
    """(N, K) g(q) of `gate_model`'s gate (run on its own text trunk), columns in `experts` order."""
    import torch

    if gate_model is None or gate_model.gate is None:
        raise ValueError("platform_gate needs the platform-label gate (models/gate)")
    missing = [e for e in experts if e not in gate_model.gate.platforms]
    if missing:
        raise ValueError(f"the platform gate has no weight for expert(s) {missing}")
    columns = [gate_model.gate.platforms.index(e) for e in experts]
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            trunk = gate_model.text_trunk_output(list(texts[start : start + batch_size]))
            rows.append(gate_model.gate(trunk).float().cpu().numpy()[:, columns])
    return np.concatenate(rows) if rows else np.zeros((0, len(experts)), np.float32)


def routed_query(parts: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """concat_k(w_k t_k) from each expert's unit query vectors (N, D): the fused query under any routing."""
    if weights.shape != (len(parts[0]), len(parts)):
        raise ValueError(f"{len(parts)} experts need ({len(parts[0])}, {len(parts)}) weights, got {weights.shape}")
    return np.concatenate([weights[:, [k]] * p for k, p in enumerate(parts)], axis=1).astype(np.float32)


def gate_summary(gates: np.ndarray, queries: Any, platforms: list[str]) -> dict[str, Any]:
    """The weight matrix (query platform x expert: mean weights by the query's true platform) and how often the
    top-weighted expert is the query's platform."""
    out: dict[str, Any] = {"mean_weights": {}, "accuracy": float(np.mean(
        np.asarray(platforms)[gates.argmax(1)] == queries["platform"].to_numpy()))}
    for platform in platforms:
        sel = (queries["platform"] == platform).to_numpy()
        if sel.any():
            out["mean_weights"][platform] = dict(zip(platforms, gates[sel].mean(0).round(4).tolist(), strict=True))
    return out
