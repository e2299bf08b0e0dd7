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

    def split(self) -> list[TextTrunkOutput]:
        """One output per query, trimmed to its own length (what a batched deployment returns per request)."""
        lengths = self.attention_mask.sum(dim=1).tolist()
        return [TextTrunkOutput(self.hidden[i : i + 1, : int(n)], self.attention_mask[i : i + 1, : int(n)],
                                self.pooled[i : i + 1]) for i, n in enumerate(lengths)]

    @staticmethod
    def cat(parts: list[TextTrunkOutput]) -> TextTrunkOutput:
        """Batch per-request outputs again, right-padding (masked) to the longest: heads give the same result."""
        import torch

        longest = max(p.hidden.shape[1] for p in parts)

        def pad(t: torch.Tensor) -> torch.Tensor:
            widths = [0, 0] * (t.dim() - 2) + [0, longest - t.shape[1]]
            return torch.nn.functional.pad(t, widths)

        return TextTrunkOutput(torch.cat([pad(p.hidden) for p in parts]),
                               torch.cat([pad(p.attention_mask) for p in parts]),
                               torch.cat([p.pooled for p in parts]))


@dataclass
class ImageTrunkOutput(_TensorBundle):
    """Shared image trunk output: tokens after block N - expert_layers (plus EVA's rotary embedding)."""

    tokens: torch.Tensor  # (B, 1 + prefix + patches, W), batch first
    rope: torch.Tensor | None = None  # rotary position embedding the head's EVA blocks need; None for plain ViTs

    def split(self) -> list[ImageTrunkOutput]:
        """One output per image; the rotary embedding is per position, not per image, so each keeps it."""
        return [ImageTrunkOutput(self.tokens[i : i + 1], self.rope) for i in range(len(self.tokens))]

    @staticmethod
    def cat(parts: list[ImageTrunkOutput]) -> ImageTrunkOutput:
        import torch

        return ImageTrunkOutput(torch.cat([p.tokens for p in parts]), parts[0].rope)
