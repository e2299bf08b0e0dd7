"""Eval's query side on an actor pool: every test query under every evaluated model's text heads (and gates),
from one text-trunk pass per query shared by every model whose frozen trunk is the same one.

The vectors go to storage (`artifacts.eval_query_embeddings`), where the search tasks read their block; the
driver never holds them. Actors ask for what `index` asks for embedding (GPUs when `index.actors.num_gpus`), and
compute on the device the config's `device` resolves to there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from geoloc_ray import io
from geoloc_ray.config import IndexConfig
from geoloc_ray.devices import resolve_device
from geoloc_ray.embedding import autocast

QUERY_BATCH = 256  # texts per actor call (what the text embedding uses)


@dataclass(frozen=True)
class QueryModel:
    """One model's query outputs: its text heads, and its gate's weights in `gate_order` (None: no gate)."""

    uri: str
    heads: tuple[str, ...]
    gate_order: tuple[str, ...] | None = None
    gate_temperature: float | None = None  # routes at this temperature, not the one its manifest records


def head_column(model: str, head: str) -> str:
    """The query column of `model`'s head `head` (unit vectors t_head(q))."""
    return f"{model}:{head}"


def gate_column(model: str) -> str:
    """The query column of `model`'s gate weights g(q), in the order the eval asked for."""
    return f"{model}:gate"


class QueryEncoder:
    """`map_batches` callable: rows with `query` -> one column per (model, head) and per gate.

    Each model is loaded on the CPU without its image trunk (queries need none), its text trunk shared with an
    earlier model's when equal, then moved to the device: one trunk in memory and one pass per batch for all."""

    def __init__(self, models: dict[str, QueryModel], storage: dict | None = None, torch_threads: int = 1,
                 bf16: bool = True, device: str = "auto"):
        import torch

        from geoloc_ray.model import load_model
        from geoloc_ray.model.shared_trunk import share_text_trunks

        io.use_storage_options(storage)
        torch.set_num_threads(torch_threads)
        self.device, self.bf16 = resolve_device(device), bf16
        self.models: dict[str, tuple[Any, QueryModel]] = {}
        for name, spec in models.items():
            model = load_model(spec.uri, heads=list(spec.heads)).eval()
            model.image_trunk = None  # the query side never runs it: freed before the next model loads
            share_text_trunks([*(m for m, _ in self.models.values()), model])
            if spec.gate_order is not None:
                _check_gate(model, spec.gate_order, name)
                if spec.gate_temperature is not None:
                    model.gate.temperature = spec.gate_temperature
            self.models[name] = (model, spec)
        for model, _ in self.models.values():  # shared modules move once (already on the device the second time)
            model.to(self.device)
            if self.bf16 and self.device == "cuda":
                model.to(torch.bfloat16)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        texts = [str(q) for q in batch["query"]]
        out = dict(batch)
        trunks: dict[int, Any] = {}
        with torch.no_grad(), autocast(self.device, self.bf16):
            for name, (model, spec) in self.models.items():
                key = id(model.text_trunk)
                if key not in trunks:
                    trunks[key] = model.text_trunk_output(texts)
                trunk = trunks[key]
                for head in spec.heads:
                    out[head_column(name, head)] = model.text_head(head, trunk).float().cpu().numpy()
                if spec.gate_order is not None:
                    columns = [model.gate.platforms.index(p) for p in spec.gate_order]
                    out[gate_column(name)] = model.gate(trunk).float().cpu().numpy()[:, columns]
        return out


def _check_gate(model: Any, order: Sequence[str], name: str) -> None:
    if model.gate is None:
        raise ValueError(f"eval routes with the gate of models/{name}, but it has none")
    missing = [p for p in order if p not in model.gate.platforms]
    if missing:
        raise ValueError(f"the gate of models/{name} has no weight for expert(s) {missing}")


def query_embedding_dataset(ds, models: dict[str, QueryModel], ic: IndexConfig, device: str = "auto"):
    """The lazy Ray Dataset of query rows + their head and gate columns (write it to storage)."""
    import ray.data

    return ds.map_batches(QueryEncoder, batch_size=QUERY_BATCH, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=ic.actors.count), num_cpus=ic.actors.num_cpus,
                          num_gpus=ic.actors.num_gpus or None,
                          fn_constructor_kwargs={"models": models, "storage": io.storage_options(),
                                                 "torch_threads": ic.torch_threads, "bf16": ic.bf16,
                                                 "device": device})


def vector_columns(models: dict[str, QueryModel]) -> list[str]:
    """Every vector column the encoder adds (what the parquet writer turns into fixed-size lists)."""
    return [c for name, spec in models.items() for c in
            [*(head_column(name, h) for h in spec.heads), *([gate_column(name)] if spec.gate_order else [])]]

