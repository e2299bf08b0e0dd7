"""One factory for the whole model (like open_clip's create_model_and_transforms): towers, heads, gate."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from geoloc_ray.config import ModelConfig
from geoloc_ray.model.geoloc_model import GeoLocModel
from geoloc_ray.model.image_tower import build_visual, split_visual
from geoloc_ray.model.text_tower import clone_tail, load_text_encoder, split_text_encoder

logger = logging.getLogger(__name__)


def build_model(model_cfg: ModelConfig, heads: Sequence[str] = ("unified",), gate: bool = False,
                device: str | torch.device = "cpu", *, image_pretrained: bool = True,
                seed: int | None = None) -> GeoLocModel:
    """Build the model from config: pretrained text tower, open_clip image tower, named heads, optional gate.

    Every head starts from the pretrained last layers (its own copy) and a fresh projection. `device="meta"`
    builds the architecture only (no weights, no tokenizer). `image_pretrained=False` skips downloading the
    image tower's pretrained weights (a checkpoint is about to overwrite them). After building, both trunks
    are frozen and heads + gate are trainable; call `set_trainable` to choose otherwise. `seed` seeds torch's
    global RNG before the random inits (projections, gate, an image tower trained from scratch).
    """
    if seed is not None:
        torch.manual_seed(seed)
    device = str(device)
    if model_cfg.text.kind == "bge_m3" and model_cfg.text.pooling != "cls":
        logger.warning("text tower bge_m3 with pooling=%r: BGE-M3's dense embedding is the CLS token "
                       "(set model.text.pooling: cls)", model_cfg.text.pooling)
    encoder, tokenizer = load_text_encoder(model_cfg.text, device)
    text_trunk, text_tail = split_text_encoder(encoder, model_cfg.text.expert_layers, model_cfg.text.pooling)
    visual, preprocess = build_visual(model_cfg.image, device, load_weights=image_pretrained)
    image_trunk, image_tail = split_visual(visual, model_cfg.image.expert_layers)
    model = GeoLocModel(model_cfg, text_trunk, image_trunk, tokenizer, preprocess)
    ctx = torch.device("meta") if device == "meta" else torch.device("cpu")
    with ctx:  # fresh projections / gate are created where the towers live (nothing allocated on meta)
        for name in heads:
            model.add_head(name, clone_tail(text_tail), clone_tail(image_tail))
        if gate:
            model.add_gate()
    model.to(device)
    model.set_trainable(image_trunk=False, heads=list(model.heads), gate=gate)
    return model
