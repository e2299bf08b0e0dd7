"""The one trunk-output cache of a train worker: statement -> what the frozen text side computes for it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

CHUNK = 256  # statements per trunk call when filling the cache (bounds the activations of one call)


class TrunkCache:
    """A bounded LRU map from a statement to a frozen function of it (its trunk output, a pooled feature).

    The trunk is frozen, so a statement's output is the same in every epoch: computing it once per statement
    rather than once per step is most of what a head or gate step saves. `max_items` bounds the memory (0: keep
    nothing); an evicted statement is simply computed again.
    """

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._items: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, statements: Sequence[str], compute: Callable[[list[str]], Sequence[Any]]) -> list[Any]:
        """Values in the order of `statements`; the missing ones computed by `compute`, sorted, in chunks."""
        found: dict[str, Any] = {}
        for s in statements:
            if s in self._items:
                self._items.move_to_end(s)
                found[s] = self._items[s]
        missing = sorted(set(statements) - found.keys())
        for i in range(0, len(missing), CHUNK):
            chunk = missing[i : i + CHUNK]
            found.update(zip(chunk, compute(chunk), strict=True))
        for s in missing:
            self._put(s, found[s])
        return [found[s] for s in statements]

    def _put(self, statement: str, value: Any) -> None:
        if self.max_items <= 0:
            return
        self._items[statement] = value
        if len(self._items) > self.max_items:
            self._items.popitem(last=False)
