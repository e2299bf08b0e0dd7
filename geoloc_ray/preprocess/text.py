"""Text preprocessing from the report: drop directional sentences, split long descriptions into statements.

Directions ("to the north of", "on the left side") depend on the camera's heading, which differs between
platforms and images, so sentences carrying them are dropped whole rather than edited.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import yaml

from geoloc_ray.config import PreprocessConfig

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")
_CLAUSE_BREAK = re.compile(r",\s*(?:and|while|whereas|but|which)\s+|;\s*|\s+while\s+|,\s+")
_CONJUNCTION = re.compile(r"\s+(?:and|with|next to|beside|near)\s+")
_WS = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Unicode-normalise, drop control characters, collapse whitespace."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C" or ch in "\n\t")
    return _WS.sub(" ", text).strip()


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(clean_text(text)) if s and s.strip()]


@lru_cache(maxsize=1)
def default_directional_phrases() -> tuple[str, ...]:
    """The packaged list (directional_phrases.yaml beside this module)."""
    return tuple(yaml.safe_load((Path(__file__).with_name("directional_phrases.yaml")).read_text()))


def directional_phrases(pp: PreprocessConfig) -> list[str]:
    """The config's phrases, or the packaged list when the config names none."""
    return list(default_directional_phrases() if pp.directional_phrases is None else pp.directional_phrases)


@lru_cache(maxsize=16)
def _directional(patterns: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)


def is_directional(sentence: str, patterns: Iterable[str]) -> bool:
    patterns = tuple(patterns)
    return bool(patterns) and bool(_directional(patterns).search(sentence))


def _words(text: str) -> int:
    return len(text.split())


def split_statement(sentence: str, max_words: int) -> list[str]:
    """Break an over-long sentence at clause boundaries into short, query-like statements."""
    sentence = sentence.strip().rstrip(".!?;").strip()
    if _words(sentence) <= max_words:
        return [sentence]
    out: list[str] = []
    for part in _split_on(_CLAUSE_BREAK, sentence):
        for piece in _split_on(_CONJUNCTION, part) if _words(part) > max_words else [part]:
            if _words(piece) <= max_words:
                out.append(piece)
            else:  # no boundary left: cut into word windows rather than lose the content
                words = piece.split()
                out.extend(" ".join(words[i : i + max_words]) for i in range(0, len(words), max_words))
    return out


def _split_on(pattern: re.Pattern, text: str) -> list[str]:
    return [p.strip() for p in pattern.split(text) if p and p.strip()]


def training_statements(
    caption: str, directional_patterns: Iterable[str], max_words: int, min_words: int
) -> list[str]:
    """A long generic description -> short statements without directional sentences."""
    patterns = tuple(directional_patterns)
    out: list[str] = []
    for sentence in split_sentences(caption):
        if is_directional(sentence, patterns):
            continue
        for statement in split_statement(sentence, max_words):
            if _words(statement) >= min_words and statement not in out:
                out.append(statement)
    return out


def clean_query(text: str) -> str:
    """Queries are kept whole (a query is one statement); only normalised."""
    return clean_text(text)
