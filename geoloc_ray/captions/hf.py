"""The transformers backend: any local causal-LM folder, CPU or GPU, batched greedy generation."""

from __future__ import annotations

import logging

from geoloc_ray.captions.prompts import plain_prompt

log = logging.getLogger(__name__)


def _load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    # transformers 5 loads a folder without tokenizer files as an empty tokenizer instead of failing.
    if len(tok) == 0:
        raise ValueError(
            f"refine.model {model_path!r}: the tokenizer has an empty vocabulary (no tokenizer files?)"
        )
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"refine.model {model_path!r}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only models generate after the last real token
    return tok


class TransformersGenerator:
    """Greedy generation with a local causal LM; the chat template is used when the tokenizer has one. It runs
    where the config's `device` resolves to: under `auto`, the GPU Ray gave the actor (refine.actors.num_gpus)."""

    def __init__(self, model_path: str, max_new_tokens: int = 64, batch_size: int = 16, device: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM

        from geoloc_ray.devices import resolve_device

        self.tokenizer = _load_tokenizer(model_path)
        self.device = resolve_device(device)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.eos_token_id = self.tokenizer.eos_token_id
        if self.eos_token_id is None:  # BERT-style vocabularies end a sequence with [SEP]
            self.eos_token_id = self.tokenizer.sep_token_id
        log.info("refine: loaded %s on %s", model_path, self.device)

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return plain_prompt(messages)

    def generate(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        """One decoded answer (new tokens only) per conversation."""
        prompts = [self.prompt_text(m) for m in conversations]
        out: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            out.extend(self._generate_batch(prompts[i : i + self.batch_size]))
        return out

    def _generate_batch(self, prompts: list[str]) -> list[str]:
        import torch

        # A chat template already holds the special tokens; a plain prompt gets the tokenizer's own.
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not has_template)
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            ids = self.model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.eos_token_id,
            )
        new = ids[:, enc["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)
