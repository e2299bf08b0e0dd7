"""The vLLM backend: `ray.data.llm` on GPU workers, vLLM installed through its own `runtime_env`.

vLLM pins its own torch/transformers, so it never enters the main venv. The pipeline: cache lookup (actor)
-> misses through the vLLM processor -> new cache shards -> hits and fresh answers validated together.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from geoloc_ray.captions.cache import RefineCache, cache_key, write_shard
from geoloc_ray.captions.prompts import build_messages
from geoloc_ray.captions.refiner import (
    RefineSettings,
    attach_outcomes,
    batch_inputs,
    count_rejections,
    finalize,
    make_entry,
)

_WORK_COLUMNS = ("refine_key", "refine_output", "refine_was_cached")


def gpu_request_error(need: int, offer: dict[str, dict[str, float]], where: str) -> str | None:
    """Why no node could ever hold one vLLM engine (`need` GPUs on one node), or None when one could: a node type
    with enough GPUs is enough, even at 0 running workers (the autoscaler starts it when the engine asks)."""
    gpus = {name: resources.get("GPU", 0.0) for name, resources in offer.items()}
    best = max(gpus.values(), default=0.0)
    if best >= need:
        return None
    return (f"refine.backend=vllm asks for {need} 'GPU' resource(s) on one node per engine "
            f"(refine.vllm.tensor_parallel_size={need}) but {where} offer at most {best:g} "
            f"({', '.join(f'{k}: {v:g}' for k, v in gpus.items()) or 'none'}): add a GPU node type to "
            "cluster.yaml `available_node_types`, lower refine.vllm.tensor_parallel_size, or use "
            "refine.backend=transformers or rules")


def check_gpus(tensor_parallel_size: int) -> None:
    """Fail at once when no node the cluster has or could start fits one engine; otherwise request the GPUs and
    let the autoscaler bring them (GPU types may sit at min_workers 0: declared is enough, started is not needed).
    """
    from geoloc_ray.cluster_types import offered_nodes

    offer, where = offered_nodes()
    error = gpu_request_error(tensor_parallel_size, offer, where) if offer is not None else None
    if error:
        raise RuntimeError(error)


def vllm_processor_config(rc, model: str | None = None):
    """The `vLLMEngineProcessorConfig` for `refine.vllm` (`rc` is a RefineConfig)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    v = rc.vllm
    return vLLMEngineProcessorConfig(
        model_source=model or v.model,
        engine_kwargs={
            "tensor_parallel_size": v.tensor_parallel_size,
            "max_model_len": v.max_model_len,
            "enable_prefix_caching": True,  # every prompt of a platform shares its system message
        },
        runtime_env=v.runtime_env,
        concurrency=v.concurrency,
        batch_size=v.batch_size,
    )


def vllm_preprocess(row: dict[str, Any], settings: RefineSettings) -> dict[str, Any]:
    """A row -> the processor's inputs (chat messages, greedy sampling); other columns are carried along."""
    messages = build_messages(
        list(row["texts"] if row["texts"] is not None else []),
        row["platform"],
        settings.vocabulary,
        settings.prompt_version,
        settings.prompt_words,
    )
    return {
        **row,
        "messages": messages,
        "sampling_params": {"temperature": 0.0, "max_tokens": settings.max_new_tokens},
    }


def vllm_postprocess(row: dict[str, Any], keep: list[str]) -> dict[str, Any]:
    """Keep the dataset's own columns, the answer as `refine_output`; drop the processor's working columns."""
    out = {k: row[k] for k in keep}
    out["refine_output"] = row.get("generated_text") or ""
    return out


def build_vllm_processor(settings: RefineSettings, rc, keep: list[str]) -> Callable:
    """`ray.data.llm.build_processor` with our prompts in and the raw answers out."""
    from ray.data.llm import build_processor

    return build_processor(
        vllm_processor_config(rc, settings.model),
        preprocess=partial(vllm_preprocess, settings=settings),
        postprocess=partial(vllm_postprocess, keep=keep),
        preprocess_map_kwargs={"num_cpus": rc.actor_num_cpus},
        postprocess_map_kwargs={"num_cpus": rc.actor_num_cpus},
    )


class CacheLookup:
    """Adds `refine_key`, `refine_output` (the cached answer or null) and `refine_was_cached`."""

    def __init__(self, settings: RefineSettings):
        from geoloc_ray import io

        for proto, opts in settings.storage_options.items():
            io.set_storage_options(proto, opts)
        self.s = settings
        self.cache = RefineCache(settings.cache_uri)
        self.cache.load()

    def __call__(self, batch):
        import pyarrow as pa

        texts, platforms = batch_inputs(batch)
        keys = [
            cache_key(t, p, self.s.prompt_id, self.s.model_id) for t, p in zip(texts, platforms, strict=True)
        ]
        found = [self.cache.get(k) for k in keys]
        batch = batch.append_column("refine_key", pa.array(keys, pa.string()))
        batch = batch.append_column(
            "refine_output", pa.array([e and e["output"] for e in found], pa.string())
        )
        return batch.append_column("refine_was_cached", pa.array([e is not None for e in found], pa.bool_()))


def write_cache_batch(batch, settings: RefineSettings):
    """Store a batch of fresh answers as a new cache shard; the batch passes through unchanged."""
    texts, platforms = batch_inputs(batch)
    keys, outputs = batch.column("refine_key").to_pylist(), batch.column("refine_output").to_pylist()
    write_shard(
        settings.cache_uri,
        [
            make_entry(k, t, p, settings, o or "")
            for k, t, p, o in zip(keys, texts, platforms, outputs, strict=True)
        ],
    )
    return batch


def finalize_batch(batch, settings: RefineSettings):
    """Validate every answer (cached or fresh), fall back to the rules on rejection, add the stat columns."""
    texts, platforms = batch_inputs(batch)
    outputs = batch.column("refine_output").to_pylist()
    hits = batch.column("refine_was_cached").to_pylist()
    outcomes = [
        finalize(t, p, {"output": o or ""}, bool(h), settings)
        for t, p, o, h in zip(texts, platforms, outputs, hits, strict=True)
    ]
    count_rejections(outcomes, platforms)
    return attach_outcomes(batch.drop_columns(list(_WORK_COLUMNS)), outcomes)


def refine_with_vllm(ds, settings: RefineSettings, rc, processor_factory: Callable = build_vllm_processor):
    """The refine pipeline around a `ray.data.llm` processor (`processor_factory(settings, rc, keep)`)."""
    import ray.data
    from ray.data.expressions import col

    cpu = {"batch_format": "pyarrow", "batch_size": rc.batch_size, "num_cpus": rc.actor_num_cpus}
    looked = ds.map_batches(
        CacheLookup,
        fn_constructor_kwargs={"settings": settings},
        compute=ray.data.ActorPoolStrategy(size=rc.num_actors),
        **cpu,
    ).materialize()
    hits = looked.filter(expr=col("refine_was_cached") == True)  # noqa: E712 (an expression, not a test)
    misses = looked.filter(expr=col("refine_was_cached") == False)  # noqa: E712
    rows = hits
    if misses.count():  # all cached: don't start GPU engines for nothing
        processor = processor_factory(settings, rc, looked.columns())
        fresh = processor(misses).map_batches(write_cache_batch, fn_kwargs={"settings": settings}, **cpu)
        rows = hits.union(fresh)
    return rows.map_batches(finalize_batch, fn_kwargs={"settings": settings}, **cpu)
