"""The PE-MoE model: frozen shared trunks, named expert heads, a gate, and exact fused scoring.

Split calls (`text_trunk`, `text_head`, `image_trunk`, `image_head`, `gate`) let a caller run a trunk once and
several heads on its output: the Serve graph runs the text trunk + gate in one deployment and each expert head
in its own. Build instances with `geoloc_ray.model.build_model`, not by hand.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from geoloc_ray.config import ModelConfig
from geoloc_ray.model import fusion
from geoloc_ray.model.heads import ExpertHead, Gate, TowerHead
from geoloc_ray.model.outputs import ImageTrunkOutput, TextTrunkOutput
from geoloc_ray.model.text_tower import tokenize

TextInput = Sequence[str] | Mapping[str, torch.Tensor] | TextTrunkOutput
ImageInput = torch.Tensor | ImageTrunkOutput
Weights = str | Sequence[float] | torch.Tensor


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def _numel(module: nn.Module | None, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class GeoLocModel(nn.Module):
    """Text trunk + image trunk (shared) + `heads` (ModuleDict of ExpertHead) + optional `gate`."""

    def __init__(self, model_cfg: ModelConfig, text_trunk: nn.Module, image_trunk: nn.Module,
                 tokenizer: object | None, preprocess: dict):
        super().__init__()
        self.model_cfg = model_cfg
        self.platforms = list(model_cfg.platforms)
        self.text_trunk = text_trunk
        self.image_trunk = image_trunk
        self.heads = nn.ModuleDict()
        self.register_module("gate", None)
        self.tokenizer = tokenizer
        self.preprocess_cfg = dict(preprocess)
        self.manifest: dict | None = None  # set by load_model: where these weights came from

    # ----- structure -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def head_names(self) -> list[str]:
        return list(self.heads.keys())

    @property
    def text_width(self) -> int:
        return int(self.text_trunk.hf_config.hidden_size)

    def add_head(self, name: str, text_tail: nn.Module, image_tail: nn.Module) -> ExpertHead:
        """Attach an expert built from tail copies (the factory passes deep copies of the pretrained tails)."""
        d = self.model_cfg.embed_dim
        head = ExpertHead(TowerHead(text_tail, d, identity_init=True), TowerHead(image_tail, d))
        self.heads[name] = head.to(self._param_device())
        return head

    def copy_head(self, src: str, dst: str) -> ExpertHead:
        """dst := an independent copy of head src (experts start as copies of the aligned head)."""
        if src not in self.heads:
            raise KeyError(f"no head {src!r}; heads are {self.head_names}")
        self.heads[dst] = copy.deepcopy(self.heads[src])
        return self.heads[dst]

    def add_gate(self) -> Gate:
        """A fresh gate over `platforms` on the trunk query feature."""
        self.gate = Gate(self.text_width, self.model_cfg.gate_hidden, self.platforms,
                         self.model_cfg.gate_temperature).to(self._param_device())
        return self.gate

    def _param_device(self) -> torch.device:
        return next(self.text_trunk.parameters()).device

    # ----- split calls -----------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, list(texts), self.model_cfg.text.max_length, self._param_device())

    def text_trunk_output(self, texts: TextInput) -> TextTrunkOutput:
        """Run the text trunk on raw texts or a tokenized batch; a trunk output passes through."""
        if isinstance(texts, TextTrunkOutput):
            return texts
        batch = texts if isinstance(texts, Mapping) else self.tokenize(texts)
        return self.text_trunk(batch)

    def image_trunk_output(self, pixels: ImageInput) -> ImageTrunkOutput:
        if isinstance(pixels, ImageTrunkOutput):
            return pixels
        return self.image_trunk(pixels.to(self._param_device()))

    def _head(self, name: str) -> ExpertHead:
        if name not in self.heads:
            raise KeyError(f"no head {name!r}; heads are {self.head_names}")
        return self.heads[name]

    def text_head(self, name: str, trunk: TextTrunkOutput) -> torch.Tensor:
        """t_name(q): unit (B, embed_dim) query embeddings from a trunk output."""
        return self._head(name).text(trunk)

    def image_head(self, name: str, trunk: ImageTrunkOutput) -> torch.Tensor:
        """v_name(I): unit (B, embed_dim) image embeddings from a trunk output."""
        return self._head(name).image(trunk)

    # ----- convenience -----------------------------------------------------------------------------------------
    def encode_text(self, texts: TextInput, head: str) -> torch.Tensor:
        return self.text_head(head, self.text_trunk_output(texts))

    def encode_image(self, pixels: ImageInput, head: str) -> torch.Tensor:
        return self.image_head(head, self.image_trunk_output(pixels))

    def expert_names(self, heads: Sequence[str] | None = None) -> list[str]:
        """Experts in fusion order: `platforms` order unless given."""
        names = list(heads) if heads is not None else self.platforms
        missing = [n for n in names if n not in self.heads]
        if missing:
            raise KeyError(f"no expert head(s) {missing}; heads are {self.head_names}")
        return names

    def expert_weights(self, trunk: TextTrunkOutput, weights: Weights = "gate", experts: int | None = None
                       ) -> torch.Tensor:
        """(B, K) weights: the gate's g(q), `static` 1/K each, or fixed values."""
        batch, k = len(trunk), experts or len(self.platforms)
        if isinstance(weights, str) and weights == "gate":
            if self.gate is None:
                raise RuntimeError("this model has no gate: pass weights='static' or explicit weights")
            return self.gate(trunk)
        if isinstance(weights, str) and weights == "static":
            return fusion.static_weights(batch, k, trunk.pooled.device)
        if isinstance(weights, str):
            raise ValueError(f"weights must be 'gate', 'static' or numbers, got {weights!r}")
        return fusion.as_weights(weights, batch, k, trunk.pooled.device)

    def fused_query(self, texts: TextInput, weights: Weights = "gate", heads: Sequence[str] | None = None
                    ) -> torch.Tensor:
        """concat_k(g_k t_k), (B, K * embed_dim); its inner product with `gallery_vectors` is the PE-MoE score."""
        names = self.expert_names(heads)
        if isinstance(weights, str) and weights == "gate" and names != self.platforms:
            raise ValueError(f"the gate weighs {self.platforms} in that order; got heads {names}")
        trunk = self.text_trunk_output(texts)
        g = self.expert_weights(trunk, weights, len(names))
        return fusion.fuse_query([self.text_head(n, trunk) for n in names], g)

    def gallery_vectors(self, pixels: ImageInput, heads: Sequence[str] | None = None) -> torch.Tensor:
        """concat_k(v_k), (N, K * embed_dim): each gallery image indexed once for all experts."""
        names = self.expert_names(heads)
        trunk = self.image_trunk_output(pixels)
        return fusion.fuse_gallery([self.image_head(n, trunk) for n in names])

    # ----- what trains -----------------------------------------------------------------------------------------
    def components(self) -> Iterator[tuple[str, nn.Module]]:
        yield "text_trunk", self.text_trunk
        yield "image_trunk", self.image_trunk
        for name, head in self.heads.items():
            yield f"heads.{name}", head
        if self.gate is not None:
            yield "gate", self.gate

    def set_trainable(self, image_trunk: bool = False, heads: Sequence[str] = (), gate: bool = False) -> None:
        """Choose what trains; the text trunk never does. Stage 0 (demo) trains the image trunk from scratch."""
        for name in heads:
            self._head(name)
        if gate and self.gate is None:
            raise RuntimeError("set_trainable(gate=True) on a model without a gate: call add_gate() first")
        self.text_trunk.requires_grad_(False)
        self.image_trunk.requires_grad_(image_trunk)
        for name, head in self.heads.items():
            head.requires_grad_(name in heads)
        if self.gate is not None:
            self.gate.requires_grad_(gate)
        self.train(self.training)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> GeoLocModel:
        """Frozen parts always run in eval mode: no dropout noise in what is treated as a constant."""
        super().train(mode)
        if mode:
            for _, module in self.components():
                if _frozen(module):
                    module.eval()
        return self

    def parameter_counts(self) -> dict:
        """Total / trainable / trunk / per-head / gate parameter counts and the trainable fraction."""
        total, trainable = _numel(self), _numel(self, trainable_only=True)
        heads = {n: {"text": _numel(h.text), "image": _numel(h.image), "total": _numel(h)}
                 for n, h in self.heads.items()}
        text_trunk, image_trunk = _numel(self.text_trunk), _numel(self.image_trunk)
        return {
            "total": total, "trainable": trainable, "trainable_fraction": trainable / max(total, 1),
            "text_trunk": text_trunk, "image_trunk": image_trunk, "trunk": text_trunk + image_trunk,
            "heads": heads, "gate": _numel(self.gate),
        }
