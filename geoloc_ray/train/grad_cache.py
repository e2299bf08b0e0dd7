"""GradCache (Gao et al. 2021): a contrastive step over more inputs than fit through the trainable layers at once.

Pass 1 embeds every chunk without a graph; the loss and its gradient w.r.t. those embeddings are computed once;
pass 2 re-embeds chunk by chunk with a graph and backpropagates each chunk's cached gradient. The gradients are
the one-shot step's exactly (each chunk replays the random state its first pass saw: dropout, drop-path), while
activation memory is bounded by one chunk. The frozen part of an encoder (`prepare`) runs once, in pass 1: its
output is a constant the re-encode reads.

Imported inside the train step (it imports torch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.checkpoint import get_device_states, set_device_states


class RandState:
    """The CPU and device generators' states when made; `replay` runs a block from them again (GradCache's
    RandContext), leaving the global generators as they were."""

    def __init__(self, *tensors: torch.Tensor):
        self.cpu = torch.get_rng_state()
        self.devices, self.states = get_device_states(*tensors)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices, enabled=True):
            torch.set_rng_state(self.cpu)
            set_device_states(self.devices, self.states)
            yield


def _tensors(x: Any) -> list[torch.Tensor]:
    """The tensors inside a prepared chunk (a tensor or a trunk output), whose devices' generators to save."""
    if isinstance(x, torch.Tensor):
        return [x]
    return [v for v in vars(x).values() if isinstance(v, torch.Tensor)]


class ChunkedEncoder:
    """One encoder over `chunks` of its input: `prepare` (frozen, no graph, run once per chunk) then `encode`
    (trainable). `embeddings()` is pass 1; `backward(grad)` is pass 2."""

    def __init__(self, prepare: Callable[[Any], Any], encode: Callable[[Any], torch.Tensor], chunks: Sequence[Any]):
        self.encode = encode
        self.states: list[RandState] = []
        self.sizes: list[int] = []
        with torch.no_grad():
            self.prepared = [prepare(c) for c in chunks]

    def embeddings(self) -> torch.Tensor:
        """Every chunk's embeddings without a graph (the random state before each chunk kept for pass 2)."""
        out = []
        with torch.no_grad():
            for prepared in self.prepared:
                self.states.append(RandState(*_tensors(prepared)))
                out.append(self.encode(prepared))
                self.sizes.append(len(out[-1]))
        return torch.cat(out)

    def backward(self, grad: torch.Tensor, last: Callable[[], torch.Tensor] | None = None, ddp: Any = None) -> None:
        """Re-encode each chunk with its graph and backpropagate its rows of `grad` (d loss / d embeddings).

        `last()` is added to the last chunk's surrogate (another encoder's cached-gradient term, kept graph and
        all). With `ddp` (the trainable parts under DistributedDataParallel) every chunk's forward runs through
        it, all but the last under `no_sync`: gradients accumulate locally and are all-reduced once.
        """
        parts = grad.split(self.sizes)
        for i, (prepared, state, g) in enumerate(zip(self.prepared, self.states, parts, strict=True)):
            final = i == len(self.prepared) - 1

            def surrogate(prepared=prepared, state=state, g=g, final=final) -> torch.Tensor:
                with state.replay():
                    s = (self.encode(prepared) * g).sum()
                return s + last() if final and last is not None else s

            with contextlib.nullcontext() if ddp is None or final else ddp.no_sync():
                (surrogate() if ddp is None else ddp(run=surrogate)).backward()


def chunks(n: int, size: int) -> list[slice]:
    """Row ranges of `size` (the last one shorter) covering 0..n."""
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]
