"""Training captions as an LLM captioner writes them: long, generic, platform-blind, with directions.

This is the domain gap PE-MoE exists for: a caption of a satellite image still talks about windows and the
facade colour, and places surroundings with directional phrases ("to the north of the building") that
short test queries never use.
"""

from __future__ import annotations

import numpy as np

from geoloc_ray.corpus.synth.vocab import (
    FOOTPRINT_WORDS,
    HEIGHT_WORDS,
    ROOF_SHAPE_WORDS,
    WINDOW_WORDS,
    article,
    capitalise,
    floors_phrase,
    join_and,
    pick,
    surrounding_np,
)
from geoloc_ray.corpus.synth.world import Location

# Direction phrases per side; each matches the preprocessing's directional patterns, so cleaning can drop them.
_DIRECTIONS: dict[str, tuple[str, ...]] = {
    "north": ("to the north of the building", "at the top of the image", "on the northern side"),
    "south": ("to the south of the building", "at the bottom of the image", "on the southern side"),
    "east": ("to the east of the building", "on the right side", "on the eastern side"),
    "west": ("to the west of the building", "on the left side", "on the western side"),
}
FILLERS: tuple[str, ...] = (
    "The sky is clear.", "The image is taken in daytime.", "The weather appears sunny.",
    "The scene looks calm and quiet.", "The photo is sharp and well lit.",
    "Overall, the area looks well maintained.", "No people are clearly visible.",
    "The lighting suggests it is around midday.", "The colours in the picture are natural.",
)

# Sentence templates keyed by the attributes they mention. Slots: rc roof colour, shape, fc facade colour,
# win windows, height (adjective), floors (phrase), fp footprint.
_TEMPLATES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("roof_colour", "roof_shape"): (
        "Its roof is {rc} and {shape}.", "The building is topped by {a_shape} {shape} {rc} roof.",
        "It has {a_shape} {shape} roof painted {rc}.", "The {rc} roof of the building is {shape}.",
    ),
    ("roof_colour",): ("The roof of the building is {rc}.", "The rooftop is {rc} in colour.",
                       "Its roof is covered in {rc} material."),
    ("roof_shape",): ("The roof is {shape}.", "It is covered by {a_shape} {shape} roof."),
    ("facade", "windows"): (
        "The facade is {fc} with {win}.", "Its {fc} walls are lined with {win}.",
        "The exterior walls are {fc} and have {win}.",
    ),
    ("facade",): ("The walls of the building are {fc}.", "The building has {a_fc} {fc} facade.",
                  "Its exterior is {fc}."),
    ("windows",): ("The building has {win}.", "There are {win} on its walls.", "The facade features {win}."),
    ("height",): ("The building has {floors}.", "It is {a_height} {height} structure with {floors}.",
                  "The building is {height}, with {floors}."),
    ("footprint",): ("Seen from above, the building has {a_fp} {fp} footprint.", "The outline of the building is {fp}.",
                     "Its footprint is {fp}."),
    ("height", "footprint"): ("It is {a_height} {height} {fp} structure.",),
}
_INTROS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("height", "roof_colour", "roof_shape"): ("The image shows {a_height} {height} building with {a_rc} {rc} {shape} roof.",),
    ("footprint", "roof_colour"): ("This picture captures {a_fp} {fp} building whose roof is {rc}.",),
    ("height", "facade"): ("In the centre of the image stands {a_height} {height} {fc} building.",),
    ("footprint", "height"): ("The main subject of the image is {a_fp} {fp} {height} building.",),
    ("roof_colour",): ("A building with {a_rc} {rc} roof occupies the middle of the scene.",
                       "The image depicts a single building with {a_rc} {rc} roof."),
}
ATTRIBUTES: tuple[str, ...] = ("roof_colour", "roof_shape", "facade", "windows", "height", "footprint")


def _slots(loc: Location, rng: np.random.Generator) -> dict[str, str]:
    # The height adjective stays a word ("tall"); the floor count is carried by the `floors` phrase.
    shape, height = pick(rng, ROOF_SHAPE_WORDS[loc.roof_shape]), pick(rng, HEIGHT_WORDS[loc.height])
    fp = pick(rng, FOOTPRINT_WORDS[loc.footprint])
    slots = {"rc": loc.roof_colour, "shape": shape, "fc": loc.facade_colour, "height": height, "fp": fp,
             "win": pick(rng, WINDOW_WORDS[loc.windows]), "floors": floors_phrase(loc, rng)}
    slots.update({f"a_{k}": article(slots[k]) for k in ("rc", "shape", "fc", "height", "fp")})
    return slots


def _attribute_sentences(loc: Location, rng: np.random.Generator, slots: dict[str, str]) -> list[str]:
    """An intro, then sentences until every building attribute has been mentioned once."""
    intro_keys = pick(rng, list(_INTROS))
    sentences = [pick(rng, _INTROS[intro_keys]).format(**slots)]
    todo = [a for a in ATTRIBUTES if a not in intro_keys]
    while todo:
        fits = [k for k in _TEMPLATES if set(k) <= set(todo) and todo[0] in k]
        keys = pick(rng, fits)
        sentences.append(pick(rng, _TEMPLATES[keys]).format(**slots))
        todo = [a for a in todo if a not in keys]
    return sentences


def _surroundings_sentence(loc: Location, rng: np.random.Generator) -> str:
    present = loc.present()
    chosen = [present[i] for i in sorted(rng.choice(len(present), int(rng.integers(1, len(present) + 1)),
                                                    replace=False))]
    items = join_and([surrounding_np(loc, s, rng)[0] for s in chosen])
    template = pick(rng, ("The surroundings include {x}.", "Near the building you can see {x}.",
                          "Around it you can see {x}.", "The area around the building contains {x}."))
    return template.format(x=items)


def _directional_sentence(loc: Location, name: str, rng: np.random.Generator) -> str:
    np_, plural = surrounding_np(loc, name, rng)
    where = pick(rng, _DIRECTIONS[loc.sides[name]])
    be = "are" if plural else "is"
    if name in ("road", "water") and rng.random() < 0.4 and not where.startswith("at the"):
        verb = "runs" if name == "road" or loc.water == "river" else "lies"
        return f"{capitalise(np_)} {verb} {where}."
    template = pick(rng, ("{W} there {be} {x}.", "{X} can be seen {w}.", "There {be} {x} {w}."))
    return template.format(W=capitalise(where), w=where, be=be, x=np_, X=capitalise(np_))


def training_caption(loc: Location, rng: np.random.Generator) -> list[str]:
    """5-9 sentences: every attribute, some surroundings, 1-3 directional sentences, some filler."""
    slots = _slots(loc, rng)
    core = _attribute_sentences(loc, rng, slots)
    body = core[1:]
    rng.shuffle(body)
    sentences = core[:1] + body
    if rng.random() < 0.85 or len(sentences) < 4:
        sentences.append(_surroundings_sentence(loc, rng))
    present = loc.present()
    n_dir = int(rng.integers(1, min(3, len(present)) + 1))
    n_dir = max(1, min(n_dir, 9 - len(sentences)))
    for name in rng.choice(present, n_dir, replace=False):
        sentences.insert(int(rng.integers(1, len(sentences) + 1)), _directional_sentence(loc, str(name), rng))
    target = int(rng.integers(5, 10))
    n_fill = min(max(target - len(sentences), 0), 3, 9 - len(sentences))
    n_fill = max(n_fill, 5 - len(sentences))
    for filler in rng.choice(FILLERS, n_fill, replace=False):
        sentences.insert(int(rng.integers(1, len(sentences) + 1)), str(filler))
    return sentences
