"""Image tower: an open_clip visual tower split into a shared trunk and per-expert block copies.

Two tower families: open_clip's own `VisionTransformer` (`transformer.resblocks`, our registered small ViTs)
and `TimmModel` towers (`trunk.blocks`; EVA02 blocks need the rotary embedding, so it rides in the trunk output).
Our model configs live as JSON in `configs/` and are registered with open_clip like its built-ins (only the
`vision_cfg` matters: the text tower open_clip builds alongside is a minimal placeholder and is discarded).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from geoloc_ray.config import ImageTowerConfig
from geoloc_ray.model.outputs import ImageTrunkOutput

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def register_configs() -> list[str]:
    """Register our open_clip model configs (idempotent); returns their names."""
    import open_clip

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    if not all(n in open_clip.list_models() for n in names):
        open_clip.add_model_config(CONFIG_DIR)
    return names


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """open_clip warns on the root logger about random init; here that is intended, not news."""
    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def build_visual(cfg: ImageTowerConfig, device: str = "cpu", load_weights: bool = True) -> tuple[nn.Module, dict]:
    """open_clip's factory builds the whole CLIP; we keep `.visual` and its preprocessing config."""
    import open_clip

    register_configs()
    if str(device) == "meta":  # architecture only: nothing allocated, nothing downloaded
        with torch.device("meta"), _quiet_random_init():
            clip = open_clip.create_model(
                cfg.model_name, pretrained=None, force_image_size=cfg.image_size, device="meta"
            )
    else:
        pretrained = cfg.pretrained if load_weights else None
        # Random init is the plan when no weights are asked for (from scratch, or a checkpoint follows).
        with _quiet_random_init() if pretrained is None else contextlib.nullcontext():
            clip = open_clip.create_model(
                cfg.model_name, pretrained=pretrained, force_image_size=cfg.image_size, device=device
            )
    visual = clip.visual
    preprocess = dict(getattr(visual, "preprocess_cfg", {}) or {})
    return visual, preprocess


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


class ViTTrunk(nn.Module):
    """open_clip VisionTransformer up to block N - expert_layers (patch embed, cls/pos, ln_pre, blocks)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, pixels: torch.Tensor) -> ImageTrunkOutput:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not _frozen(self)):
            x = self.visual._embeds(pixels)
            x = self.visual.transformer(x)  # batch first in and out, whatever the blocks use inside
        return ImageTrunkOutput(tokens=x)


class ViTTail(nn.Module):
    """An expert's copy of the last ViT blocks + ln_post + open_clip's pooling (no projection)."""

    def __init__(self, blocks: nn.ModuleList, ln_post: nn.Module, pool_type: str, final_ln_after_pool: bool,
                 batch_first: bool, width: int):
        super().__init__()
        self.blocks = blocks
        self.ln_post = ln_post
        self.pool_type = pool_type
        self.final_ln_after_pool = final_ln_after_pool
        self.batch_first = batch_first
        self.width = width

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "avg":
            return x[:, 1:].mean(dim=1)
        if self.pool_type == "tok":
            return x[:, 0]
        raise ValueError(f"unsupported open_clip pool_type {self.pool_type!r}")

    def forward(self, trunk: ImageTrunkOutput) -> torch.Tensor:
        x = trunk.tokens if self.batch_first else trunk.tokens.transpose(0, 1)
        for blk in self.blocks:
            x = blk(x, attn_mask=None)
        x = x if self.batch_first else x.transpose(0, 1)
        if self.final_ln_after_pool:
            return self.ln_post(self._pool(x))
        return self._pool(self.ln_post(x))


class TimmTrunk(nn.Module):
    """A timm ViT/EVA up to block N - expert_layers; EVA's rotary embedding is returned with the tokens."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> ImageTrunkOutput:
        net = self.net
        with torch.set_grad_enabled(torch.is_grad_enabled() and not _frozen(self)):
            x = net.patch_embed(pixels)
            out = net._pos_embed(x)
            if isinstance(out, tuple):  # EVA family: (tokens, rope); patch dropout already applied
                x, rope = out
            else:
                x, rope = getattr(net, "patch_drop", nn.Identity())(out), None
            x = net.norm_pre(x)
            for blk in net.blocks:
                x = blk(x, rope=rope) if rope is not None else blk(x)
        return ImageTrunkOutput(tokens=x, rope=rope)


class TimmTail(nn.Module):
    """An expert's copy of the last timm blocks + norm + pooling + fc_norm (the timm classifier is dropped)."""

    def __init__(self, blocks: nn.ModuleList, norm: nn.Module, fc_norm: nn.Module, global_pool: str,
                 num_prefix_tokens: int, width: int):
        super().__init__()
        self.blocks = blocks
        self.norm = norm
        self.fc_norm = fc_norm
        self.global_pool = global_pool
        self.num_prefix_tokens = num_prefix_tokens
        self.width = width

    def forward(self, trunk: ImageTrunkOutput) -> torch.Tensor:
        from timm.layers import global_pool_nlc

        x = trunk.tokens
        for blk in self.blocks:
            x = blk(x, rope=trunk.rope) if trunk.rope is not None else blk(x)
        x = self.norm(x)
        x = global_pool_nlc(x, pool_type=self.global_pool, num_prefix_tokens=self.num_prefix_tokens)
        return self.fc_norm(x)


def _check_expert_layers(n: int, k: int) -> int:
    if not 0 < k < n:
        raise ValueError(f"image expert_layers={k} must be in 1..{n - 1} for a {n}-block tower")
    return n - k


def _split_open_clip_vit(visual: nn.Module, k: int) -> tuple[ViTTrunk, ViTTail]:
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("open_clip towers with attentional pooling are not supported as expert heads")
    blocks = visual.transformer.resblocks
    cut = _check_expert_layers(len(blocks), k)
    tail = ViTTail(nn.ModuleList(blocks[cut:]), visual.ln_post, visual.pool_type,
                   bool(getattr(visual, "final_ln_after_pool", False)), visual.transformer.batch_first,
                   width=visual.transformer.width)
    # The trunk keeps the tower minus what moved to the heads (ln_post, proj): no dead weights counted.
    visual.transformer.resblocks = nn.ModuleList(blocks[:cut])
    visual.ln_post = nn.Identity()
    visual.proj = None
    return ViTTrunk(visual), tail


def _split_timm(visual: nn.Module, k: int) -> tuple[TimmTrunk, TimmTail]:
    net = visual.trunk
    if getattr(net, "attn_pool", None) is not None or getattr(net, "rope_mixed", False):
        raise ValueError("timm towers with attention pooling or mixed (per-depth) RoPE are not supported")
    cut = _check_expert_layers(len(net.blocks), k)
    tail = TimmTail(nn.ModuleList(net.blocks[cut:]), net.norm, getattr(net, "fc_norm", nn.Identity()),
                    net.global_pool, int(getattr(net, "num_prefix_tokens", 1)), width=int(net.num_features))
    net.blocks = nn.ModuleList(net.blocks[:cut])
    net.norm, net.fc_norm, net.head = nn.Identity(), nn.Identity(), nn.Identity()
    if hasattr(net, "head_drop"):
        net.head_drop = nn.Identity()
    return TimmTrunk(net), tail


def split_visual(visual: nn.Module, expert_layers: int) -> tuple[nn.Module, nn.Module]:
    """Cut an open_clip visual tower into (trunk, tail template); the template is deep-copied per expert."""
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        return _split_open_clip_vit(visual, expert_layers)
    if hasattr(visual, "trunk") and hasattr(visual.trunk, "blocks"):
        return _split_timm(visual, expert_layers)
    raise ValueError(f"unsupported open_clip visual tower {type(visual).__name__}: need ViT resblocks or timm blocks")
