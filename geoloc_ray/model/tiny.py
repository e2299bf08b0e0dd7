"""Tiny random models in production's families, written as local folders: the rehearsal (configs/rehearsal.yaml)
and the tests run production's loaders (FlagEmbedding's BGE-M3 code) with no model hub and no weights.

The text model is an XLM-RoBERTa (BGE-M3's architecture) with random weights, saved the way BGE-M3's folder is
(an `XLMRobertaModel` with its pooler), with all-MiniLM-L6-v2's BERT tokenizer from the offline package: no
XLM-R sentencepiece model is at hand, and any tokenizer whose ids fit the vocabulary exercises the same path.
The image side needs no folder: its EVA02 open_clip config is registered with the package
(`EVA02-rehearsal-tiny`, timm eva02_tiny: production's EVA02 blocks with RoPE, 12 of them, 192 wide).
"""

from __future__ import annotations

import os

REHEARSAL_MODELS = "build/rehearsal/models"  # under the repo; /build/ is gitignored
# Sized for configs/rehearsal.yaml: 4 layers so `model.text.expert_layers: 2` (production's) leaves a 2-layer
# trunk; 64 wide in 2 heads of 32; positions for production's `max_length: 128` (+ the padding offset).
TINY_BGE_M3 = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 128,
               "max_position_embeddings": 130, "type_vocab_size": 1}


def make_tiny_bge_m3(folder: str, seed: int = 0, **sizes: int) -> str:
    """A random XLM-R saved like BGE-M3 in `folder` (made if missing), with MiniLM's tokenizer + an eos token
    (BGE-M3's sparse/colbert code reads eos_token_id); `sizes` override TINY_BGE_M3. Returns the folder."""
    import torch
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    from geoloc_ray.model.text_tower import resolve_text_path

    os.makedirs(folder, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_path("minilm"), local_files_only=True)
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(folder)
    config = XLMRobertaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                              **{**TINY_BGE_M3, **sizes})
    torch.manual_seed(seed)
    XLMRobertaModel(config).save_pretrained(folder)  # with a pooler, as BGE-M3's weights have
    return folder


def prepare_rehearsal_models(root: str = REHEARSAL_MODELS) -> dict[str, str]:
    """The model folders configs/rehearsal.yaml names under `root` (relative: to the current directory), written
    once; returns them as config overrides with absolute paths (`--set key=value` for a job run elsewhere)."""
    text = os.path.abspath(os.path.join(root, "bge-m3"))
    if not os.path.exists(os.path.join(text, "config.json")):
        make_tiny_bge_m3(text)
    return {"model.text.path": text}
