"""Worker-side batch preparation: numpy rows from a Ray Data shard -> model inputs (pure functions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _strings(group) -> np.ndarray:
    """A flat str array from a column that may hold nested lists (Ray Data gives list columns as object arrays)."""
    arr = np.asarray(group, dtype=object).reshape(-1)
    if arr.size and isinstance(arr[0], (list, tuple, np.ndarray)):
        arr = np.concatenate([np.asarray(x, dtype=object).reshape(-1) for x in arr])
    return arr.astype(str)


def location_codes(*groups) -> list[torch.Tensor]:
    """Integer codes for location ids (flattened), consistent across groups (positives and mined negatives)."""
    flats = [_strings(g) for g in groups]
    _, inverse = np.unique(np.concatenate(flats), return_inverse=True)
    out, start = [], 0
    for f in flats:
        out.append(torch.as_tensor(inverse[start : start + len(f)], dtype=torch.long))
        start += len(f)
    return out


def sample_texts(texts_column: Sequence[Sequence[str]], rng: np.random.Generator, max_statements: int = 1
                 ) -> list[str]:
    """A query-like text per image, drawn anew each step: 1..max_statements of its statements, joined.

    Single statements name one attribute and match many images; test queries name 2-4 at once.
    """
    out = []
    for texts in texts_column:
        n = int(rng.integers(1, min(max_statements, len(texts)) + 1))
        picked = rng.choice(len(texts), size=n, replace=False)
        out.append(", ".join(str(texts[i]).rstrip(". ") for i in sorted(picked)))
    return out
