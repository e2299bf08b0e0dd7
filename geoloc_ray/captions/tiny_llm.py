"""A tiny local causal LM (random Llama + a byte-level BPE trained here): vLLM and the LLM refiners run for
real without a model hub. Its answers are noise, which the validator rejects: it proves plumbing, not quality.
"""

from __future__ import annotations

from pathlib import Path

from geoloc_ray.captions.prompts import build_messages
from geoloc_ray.captions.vocabulary import load_vocabulary
from geoloc_ray.corpus.synth.captions import FILLERS
from geoloc_ray.corpus.synth.vocab import (
    FOOTPRINT_WORDS,
    HEIGHT_WORDS,
    ROOF_SHAPE_WORDS,
    SURROUNDING_WORDS,
    WINDOW_WORDS,
)

# Llama-style turns; the generation prompt opens the assistant turn, as a chat model's template does.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# 128 hidden / 4 heads = head size 32: vLLM's CPU attention backend takes 32, 64, 80, 96, ... only.
SIZES = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
VOCAB_SIZE = 1024
MAX_POSITIONS = 1024


def training_text() -> list[str]:
    """The refine prompts of every platform plus the vocabulary's words: what the tokenizer will see."""
    vocab = load_vocabulary()
    statements = [
        "The building has a red gabled roof.", "Its facade is cream with many small windows.",
        "It is a tall building with about ten floors.", "There is a lake next to it.",
        "A parking lot with cars is nearby.", "A wide road passes by the building.",
    ]
    lines = [m["content"] for p in vocab.styles for m in build_messages(statements, p, vocab)]
    lines += [a.description for a in vocab.attributes.values()]
    words = [ROOF_SHAPE_WORDS, FOOTPRINT_WORDS, HEIGHT_WORDS, WINDOW_WORDS, SURROUNDING_WORDS]
    lines += [str(w) for table in words for options in table.values() for w in options]
    lines += list(FILLERS)
    return lines * 4


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE (any text encodes, no unknown tokens) with the special tokens at ids 0..7."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(training_text(), trainer)
    return tok


def make_tiny_llm(folder: str | Path, seed: int = 0) -> str:
    """Write a random 2-layer Llama and its tokenizer (chat template included) as an HF folder; returns its path.

    The config is written for transformers 5 and read by the vLLM environment's transformers too (tested)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(), unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = MAX_POSITIONS
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS, num_key_value_heads=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **SIZES,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    return str(folder)
