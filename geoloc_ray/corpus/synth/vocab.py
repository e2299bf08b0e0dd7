"""Everyday words for the attributes, shared by training captions and test queries.

Captions and queries differ in sentence structure, never in attribute words: a text encoder must be able
to connect "a red gabled roof" in a query with "the roof is red ... it is gabled" in a caption.
"""

from __future__ import annotations

import numpy as np

from geoloc_ray.corpus.synth.world import Location

ROOF_SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "flat": ("flat",), "gabled": ("gabled", "pitched"), "dome": ("domed",), "hipped": ("hipped",),
}
FOOTPRINT_WORDS: dict[str, tuple[str, ...]] = {
    "square": ("square",), "rectangle": ("rectangular", "long rectangular"), "L-shape": ("L-shaped",),
}
HEIGHT_WORDS: dict[str, tuple[str, ...]] = {
    "low": ("low", "low-rise"), "mid": ("mid-rise", "medium-height"), "tall": ("tall", "high-rise"),
}
WINDOW_WORDS: dict[str, tuple[str, ...]] = {
    "many_small": ("many small windows", "rows of small windows", "a grid of small windows"),
    "large_glass": ("large glass windows", "large glass panels", "big glass windows"),
    "few_narrow": ("a few narrow windows", "few narrow windows", "some narrow windows"),
}
# (noun phrase, plural?) for each surrounding; every phrase keeps the plain word (lake, river, ...).
SURROUNDING_WORDS: dict[str, tuple[tuple[str, bool], ...]] = {
    "lake": (("a lake", False), ("a small lake", False), ("a blue lake", False)),
    "river": (("a river", False), ("a narrow river", False), ("a winding river", False)),
    "trees": (("trees", True), ("some trees", True), ("a group of trees", False), ("green trees", True)),
    "road": (("a road", False), ("a paved road", False), ("a busy road", False)),
    "parking": (("a parking lot", False), ("a large parking lot", False), ("a parking lot with cars", False)),
    "grass": (("a grass field", False), ("a green field", False), ("a grassy field", False)),
    "crops": (("a crop field", False), ("a field of crops", False), ("a farm field", False)),
}
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve")


def pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def surrounding_key(loc: Location, name: str) -> str:
    """The vocabulary key of a present surrounding: water and field carry their kind."""
    if name == "water":
        return loc.water or "lake"
    if name == "field":
        return loc.field or "grass"
    return name


def surrounding_np(loc: Location, name: str, rng: np.random.Generator) -> tuple[str, bool]:
    return pick(rng, SURROUNDING_WORDS[surrounding_key(loc, name)])


def number_word(n: int, rng: np.random.Generator) -> str:
    return _NUMBERS[n] if n < len(_NUMBERS) and rng.random() < 0.6 else str(n)


def floors_phrase(loc: Location, rng: np.random.Generator) -> str:
    """'three floors' / '3 floors' / 'a single floor'."""
    if loc.floors == 1:
        return pick(rng, ("a single floor", "one floor"))
    return f"{number_word(loc.floors, rng)} floors"


def storey_adj(loc: Location, rng: np.random.Generator) -> str:
    """'two-storey' / 'tall' / 'mid-rise': an adjective for the building's height."""
    if rng.random() < 0.35:
        return f"{number_word(loc.floors, rng)}-storey"
    return pick(rng, HEIGHT_WORDS[loc.height])


def article(word: str) -> str:
    """'a' or 'an' by sound: 'an L-shaped', 'an 8-storey', 'an eleven-storey'."""
    sounds_vowel = word[:1].lower() in "aeiou" or word.startswith(("L-", "8", "11-", "11 ", "18"))
    return "an" if sounds_vowel else "a"


def join_and(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]
