"""The rules refiner (the embedded default): keep what the platform can see, phrased in its style.

Deterministic and cheap, it is also the fallback for every rejected LLM output.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

from geoloc_ray.captions.vocabulary import Vocabulary

# Why a statement was dropped by the rules (reported in the summary).
DROP_REASONS: tuple[str, ...] = ("invisible", "filler", "directional", "duplicate")


@dataclass
class RuleResult:
    """Refined statements; status: ok, original (fell back to the originals) or empty (nothing visible)."""

    texts: list[str]
    status: str
    dropped: dict[str, int] = field(default_factory=dict)


def clean_statement(text: str) -> str:
    """One line, single spaces, no trailing punctuation."""
    return re.sub(r"\s+", " ", str(text)).strip().rstrip(".!;:, ").strip()


def attributes_of(text: str, vocab: Vocabulary) -> set[str]:
    """The attribute classes a statement mentions."""
    return {name for name, rx in vocab.attribute_regex.items() if rx.search(text)}


def is_directional(text: str, vocab: Vocabulary) -> bool:
    rx = vocab.directional_regex
    return bool(rx and rx.search(text))


def is_filler(text: str, vocab: Vocabulary) -> bool:
    """Filler: no attribute at all and a filler pattern ("the sky is clear")."""
    rx = vocab.filler_regex
    return bool(rx and rx.search(text)) and not attributes_of(text, vocab)


def normalize_phrase(text: str, vocab: Vocabulary) -> str:
    """Descriptive sentence -> short query-like phrase ("The building has a red roof" -> "a red roof")."""
    out = clean_statement(text)
    for rx, repl in vocab.normalize_regex:
        out = rx.sub(repl, out).strip()
    return clean_statement(out)


def style_phrase(phrase: str, platform: str, vocab: Vocabulary) -> str:
    """Put a phrase into one of the platform's templates, picked by a stable hash of the phrase."""
    templates = vocab.styles[platform].templates
    pick = int(hashlib.sha1(phrase.lower().encode()).hexdigest()[:8], 16) % len(templates)
    first = phrase.split()[0]
    text = phrase if len(first) > 1 and first.isupper() else phrase[0].lower() + phrase[1:]  # keep acronyms
    out = templates[pick].replace("{text}", text)
    return out[0].upper() + out[1:]


def style_patterns(vocab: Vocabulary) -> list[re.Pattern]:
    """Regexes matching each platform template around its `{text}` (the inverse of `style_phrase`)."""
    out = []
    for style in vocab.styles.values():
        for template in style.templates:
            before, after = (re.escape(part) for part in template.split("{text}", 1))
            out.append(re.compile(f"^{before}(?P<text>.+?){after}$", re.IGNORECASE))
    return out


def unstyle(text: str, patterns: list[re.Pattern]) -> str:
    """A refined statement without its platform phrasing ("aerial view: a red roof" -> "a red roof")."""
    for rx in patterns:
        m = rx.match(text.strip())
        if m:
            return m.group("text")
    return text


def _dedupe_key(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def visible_parts(statement: str, platform: str, vocab: Vocabulary) -> list[str]:
    """The statement if all it mentions is visible, else its clauses that mention only visible attributes."""
    visible = vocab.visible(platform)
    attrs = attributes_of(statement, vocab)
    if attrs <= visible:
        return [statement]
    clauses = [c.strip() for c in vocab.clause_regex.split(statement) if c and c.strip()]
    return [c for c in clauses if (a := attributes_of(c, vocab)) and a <= visible]


def best_originals(texts: list[str], platform: str, vocab: Vocabulary) -> list[str]:
    """The original statements that say most about visible (and least about invisible) attributes."""
    visible = vocab.visible(platform)
    scored = []
    for i, raw in enumerate(texts):
        s = clean_statement(raw)
        attrs = attributes_of(s, vocab)
        if s and attrs & visible and not is_directional(s, vocab):
            scored.append((-len(attrs & visible), len(attrs - visible), i, s))
    best = sorted(scored)[: vocab.fallback_keep]
    return [s for *_, s in sorted(best, key=lambda t: t[2])]


def refine_rules(texts: list[str], platform: str, vocab: Vocabulary) -> RuleResult:
    """Drop invisible/filler/directional statements, phrase the rest for the platform, deduplicate."""
    dropped: Counter = Counter()
    kept: list[str] = []
    seen: set[str] = set()
    for raw in texts:
        s = clean_statement(raw)
        if not s:
            continue
        if is_directional(s, vocab):
            dropped["directional"] += 1
            continue
        if is_filler(s, vocab):
            dropped["filler"] += 1
            continue
        parts = visible_parts(s, platform, vocab)
        if not parts:
            dropped["invisible"] += 1
            continue
        for part in parts:
            phrase = normalize_phrase(part, vocab)
            key = _dedupe_key(phrase)
            if not key or key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
            kept.append(style_phrase(phrase, platform, vocab))
    if kept:
        return RuleResult(kept, "ok", dict(dropped))
    originals = best_originals(texts, platform, vocab)
    return RuleResult(originals, "original" if originals else "empty", dict(dropped))
