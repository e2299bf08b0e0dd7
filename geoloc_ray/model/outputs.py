"""Trunk outputs: what a trunk hands to the expert heads (and, in Serve, to another deployment).

Plain dataclasses of tensors so they pickle across Ray Serve deployments; this module imports no torch at
module level, so `import geoloc_ray.model` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class _TensorBundle:
    def to(self, device: str | torch.device) -> _TensorBundle:
        """A copy with every tensor moved to `device` (e.g. after crossing a deployment boundary)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if hasattr(value, "to") else value
        return replace(self, **moved)

    def detach(self) -> _TensorBundle:
        """A copy cut from the autograd graph (a frozen trunk's output needs none)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.detach() if hasattr(value, "detach") else value
        return replace(self, **out)

    def __len__(self) -> int:
        return int(getattr(self, fields(self)[0].name).shape[0])


@dataclass
class TextTrunkOutput(_TensorBundle):
    """Shared text trunk output: hidden states after layer L - expert_layers."""

    hidden: torch.Tensor  # (B, T, H)
    attention_mask: torch.Tensor  # (B, T) 1 = token, 0 = padding; heads rebuild their 4-D mask from it
    pooled: torch.Tensor  # (B, H) trunk query feature: the gate's input


@dataclass
class ImageTrunkOutput(_TensorBundle):
    """Shared image trunk output: tokens after block N - expert_layers (plus EVA's rotary embedding)."""

    tokens: torch.Tensor  # (B, 1 + prefix + patches, W), batch first
    rope: torch.Tensor | None = None  # rotary position embedding the head's EVA blocks need; None for plain ViTs
