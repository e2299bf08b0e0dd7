"""The guard on every LLM output: a rejected output is replaced by the rules-refined text.

An LLM can answer nothing, ramble, reintroduce directions the preprocessing removed, or drift to another
topic; each is a rejection reason, counted in the summary.
"""

from __future__ import annotations

from geoloc_ray.captions.rules import attributes_of, is_directional
from geoloc_ray.captions.vocabulary import Vocabulary

REJECTION_REASONS: tuple[str, ...] = ("empty", "too_long", "directional", "lost_attributes")


def validate_output(
    statements: list[str], original: list[str], vocab: Vocabulary, max_output_words: int
) -> str | None:
    """None when the parsed output is usable, else the first rejection reason that applies."""
    if not statements:
        return "empty"
    if any(len(s.split()) > max_output_words for s in statements):
        return "too_long"
    if any(is_directional(s, vocab) for s in statements):
        return "directional"
    before = set().union(*(attributes_of(t, vocab) for t in original)) if original else set()
    after = set().union(*(attributes_of(s, vocab) for s in statements))
    if before and not before & after:
        return "lost_attributes"
    return None
