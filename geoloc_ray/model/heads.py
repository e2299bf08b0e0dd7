"""Expert heads and the gate: the only parts PE-MoE trains once the trunks are frozen."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geoloc_ray.model.outputs import ImageTrunkOutput, TextTrunkOutput


def projection(width: int, embed_dim: int, identity_init: bool = False) -> nn.Linear:
    """Linear projection to the shared embedding size.

    Identity init (when square) keeps a pretrained encoder's embedding space at the start of training,
    e.g. BGE-M3's 1024-d dense vector in production.
    """
    proj = nn.Linear(width, embed_dim)
    if identity_init and width == embed_dim:
        with torch.no_grad():
            proj.weight.copy_(torch.eye(embed_dim))
            proj.bias.zero_()
    return proj


class TowerHead(nn.Module):
    """One tower's half of an expert: its own last layers (`tail`) + a projection, unit-norm output."""

    def __init__(self, tail: nn.Module, embed_dim: int, identity_init: bool = False):
        super().__init__()
        self.tail = tail
        self.proj = projection(tail.width, embed_dim, identity_init)

    def forward(self, trunk: TextTrunkOutput | ImageTrunkOutput) -> torch.Tensor:
        return F.normalize(self.proj(self.tail(trunk)), dim=-1)


class ExpertHead(nn.Module):
    """An expert k: text part t_k + image part v_k; its score is S_k(q, I) = cos(t_k(q), v_k(I))."""

    def __init__(self, text: TowerHead, image: TowerHead):
        super().__init__()
        self.text = text
        self.image = image


class Gate(nn.Module):
    """2-layer MLP on the shared trunk query feature -> softmax(logits / temperature) over the platforms."""

    def __init__(self, in_dim: int, hidden: int, platforms: list[str], temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"gate temperature must be > 0, got {temperature}")
        self.platforms = list(platforms)
        self.temperature = float(temperature)  # a setting, not a weight: model.gate_temperature (manifest)
        # Trunk features of a pretrained encoder have arbitrary scale: normalise before the MLP.
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, len(self.platforms))

    def logits(self, trunk: TextTrunkOutput | torch.Tensor) -> torch.Tensor:
        x = trunk.pooled if isinstance(trunk, TextTrunkOutput) else trunk
        return self.fc2(self.act(self.fc1(self.norm(x))))

    def scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the routing softmax sees: the platform-label loss trains the raw ones, routing uses these."""
        return logits / self.temperature

    def forward(self, trunk: TextTrunkOutput | torch.Tensor) -> torch.Tensor:
        """(B, K) expert weights g_k(q), rows summing to 1, in `platforms` order."""
        return self.scaled(self.logits(trunk)).softmax(dim=-1)
