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


def sample_texts(texts_column: Sequence[Sequence[str]], rng: np.random.Generator) -> list[str]:
    """One of each image's texts, drawn anew every epoch (an image has several statements)."""
    return [str(t[rng.integers(len(t))]) for t in texts_column]
