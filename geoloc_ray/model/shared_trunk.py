"""One frozen trunk for several loaded models: unified, aligned, the experts and moe all carry the trunk stage 0
left (frozen ever since), so a process that loads several of them runs each trunk once per input and applies
every model's heads to that output, instead of one identical trunk pass (and one copy in memory) per model.

Sharing is decided from the weights, never assumed: two trunks are one when their tower config, preprocessing
and every tensor are equal; a model whose trunk differs (e.g. trained further) keeps its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from geoloc_ray.model.geoloc_model import GeoLocModel


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Equal state dicts: the same names, shapes, dtypes and values (buffers included)."""
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k].to(sa[k].device))
        for k in sa)


def trunk_module(module: nn.Module) -> nn.Module:
    """The module behind a `torch.compile` wrapper (what identifies a shared trunk)."""
    return getattr(module, "_orig_mod", module)


def _same_image_trunk(a: GeoLocModel, b: GeoLocModel) -> bool:
    return (a.model_cfg.image == b.model_cfg.image and a.preprocess_cfg == b.preprocess_cfg
            and same_weights(trunk_module(a.image_trunk), trunk_module(b.image_trunk)))


def _same_text_trunk(a: GeoLocModel, b: GeoLocModel) -> bool:
    return a.model_cfg.text == b.model_cfg.text and same_weights(a.text_trunk, b.text_trunk)


def _share(models: Sequence[GeoLocModel], same_trunk, attr: str) -> int:
    """Point each model's `attr` trunk at an earlier equal one's (the copy is freed); distinct trunks left."""
    kept: list[GeoLocModel] = []
    for model in models:
        same = next((k for k in kept if same_trunk(k, model)), None)
        if same is None:
            kept.append(model)
        else:
            setattr(model, attr, getattr(same, attr))
    return len(kept)


def share_image_trunks(models: Sequence[GeoLocModel]) -> int:
    """Point every model whose image trunk equals an earlier one's at that module (the copy is freed); returns
    how many distinct trunks remain. `image_vectors(..., trunks=)` then runs each of them once per batch."""
    return _share(models, _same_image_trunk, "image_trunk")


def share_text_trunks(models: Sequence[GeoLocModel]) -> int:
    """The text side of `share_image_trunks` (same tokenizer settings and weights: one module); returns how many
    distinct text trunks remain."""
    return _share(models, _same_text_trunk, "text_trunk")
