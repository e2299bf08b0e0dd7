"""Routing diagnostics: moe's experts under other routings, so the distance between moe and its upper bound
has an explanation. `oracle` weighs each query's true platform one-hot; `oracle_mix` gives each query platform
the fixed weights, out of a simplex grid, that score best on that platform's test queries (chosen on the test
set itself: an upper bound of any gate that knows the platform, never a result); `platform_gate` is the gate
trained on platform labels, before fused tuning (models/gate). All reuse the experts' single-head query vectors:
the query side only, no gallery pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ORACLE, ORACLE_MIX, PLATFORM_GATE = "oracle", "oracle_mix", "platform_gate"  # Variant.weights routed here
MIX_POINT = "#"  # oracle_mix's grid point i is searched as the probe "<variant>#<i>"


def mix_grid(experts: int, divisions: int) -> np.ndarray:
    """(G, K) weight vectors: equal weights first, then every vector of multiples of 1/divisions summing to 1
    (the vertices, one-hot on each expert, included)."""
    if experts < 1 or divisions < 1:
        raise ValueError(f"mix_grid needs experts >= 1 and divisions >= 1, got {experts}, {divisions}")
    import itertools

    bars = divisions + experts - 1  # stars and bars: each choice of experts - 1 bars is one composition
    grid = np.stack([np.diff([-1, *cut, bars]) - 1 for cut in itertools.combinations(range(bars), experts - 1)])
    equal = np.full(experts, 1.0 / experts)
    grid = grid[~np.isclose(grid / divisions, equal).all(1)] / divisions  # equal weights once, at the front
    return np.vstack([equal, grid]).astype(np.float32)


def mix_score(location_ranks: np.ndarray) -> np.ndarray:
    """Per query, the ladder's Score from its location rank: (hit@1 + hit@10) / 2."""
    return ((location_ranks < 1).astype(np.float64) + (location_ranks < 10)) / 2


def pick_mix(location_ranks: np.ndarray, platforms: Sequence[str]) -> dict[str, int]:
    """Per query platform, the grid point (row of `location_ranks`, (G, N)) whose mean Score over that platform's
    queries is highest; ties go to the earlier point (equal weights first)."""
    platforms = np.asarray(platforms)
    if location_ranks.ndim != 2 or location_ranks.shape[1] != len(platforms):
        raise ValueError(f"pick_mix needs (points, {len(platforms)}) ranks, got {location_ranks.shape}")
    scores = mix_score(location_ranks)
    return {str(p): int(np.argmax(scores[:, platforms == p].mean(1))) for p in np.unique(platforms)}


def oracle_mix(ranks: Sequence[tuple[np.ndarray, np.ndarray]], grid: np.ndarray, platforms: Sequence[str]
               ) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, dict[str, int]]:
    """From each grid point's (location, image) hit ranks: every query's ranks under its platform's best point,
    the (N, K) weights that chose, and the point per platform."""
    locations = np.stack([loc for loc, _ in ranks])
    chosen = pick_mix(locations, platforms)
    point = np.array([chosen[str(p)] for p in platforms], dtype=np.int64)
    rows = np.arange(len(point))
    loc, img = locations[point, rows], np.stack([img for _, img in ranks])[point, rows]
    return (loc, img), np.asarray(grid, np.float32)[point], chosen


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
