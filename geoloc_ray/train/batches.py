"""Worker-side batch preparation: numpy rows from a Ray Data shard -> model inputs (pure functions)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch


def _strings(group) -> np.ndarray:
    """A flat str array from a column that may hold nested lists (Ray Data gives list columns as object arrays)."""
    arr = np.asarray(group, dtype=object).reshape(-1)
    if arr.size and isinstance(arr[0], (list, tuple, np.ndarray)):
        arr = np.concatenate([np.asarray(x, dtype=object).reshape(-1) for x in arr])
    return arr.astype(str)


def location_keys(*groups) -> list[torch.Tensor]:
    """int64 keys of location ids (flattened), one per id, equal for equal ids in every process: workers compare
    keys gathered from each other (positives and mined negatives too), so a per-batch numbering would not do."""
    out = []
    for group in groups:
        flat = _strings(group)
        keys = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little", signed=True)
                for s in flat]
        out.append(torch.as_tensor(np.asarray(keys, dtype=np.int64).reshape(len(flat))))
    return out


class TextSampler:
    """Query-like training texts drawn anew each step from an image's statements.

    1..max_statements statements are picked (single statements name one attribute and match many images;
    queries name 2-4 at once); each loses the refiner's platform phrasing with probability `style_dropout`.
    """

    def __init__(self, rng: np.random.Generator, max_statements: int = 1,
                 unstyle: Callable[[str], str] | None = None, style_dropout: float = 0.0):
        self.rng, self.max_statements = rng, max_statements
        self.unstyle, self.style_dropout = unstyle, style_dropout

    def _one(self, text: str) -> str:
        text = str(text).rstrip(". ")
        if self.unstyle is not None and self.rng.random() < self.style_dropout:
            text = self.unstyle(text)
        return text

    def statements(self, texts_column: Sequence[Sequence[str]]) -> list[list[str]]:
        out = []
        for texts in texts_column:
            n = int(self.rng.integers(1, min(self.max_statements, len(texts)) + 1))
            out.append([self._one(texts[i]) for i in sorted(self.rng.choice(len(texts), size=n, replace=False))])
        return out

    def texts(self, texts_column: Sequence[Sequence[str]]) -> list[str]:
        return [", ".join(group) for group in self.statements(texts_column)]
