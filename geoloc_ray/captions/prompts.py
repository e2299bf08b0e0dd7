"""Platform-specific prompts for the LLM refiners, and the parser for what they answer.

`prompt_version` selects the template set and is part of the cache key: edit a prompt, bump the version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from geoloc_ray.captions.rules import clean_statement
from geoloc_ray.captions.vocabulary import Vocabulary


@dataclass(frozen=True)
class PromptTemplate:
    system: str
    user: str


PROMPTS: dict[str, PromptTemplate] = {
    "v1": PromptTemplate(
        system=(
            "You rewrite descriptions of a building so that they match {view}. "
            "Keep only what such an image can show: {visible}. "
            "Leave out what it cannot show: {invisible}. "
            "Never mention directions or relative positions (left, right, north, south, east, west, "
            "in front of, behind). Never invent details. "
            "Answer with short query-like statements, one per line, each at most {max_words} words, "
            "with no numbering and nothing else."
        ),
        user="Statements about the building:\n{statements}\n\nRewritten statements for the {platform} image:",
    ),
}


def prompt_template(version: str) -> PromptTemplate:
    if version not in PROMPTS:
        raise ValueError(f"unknown refine.prompt_version {version!r}; known: {sorted(PROMPTS)}")
    return PROMPTS[version]


def _describe(names: list[str], vocab: Vocabulary) -> str:
    return "; ".join(vocab.attributes[n].description for n in names) or "nothing in particular"


def build_messages(
    texts: list[str], platform: str, vocab: Vocabulary, version: str = "v1", max_words: int = 20
) -> list[dict[str, str]]:
    """Chat messages (system + user) asking for the statements rewritten for `platform`."""
    tpl = prompt_template(version)
    visible = [n for n in vocab.attributes if n in vocab.visible(platform)]
    invisible = [n for n in vocab.attributes if n not in vocab.visible(platform)]
    system = tpl.system.format(
        view=vocab.styles[platform].view,
        visible=_describe(visible, vocab),
        invisible=_describe(invisible, vocab),
        max_words=max_words,
    )
    statements = "\n".join(f"- {clean_statement(t)}" for t in texts if clean_statement(t))
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": tpl.user.format(statements=statements, platform=platform)},
    ]


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """The prompt for a tokenizer without a chat template: the messages one after another."""
    return "\n\n".join(m["content"] for m in messages) + "\n"


_BULLET = re.compile(
    r"^\s*(?:[-*\u2022\u00b7\u2013\u2014>]+|\(?\d{1,3}[.):\]]|\(?[a-zA-Z][.)](?=\s)|statement\s*\d*\s*:)\s*",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(
    r"^(?:here (?:are|is)|sure\b|okay\b|rewritten statements?\b|statements?\b.*:$)", re.IGNORECASE
)
_QUOTES = "\"'`\u201c\u201d\u2018\u2019"


def _strip_line(line: str) -> str:
    s = line.strip()
    for _ in range(3):  # "- 1. foo" has two markers
        s = _BULLET.sub("", s, count=1).strip()
    return s.strip(_QUOTES).strip()


def parse_output(text: str) -> list[str]:
    """LLM answer -> statements, one per line; numbering, bullets, quotes, preambles and repeats removed."""
    out: list[str] = []
    seen: set[str] = set()
    for line in re.split(r"[\r\n]+", text or ""):
        s = _strip_line(line)
        if not s or _PREAMBLE.match(s) or s.endswith(":"):
            continue
        s = clean_statement(s)
        if s and s.lower() not in seen:
            seen.add(s.lower())
            out.append(s)
    return out
