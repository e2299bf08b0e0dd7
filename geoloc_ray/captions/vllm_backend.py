"""The vLLM backend: `ray.data.llm` on GPU workers (or CPU ones, `device: cpu`), vLLM in its own `runtime_env`.

vLLM pins its own torch/transformers, so it never enters the main venv, and only the engine stage runs in its
env. The pipeline: cache lookup (actor) -> misses through the vLLM processor (a failed row is marked, not fatal)
-> new cache shards -> hits and fresh answers validated together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from geoloc_ray.captions.cache import RefineCache, cache_key, write_shard
from geoloc_ray.captions.prompts import build_messages
from geoloc_ray.captions.refiner import (
    RefineSettings,
    attach_outcomes,
    batch_inputs,
    count_rejections,
    failed_generation,
    finalize,
    make_entry,
)

log = logging.getLogger(__name__)

_WORK_COLUMNS = ("refine_key", "refine_output", "refine_was_cached", "refine_error")
INFERENCE_ERROR = "__inference_error__"  # Ray's per-row error column (should_continue_on_error)
CHECKOUT = Path(__file__).resolve().parents[2]  # where `make vllm-env` builds .venv-vllm


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
    error = gpu_request_error(tensor_parallel_size, offer, where)
    if error:
        raise RuntimeError(error)


def engine_placement(device: str, tensor_parallel_size: int) -> dict[str, Any]:
    """One bundle per tensor-parallel rank: a GPU and a CPU, or with `device: cpu` (vLLM built for CPUs, the
    rehearsal) a CPU alone. Without it Ray's engine stage asks for `num_gpus` and waits forever on CPU nodes."""
    bundle = {"CPU": 1} if device == "cpu" else {"GPU": 1, "CPU": 1}
    return {"bundles": [dict(bundle) for _ in range(tensor_parallel_size)], "strategy": "PACK"}


def engine_runtime_env(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """refine.vllm.runtime_env with a relative `py_executable` path made absolute against the checkout: Ray runs
    it as given (`exec <py_executable> <worker script>`) in the worker's directory, not the driver's."""
    exe = runtime_env.get("py_executable")
    if not exe or " " in exe or "/" not in exe or Path(exe).is_absolute():
        return dict(runtime_env)  # absent, a command ("uv run ..."), a bare name on the PATH, or absolute
    return {**runtime_env, "py_executable": str(CHECKOUT / exe)}


def vllm_processor_config(rc, model: str | None = None, device: str = "auto"):
    """The `vLLMEngineProcessorConfig` for `refine.vllm` (`rc` is a RefineConfig; `device` the config's root one).

    Ray 2.60 gives the processor's `runtime_env` to every stage whose own stage config leaves it None
    (`resolve_stage_config`); the chat template, tokenize and detokenize stages get `{}` (the job's env) so only
    the engine runs in the vLLM env. They need only `transformers`' tokenizer, which the main venv has; tokenizing
    and detokenizing both there keeps the ids consistent, and the engine reads the same model folder."""
    from ray.data.llm import vLLMEngineProcessorConfig

    v = rc.vllm
    cpu_stage = {"runtime_env": {}, "num_cpus": rc.actors.num_cpus}  # fractional: see refine.actors.num_cpus
    return vLLMEngineProcessorConfig(
        model_source=model or v.model,
        engine_kwargs={
            "tensor_parallel_size": v.tensor_parallel_size,
            "max_model_len": v.max_model_len,
            "enforce_eager": v.enforce_eager,
            "enable_prefix_caching": True,  # every prompt of a platform shares its system message
        },
        runtime_env=engine_runtime_env(v.runtime_env),
        placement_group_config=engine_placement(device, v.tensor_parallel_size),
        should_continue_on_error=True,  # a failed row comes back marked (counted, rules-refined), never fatal
        chat_template_stage=dict(cpu_stage),
        tokenize_stage=dict(cpu_stage),
        detokenize_stage=dict(cpu_stage),
        concurrency=v.concurrency,
        batch_size=v.batch_size,
    )


def vllm_preprocess(row: dict[str, Any], settings: RefineSettings) -> dict[str, Any]:
    """A row -> the processor's inputs (chat messages, greedy sampling); other columns are carried along."""
    prompted, _ = settings.split_statements(list(row["texts"] if row["texts"] is not None else []))
    messages = build_messages(
        prompted, row["platform"], settings.vocabulary, settings.prompt_version, settings.prompt_words
    )
    return {
        **row,
        "messages": messages,
        "sampling_params": {"temperature": 0.0, "max_tokens": settings.max_new_tokens},
    }


def vllm_postprocess(row: dict[str, Any], keep: list[str]) -> dict[str, Any]:
    """Keep the dataset's own columns, the answer as `refine_output`; drop the processor's working columns.
    Ray calls it on the rows that generated; a failed row bypasses it with all its working columns."""
    out = {k: row[k] for k in keep}
    out["refine_output"] = row.get("generated_text") or ""
    return out


def vllm_outcome(row: dict[str, Any], keep: list[str]) -> dict[str, Any]:
    """Any row out of the processor -> the dataset's columns, the answer, and `refine_error` (Ray's
    `__inference_error__`: non-empty when this row's generation failed; such a row carries no answer)."""
    error = str(row.get(INFERENCE_ERROR) or "")
    out = {k: row[k] for k in keep if k not in ("refine_output", "refine_error")}
    out["refine_output"] = None if error else (row.get("refine_output") or "")
    out["refine_error"] = error
    return out


def build_vllm_processor(settings: RefineSettings, rc, keep: list[str]) -> Callable:
    """`ray.data.llm.build_processor` with our prompts in and the raw answers (or per-row errors) out."""
    import ray
    from ray.data.llm import build_processor

    if not ray.is_initialized():  # build_processor calls ray.init(runtime_env=...): the engine's env for the job
        ray.init()
    return build_processor(
        vllm_processor_config(rc, settings.model, settings.device),
        preprocess=partial(vllm_preprocess, settings=settings),
        postprocess=partial(vllm_postprocess, keep=keep),
        preprocess_map_kwargs={"num_cpus": rc.actors.num_cpus},
        postprocess_map_kwargs={"num_cpus": rc.actors.num_cpus},
    )


class CacheLookup:
    """Adds `refine_key`, `refine_output` (the cached answer or null), `refine_was_cached` and `refine_error`."""

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
        batch = batch.append_column("refine_was_cached", pa.array([e is not None for e in found], pa.bool_()))
        return batch.append_column("refine_error", pa.array([""] * len(keys), pa.string()))


def write_cache_batch(batch, settings: RefineSettings):
    """Store a batch of fresh answers as a new cache shard (failed rows are not cached: a rerun tries them
    again); the batch passes through unchanged."""
    texts, platforms = batch_inputs(batch)
    keys, outputs = batch.column("refine_key").to_pylist(), batch.column("refine_output").to_pylist()
    errors = batch.column("refine_error").to_pylist()
    entries = [
        make_entry(k, t, p, settings, o or "")
        for k, t, p, o, e in zip(keys, texts, platforms, outputs, errors, strict=True)
        if not e
    ]
    if entries:
        write_shard(settings.cache_uri, entries)
    return batch


def finalize_batch(batch, settings: RefineSettings):
    """Validate every answer (cached or fresh), fall back to the rules on rejection or a failed generation,
    add the stat columns."""
    texts, platforms = batch_inputs(batch)
    outputs = batch.column("refine_output").to_pylist()
    hits = batch.column("refine_was_cached").to_pylist()
    errors = batch.column("refine_error").to_pylist()
    outcomes = [
        failed_generation(t, p, e, settings) if e else finalize(t, p, {"output": o or ""}, bool(h), settings)
        for t, p, o, h, e in zip(texts, platforms, outputs, hits, errors, strict=True)
    ]
    for image_id, o in zip(batch.column("image_id").to_pylist(), outcomes, strict=True):
        if o.error:
            log.warning("refine: generation failed for %s (rules used instead): %s", image_id, o.error)
    count_rejections(outcomes, platforms)
    return attach_outcomes(batch.drop_columns(list(_WORK_COLUMNS)), outcomes)


def refine_with_vllm(ds, settings: RefineSettings, rc, processor_factory: Callable | None = None):
    """The refine pipeline around a `ray.data.llm` processor (`processor_factory(settings, rc, keep)`, by default
    `build_vllm_processor`)."""
    import ray.data
    from ray.data.expressions import col

    cpu = {"batch_format": "pyarrow", "batch_size": rc.actors.batch_size, "num_cpus": rc.actors.num_cpus}
    looked = ds.map_batches(
        CacheLookup,
        fn_constructor_kwargs={"settings": settings},
        compute=ray.data.ActorPoolStrategy(size=rc.actors.count),
        **cpu,
    ).materialize()
    # Fractional CPUs here too: a whole-CPU filter task waits forever behind the engine's and stages' actors.
    part = {"num_cpus": rc.actors.num_cpus}
    hits = looked.filter(expr=col("refine_was_cached") == True, **part)  # noqa: E712 (an expression, not a test)
    misses = looked.filter(expr=col("refine_was_cached") == False, **part)  # noqa: E712
    rows = hits
    if misses.count():  # all cached: don't start GPU engines for nothing
        processor = (processor_factory or build_vllm_processor)(settings, rc, looked.columns())
        answers = processor(misses).map(partial(vllm_outcome, keep=looked.columns()), **part)
        fresh = answers.map_batches(write_cache_batch, fn_kwargs={"settings": settings}, **cpu)
        rows = hits.union(fresh)
    return rows.map_batches(finalize_batch, fn_kwargs={"settings": settings}, **cpu)
