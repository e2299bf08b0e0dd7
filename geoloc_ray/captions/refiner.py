"""Per-batch refinement: cache lookup, compute the misses, write a cache shard, guard LLM output.

`RowRefiner` is plain Python (tests need no Ray); `Refiner` wraps it as the `map_batches` callable class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from geoloc_ray import artifacts
from geoloc_ray.captions.cache import RefineCache, cache_key
from geoloc_ray.captions.prompts import build_messages, parse_output, prompt_template
from geoloc_ray.captions.rules import DROP_REASONS, refine_rules
from geoloc_ray.captions.validate import validate_output
from geoloc_ray.captions.vocabulary import Vocabulary, load_vocabulary
from geoloc_ray.preprocess.text import directional_phrases

# Per-row bookkeeping columns added by the refiner; the stage sums them into the summary, then drops them.
STAT_COLUMNS: tuple[str, ...] = (
    "refine_source",
    "refine_cache_hit",
    "refine_rejection",
    "refine_n_in",
    "refine_n_out",
    "refine_error",
    *(f"refine_drop_{r}" for r in DROP_REASONS),
)
_SOURCE_OF_STATUS = {"ok": "rules", "original": "original", "empty": "empty"}


@dataclass(frozen=True)
class RefineSettings:
    """Everything a refiner worker needs, picklable (shipped to actors through `fn_constructor_kwargs`)."""

    backend: str
    vocabulary: Vocabulary
    cache_uri: str
    prompt_version: str = "v1"
    model: str | None = None
    max_new_tokens: int = 64
    max_output_words: int = 40
    max_statements: int = 12  # per prompt (refine.max_statements_per_prompt)
    batch_size: int = 64
    num_gpus: float = 0.0
    device: str = "auto"  # the config's root `device`, resolved in the actor (geoloc_ray.devices)
    storage_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def prompt_words(self) -> int:
        return min(20, self.max_output_words)

    @property
    def prompt_id(self) -> str:
        """The prompt part of the cache key (the vocabulary shapes prompts and rules alike)."""
        fp = self.vocabulary.fingerprint()
        if self.backend == "rules":
            return f"rules:{fp}"
        return f"{self.prompt_version}:{fp}:w{self.prompt_words}:s{self.max_statements}"

    def split_statements(self, texts: list[str]) -> tuple[list[str], list[str]]:
        """(what the prompt holds, what the rules refine). A long row's extra statements are not split into more
        prompts: one row stays one prompt, one answer and one cache entry, with no regrouping after the engine;
        they are not dropped either (a bare truncation would lose them whenever the answer is accepted)."""
        return list(texts[: self.max_statements]), list(texts[self.max_statements :])

    @property
    def model_id(self) -> str:
        if self.backend == "rules":
            return "rules"
        return f"{self.backend}:{self.model}:greedy:{self.max_new_tokens}"


def settings_from_config(cfg) -> RefineSettings:
    """RefineSettings from a `geoloc_ray.config.Config` (the vLLM backend's model is `refine.vllm.model`)."""
    from geoloc_ray import io

    rc = cfg.refine
    vocab = load_vocabulary(rc.vocabulary).with_directional(directional_phrases(cfg.preprocess))
    model = rc.vllm.model if rc.backend == "vllm" else rc.model
    if rc.backend == "transformers" and not model:
        raise ValueError("refine.backend=transformers needs refine.model (a local causal-LM folder)")
    if rc.backend != "rules":
        prompt_template(rc.prompt_version)  # fail on an unknown version before any work starts
    return RefineSettings(
        backend=rc.backend,
        vocabulary=vocab,
        cache_uri=artifacts.refine_cache(cfg),
        prompt_version=rc.prompt_version,
        model=model,
        max_new_tokens=rc.max_new_tokens,
        max_output_words=rc.max_output_words,
        max_statements=rc.max_statements_per_prompt,
        batch_size=rc.actors.batch_size,
        num_gpus=rc.actors.num_gpus,
        device=cfg.device,
        storage_options=io.storage_options(),
    )


@dataclass
class RowOutcome:
    texts: list[str]
    source: str  # llm | rules | original | empty
    cache_hit: bool
    rejection: str = ""
    dropped: dict[str, int] = field(default_factory=dict)
    error: str = ""  # the generation failed (the engine's message): the rules refined the row


def rules_entry(key: str, texts: list[str], platform: str, s: RefineSettings) -> dict[str, Any]:
    r = refine_rules(texts, platform, s.vocabulary)
    return make_entry(key, texts, platform, s, "\n".join(r.texts), {"status": r.status, "dropped": r.dropped})


def make_entry(
    key, texts, platform, s: RefineSettings, output: str, meta: dict | None = None
) -> dict[str, Any]:
    return {
        "key": key,
        "texts": list(texts),
        "platform": platform,
        "prompt": s.prompt_id,
        "model": s.model_id,
        "output": output,
        "meta": meta or {},
    }


def finalize(
    texts: list[str], platform: str, entry: dict[str, Any], hit: bool, s: RefineSettings
) -> RowOutcome:
    """Turn a cache entry into the row's refined texts; LLM output is validated, a rejection falls back."""
    if s.backend == "rules":
        meta = entry.get("meta", {})
        out = [t for t in entry["output"].split("\n") if t]
        return RowOutcome(
            out, _SOURCE_OF_STATUS[meta.get("status", "ok")], hit, "", dict(meta.get("dropped", {}))
        )
    prompted, rest = s.split_statements(texts)
    parsed = parse_output(entry["output"])
    reason = validate_output(parsed, prompted, s.vocabulary, s.max_output_words)
    if reason is None:
        r = refine_rules(rest, platform, s.vocabulary) if rest else None
        return RowOutcome(parsed + (r.texts if r else []), "llm", hit, "", dict(r.dropped) if r else {})
    r = refine_rules(texts, platform, s.vocabulary)
    return RowOutcome(r.texts, _SOURCE_OF_STATUS[r.status], hit, reason, r.dropped)


def failed_generation(texts: list[str], platform: str, error: str, s: RefineSettings) -> RowOutcome:
    """A row whose generation failed: the rules refine it, and the error is kept for the summary."""
    r = refine_rules(texts, platform, s.vocabulary)
    return RowOutcome(r.texts, _SOURCE_OF_STATUS[r.status], False, "", r.dropped, error or "unknown error")


class RowRefiner:
    """Refines lists of statements; `generate` maps chat conversations to answers (None for rules)."""

    def __init__(self, settings: RefineSettings, generate=None):
        if settings.backend != "rules" and generate is None:
            raise ValueError(f"backend {settings.backend!r} needs a generator")
        self.s = settings
        self.generate = generate
        self.cache = RefineCache(settings.cache_uri)
        self.cache.load()

    def refine(self, texts_list: list[list[str]], platforms: list[str]) -> list[RowOutcome]:
        keys = [
            cache_key(t, p, self.s.prompt_id, self.s.model_id)
            for t, p in zip(texts_list, platforms, strict=True)
        ]
        hits = [self.cache.get(k) is not None for k in keys]
        todo: dict[str, int] = {}  # each missing key computed once, even if repeated in the batch
        for i, k in enumerate(keys):
            if not hits[i]:
                todo.setdefault(k, i)
        if todo:
            self._compute([(k, texts_list[i], platforms[i]) for k, i in todo.items()])
            self.cache.flush()  # one new shard per batch: a killed job loses only its in-flight batch
        return [
            finalize(t, p, self.cache.get(k), h, self.s)
            for t, p, k, h in zip(texts_list, platforms, keys, hits, strict=True)
        ]

    def _compute(self, rows: list[tuple[str, list[str], str]]) -> None:
        if self.s.backend == "rules":
            for key, texts, platform in rows:
                self.cache.put(rules_entry(key, texts, platform, self.s))
            return
        conversations = [
            build_messages(
                self.s.split_statements(t)[0], p, self.s.vocabulary, self.s.prompt_version, self.s.prompt_words
            )
            for _, t, p in rows
        ]
        for (key, texts, platform), answer in zip(rows, self.generate(conversations), strict=True):
            self.cache.put(make_entry(key, texts, platform, self.s, answer))


def attach_outcomes(batch, outcomes: list[RowOutcome]):
    """The batch (pyarrow) with `texts` refined, `texts_original` kept, and the stat columns added."""
    import pyarrow as pa

    strings = pa.list_(pa.string())
    cols = {
        "texts": pa.array([o.texts for o in outcomes], strings),
        "texts_original": pa.array(batch.column("texts").to_pylist(), strings),
        "refine_source": pa.array([o.source for o in outcomes], pa.string()),
        "refine_cache_hit": pa.array([o.cache_hit for o in outcomes], pa.bool_()),
        "refine_rejection": pa.array([o.rejection for o in outcomes], pa.string()),
        "refine_n_in": pa.array([len(t or []) for t in batch.column("texts").to_pylist()], pa.int64()),
        "refine_n_out": pa.array([len(o.texts) for o in outcomes], pa.int64()),
        "refine_error": pa.array([o.error for o in outcomes], pa.string()),
        **{
            f"refine_drop_{r}": pa.array([o.dropped.get(r, 0) for o in outcomes], pa.int64())
            for r in DROP_REASONS
        },
    }
    out = batch.drop_columns([c for c in cols if c in batch.column_names])
    for name, arr in cols.items():
        out = out.append_column(name, arr)
    return out


_REJECTIONS = None  # this process's Prometheus counter (created on first use: Ray must be up)


def count_rejections(outcomes: list[RowOutcome], platforms: list[str]) -> None:
    """geoloc_refine_rejections_total{reason, platform}: LLM outputs the validator refused (docs/grafana)."""
    global _REJECTIONS
    if _REJECTIONS is None:
        from ray.util.metrics import Counter

        _REJECTIONS = Counter("geoloc_refine_rejections_total", tag_keys=("reason", "platform"),
                              description="refined captions rejected by validation (the original was kept)")
    for outcome, platform in zip(outcomes, platforms, strict=True):
        if outcome.rejection:
            _REJECTIONS.inc(tags={"reason": outcome.rejection, "platform": platform})


def batch_inputs(batch) -> tuple[list[list[str]], list[str]]:
    return [list(t or []) for t in batch.column("texts").to_pylist()], batch.column("platform").to_pylist()


class Refiner:
    """`map_batches` callable class (pyarrow batches): one per actor, model and cache loaded once."""

    def __init__(self, settings: RefineSettings):
        from geoloc_ray import io

        for proto, opts in settings.storage_options.items():  # actors don't inherit the driver's I/O options
            io.set_storage_options(proto, opts)
        generate = None
        if settings.backend == "transformers":
            from geoloc_ray.captions.hf import TransformersGenerator

            gen = TransformersGenerator(
                settings.model, settings.max_new_tokens, settings.batch_size, settings.device
            )
            generate = gen.generate
        elif settings.backend != "rules":
            raise ValueError(
                f"backend {settings.backend!r} does not run in the actor pool (vllm has its own stage)"
            )
        self.core = RowRefiner(settings, generate)

    def __call__(self, batch):
        texts, platforms = batch_inputs(batch)
        outcomes = self.core.refine(texts, platforms)
        count_rejections(outcomes, platforms)
        return attach_outcomes(batch, outcomes)
