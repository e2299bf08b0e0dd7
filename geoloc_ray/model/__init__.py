"""The PE-MoE model library: towers split into frozen trunks + expert heads, gate, fusion, checkpoints.

Importing this package is light (no torch / transformers / open_clip): names resolve lazily on first use.

    model = build_model(cfg.model, heads=["unified"], gate=False)
    q = model.fused_query(texts, weights="gate")      # concat_k(g_k t_k)
    g = model.gallery_vectors(pixels)                  # concat_k(v_k); q @ g.T == sum_k g_k cos(t_k, v_k)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_model": "factory",
    "GeoLocModel": "geoloc_model",
    "ExpertHead": "heads",
    "TowerHead": "heads",
    "Gate": "heads",
    "TextTrunkOutput": "outputs",
    "ImageTrunkOutput": "outputs",
    "save_model": "checkpoint",
    "load_model": "checkpoint",
    "load_head": "checkpoint",
    "read_manifest": "checkpoint",
    "assemble_moe": "checkpoint",
    "ImagePreprocess": "transforms",
    "image_preprocess": "transforms",
    "SatelliteAugment": "augment",
    "fuse_query": "fusion",
    "fuse_gallery": "fusion",
    "fused_scores": "fusion",
    "static_weights": "fusion",
    "register_configs": "image_tower",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
