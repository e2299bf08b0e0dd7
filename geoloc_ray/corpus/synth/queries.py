"""Test queries: short, platform-specific, 2-4 attributes that the platform can actually see.

Their sentence structure (noun phrases, "next to", "with ... nearby") is their own, unlike the captions' full
sentences; they never use directions. Attribute words are the shared vocabulary.
"""

from __future__ import annotations

import numpy as np

from geoloc_ray.corpus.synth.vocab import (
    FOOTPRINT_WORDS,
    ROOF_SHAPE_WORDS,
    WINDOW_WORDS,
    article,
    floors_phrase,
    join_and,
    pick,
    storey_adj,
    surrounding_np,
)
from geoloc_ray.corpus.synth.world import Location

# What each platform can see (the surroundings are filtered by presence at the location).
VISIBLE: dict[str, tuple[str, ...]] = {
    "satellite": ("roof_colour", "roof_shape", "footprint", "water", "trees", "road", "parking", "field"),
    "drone": ("roof_colour", "roof_shape", "facade", "windows", "height", "footprint",
              "water", "trees", "road", "parking", "field"),
    "ground": ("facade", "windows", "height", "trees", "road"),
}
_SURROUNDINGS = ("water", "trees", "road", "parking", "field")
PLATFORM_CUES: dict[str, tuple[str, ...]] = {
    "satellite": ("satellite image of", "satellite view of", "aerial photo of", "overhead view of",
                  "bird's-eye image of"),
    "drone": ("drone view of", "drone photo of", "oblique aerial shot of", "UAV image of"),
    "ground": ("street view of", "street-level photo of", "ground-level view of", "pedestrian photo of"),
}
_STARTS: tuple[str, ...] = ("", "find", "looking for", "show me", "where is")
_NEAR: tuple[str, ...] = ("next to {x}", "beside {x}", "near {x}", "with {x} nearby", "close to {x}")
_GROUND_NEAR: dict[tuple[str, ...], tuple[str, ...]] = {
    ("trees",): ("with trees along the street", "with trees nearby", "partly hidden by trees"),
    ("road",): ("by a road", "facing a road", "along a busy road", "on a paved road"),
    ("road", "trees"): ("on a road lined with trees", "by a road with trees", "facing a road and some trees"),
}


def _choose(loc: Location, platform: str, rng: np.random.Generator) -> list[str]:
    """2-4 visible attributes, always one that identifies the building itself."""
    visible = [a for a in VISIBLE[platform] if a not in _SURROUNDINGS or getattr(loc, a)]
    if platform == "satellite":
        primary = ["roof_colour"]
    elif platform == "ground":
        primary = ["facade"]
    else:
        primary = [["roof_colour"], ["facade"], ["roof_colour", "facade"]][int(rng.integers(3))]
    rest = [a for a in visible if a not in primary]
    k = int(rng.integers(2, 5)) - len(primary)
    k = max(0, min(k, len(rest)))
    extra = [rest[i] for i in sorted(rng.choice(len(rest), k, replace=False))] if k else []
    return primary + extra


def _roof_np(loc: Location, chosen: list[str], rng: np.random.Generator) -> str:
    words = [loc.roof_colour] if "roof_colour" in chosen else []
    if "roof_shape" in chosen:
        words.append(pick(rng, ROOF_SHAPE_WORDS[loc.roof_shape]))
    return " ".join(words + [pick(rng, ("roof", "rooftop")) if len(words) else "roof"])


def _building_np(loc: Location, chosen: list[str], platform: str, rng: np.random.Generator) -> str:
    """'tall cream building with large glass windows and a red gabled roof' and its variants."""
    adjs = []
    if "height" in chosen and rng.random() < 0.7:
        adjs.append(storey_adj(loc, rng))
        chosen = [c for c in chosen if c != "height"]
    if "footprint" in chosen:
        adjs.append(pick(rng, FOOTPRINT_WORDS[loc.footprint]))
    walls_as_noun = "facade" in chosen and rng.random() < 0.4
    if "facade" in chosen and not walls_as_noun:
        adjs.append(loc.facade_colour)
    withs = []
    if walls_as_noun:
        withs.append(pick(rng, (f"{loc.facade_colour} walls", f"{article(loc.facade_colour)} {loc.facade_colour} facade")))
    if "windows" in chosen:
        withs.append(pick(rng, WINDOW_WORDS[loc.windows]))
    if "height" in chosen:
        withs.append(floors_phrase(loc, rng))
    if "roof_colour" in chosen or "roof_shape" in chosen:
        roof = _roof_np(loc, chosen, rng)
        if platform == "satellite" and not adjs and rng.random() < 0.5:
            return roof
        withs.append(f"{article(roof)} {roof}")
    head = " ".join(adjs + [pick(rng, ("building", "building", "house", "block"))])
    return head + (f" with {join_and(withs)}" if withs else "")


def _surroundings_clause(loc: Location, chosen: list[str], platform: str, rng: np.random.Generator) -> str:
    names = [c for c in chosen if c in _SURROUNDINGS]
    if not names:
        return ""
    if platform == "ground":
        return pick(rng, _GROUND_NEAR[tuple(sorted(names))])
    if names == ["trees"] and rng.random() < 0.5:
        return "surrounded by trees"
    items = join_and([surrounding_np(loc, n, rng)[0] for n in names])
    return pick(rng, _NEAR).format(x=items)


def _one_query(loc: Location, platform: str, rng: np.random.Generator) -> str:
    chosen = _choose(loc, platform, rng)
    subject = _building_np(loc, chosen, platform, rng)
    clause = _surroundings_clause(loc, chosen, platform, rng)
    body = f"{subject} {clause}".strip()
    if rng.random() < 0.5:
        return f"{pick(rng, PLATFORM_CUES[platform])} {article(body)} {body}"
    start = pick(rng, _STARTS)
    return f"{start} {article(body)} {body}".strip() if start or rng.random() < 0.5 else body


def platform_queries(loc: Location, platform: str, count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct queries of 8-25 words for one image of `loc` seen from `platform`."""
    out: list[str] = []
    for _ in range(50 * count):
        q = _one_query(loc, platform, rng)
        if 8 <= len(q.split()) <= 25 and q not in out:
            out.append(q)
        if len(out) == count:
            break
    while len(out) < count:  # a location with little to say: lengthen with a platform cue
        body = _one_query(loc, platform, rng)
        out.append(f"{pick(rng, PLATFORM_CUES[platform])} {article(body)} {body} in the city")
    return out
