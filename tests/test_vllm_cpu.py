"""The vLLM refine backend: the processor config (bundles per device, runtime_env on the engine stage only, per-row
errors), a failed row reported and never fatal, and the real engine (vLLM built for CPUs, .venv-vllm) on a tiny LM."""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import pytest

from geoloc_ray import io
from geoloc_ray.config import config_from_dict

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
STATEMENTS = [
    "The building has a red gabled roof.",
    "Its facade is cream with many small windows.",
    "There is a lake next to it.",
    "A parking lot with cars is nearby.",
]
ROWS = [
    ("0001/0001.jpg", "satellite", STATEMENTS),
    ("0001/image-01.jpeg", "drone", STATEMENTS),
    ("0001/ground-1.jpg", "ground", STATEMENTS),
    ("0002/0002.jpg", "satellite", STATEMENTS[1:]),
    ("0002/ground-1.jpg", "ground", STATEMENTS[:2]),
]
BAD = "0002/image-01.jpeg"  # the row whose generation fails


def write_prepared(artifacts: Path, rows) -> None:
    """prepared/train.parquet as the prepare stage writes it (a folder of parquet parts)."""
    import pandas as pd

    df = pd.DataFrame(
        [{"image_id": i, "image_uri": f"images/train/{i}", "platform": p, "location_id": i.split("/")[0],
          "split": "train", "texts": list(t)} for i, p, t in rows]
    )
    folder = artifacts / "prepared" / "train.parquet"
    folder.mkdir(parents=True)
    df.to_parquet(folder / "part-0.parquet")


def _cfg(artifacts, device: str = "cpu", **vllm):
    return config_from_dict({
        "artifacts": str(artifacts),
        "device": device,
        "refine": {"backend": "vllm", "actors": {"batch_size": 4, "num_cpus": 0.25}, "vllm": vllm},
    })


# --- the processor config (pure: no Ray, no vLLM) -------------------------------------------------------------


@pytest.mark.parametrize("device, bundle", [("cpu", {"CPU": 1}), ("auto", {"GPU": 1, "CPU": 1}),
                                            ("cuda", {"GPU": 1, "CPU": 1})])
def test_engine_bundles_follow_the_device(tmp_path, device, bundle):
    from geoloc_ray.captions.vllm_backend import vllm_processor_config

    cfg = _cfg(tmp_path, device, tensor_parallel_size=2)
    pc = vllm_processor_config(cfg.refine, device=cfg.device)
    bundles = [{k: v for k, v in b.items() if v} for b in pc.placement_group_config["bundles"]]
    assert bundles == [bundle, bundle] and pc.engine_kwargs["tensor_parallel_size"] == 2
    assert pc.should_continue_on_error


def test_vllm_runtime_env_reaches_the_engine_stage_only(tmp_path):
    """Ray 2.60 gives the processor's runtime_env to every stage whose own config leaves it None; ours set {}."""
    from ray.llm._internal.batch.processor.utils import build_cpu_stage_map_kwargs
    from ray.llm._internal.batch.stages.configs import (
        ChatTemplateStageConfig,
        DetokenizeStageConfig,
        TokenizerStageConfig,
        resolve_stage_config,
    )

    from geoloc_ray.captions.vllm_backend import vllm_processor_config

    env = {"pip": ["vllm==0.29.0"]}
    pc = vllm_processor_config(_cfg(tmp_path, runtime_env=env).refine)
    assert pc.runtime_env == env  # what build_processor hands the engine stage
    defaults = {"runtime_env": pc.runtime_env, "batch_size": pc.batch_size, "concurrency": pc.concurrency}
    for value, cls in [(pc.chat_template_stage, ChatTemplateStageConfig), (pc.tokenize_stage, TokenizerStageConfig),
                       (pc.detokenize_stage, DetokenizeStageConfig)]:
        kwargs = build_cpu_stage_map_kwargs(resolve_stage_config(value, cls, defaults))
        assert kwargs["runtime_env"] == {} and kwargs["num_cpus"] == 0.25  # the job's env, a fraction of a CPU


@pytest.mark.ray
def test_built_processor_scopes_the_env_and_resources(ray_session, tmp_path):
    """The processor as `build_processor` makes it: each stage's Ray arguments."""
    from geoloc_ray.captions.refiner import settings_from_config
    from geoloc_ray.captions.tiny_llm import make_tiny_llm
    from geoloc_ray.captions.vllm_backend import build_vllm_processor

    env = {"py_executable": "/somewhere/bin/python"}
    cfg = _cfg(tmp_path, model=make_tiny_llm(tmp_path / "lm"), runtime_env=env)
    proc = build_vllm_processor(settings_from_config(cfg), cfg.refine, ["image_id"])
    stages = {type(st).__name__: st.map_batches_kwargs for st in proc.stages.values()}
    assert list(stages) == ["ChatTemplateStage", "TokenizeStage", "vLLMEngineStage", "DetokenizeStage"]
    engine = stages.pop("vLLMEngineStage")
    assert engine["runtime_env"] == env and engine["num_cpus"] == 1 and "num_gpus" not in engine
    assert all(kw["runtime_env"] == {} and kw["num_cpus"] == 0.25 for kw in stages.values())
    gpu = _cfg(tmp_path, "auto", model=cfg.refine.vllm.model, runtime_env=env)
    proc = build_vllm_processor(settings_from_config(gpu), gpu.refine, ["image_id"])
    engine = proc.get_stage_by_name("vLLMEngineStage").map_batches_kwargs
    assert (engine["num_gpus"], engine["num_cpus"]) == (1, 1)


def test_relative_py_executable_is_taken_from_the_checkout(tmp_path):
    from geoloc_ray.captions.vllm_backend import CHECKOUT, engine_runtime_env

    env = {"py_executable": ".venv-vllm/bin/python", "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}}
    assert engine_runtime_env(env) == {**env, "py_executable": str(CHECKOUT / ".venv-vllm/bin/python")}
    assert (CHECKOUT / "Makefile").exists()
    for kept in ({"pip": ["vllm==0.29.0"]}, {"py_executable": "/opt/v/bin/python"},
                 {"py_executable": "uv run --python 3.11"}, {"py_executable": "python3"}):
        assert engine_runtime_env(kept) == kept


def test_long_rows_prompt_their_first_statements_and_keep_the_rest(tmp_path):
    from geoloc_ray.captions.refiner import finalize, settings_from_config
    from geoloc_ray.captions.rules import refine_rules
    from geoloc_ray.captions.vllm_backend import vllm_preprocess

    s = settings_from_config(config_from_dict({"artifacts": str(tmp_path), "refine": {
        "backend": "vllm", "max_statements_per_prompt": 2}}))
    row = vllm_preprocess({"image_id": "a", "platform": "satellite", "texts": STATEMENTS}, s)
    prompt = row["messages"][-1]["content"]
    assert "red gabled roof" in prompt and "cream" in prompt and "lake" not in prompt
    out = finalize(STATEMENTS, "satellite", {"output": "- A red gabled roof"}, False, s)
    rest = refine_rules(STATEMENTS[2:], "satellite", s.vocabulary).texts
    assert out.source == "llm" and out.texts == ["A red gabled roof", *rest] and rest
    assert s.prompt_id.endswith(":s2")  # the cap shapes the prompt: part of the cache key


# --- a failed row is reported, never fatal (a stand-in engine, real Ray) --------------------------------------


def stand_in_processor(settings, rc, keep, fail: str = BAD):
    """`build_vllm_processor`'s shape with the engine replaced: the row `fail` comes back as Ray's engine stage
    returns a row it could not generate (`__inference_error__`, past postprocess through Ray's own wrapper)."""
    from ray.llm._internal.batch.stages import wrap_postprocess

    from geoloc_ray.captions.vllm_backend import vllm_postprocess, vllm_preprocess

    calls.append(keep)
    wrapped = wrap_postprocess(partial(vllm_postprocess, keep=keep), "__data", include_error_column=True)

    def engine(row):
        if row["image_id"] == fail:
            return {**row, "__inference_error__": "ValueError: the prompt is longer than max_model_len"}
        return {**row, "generated_text": "- A red gabled roof\n- A lake nearby", "__inference_error__": ""}

    return lambda ds: (ds.map(partial(vllm_preprocess, settings=settings)).map(engine)
                       .map(lambda row: wrapped({"__data": row})))


calls: list = []


@pytest.mark.ray
def test_a_failed_row_is_counted_and_rules_refined(ray_session, tmp_path, monkeypatch):
    from geoloc_ray.captions import run_refine
    from geoloc_ray.captions import vllm_backend as vb
    from geoloc_ray.captions.refiner import settings_from_config
    from geoloc_ray.captions.rules import refine_rules

    monkeypatch.setattr(vb, "build_vllm_processor", stand_in_processor)
    calls.clear()
    rows = [*ROWS, (BAD, "drone", STATEMENTS[2:])]  # own statements: a row like another shares its cache entry
    write_prepared(tmp_path, rows)
    cfg = _cfg(tmp_path)
    summary = run_refine(cfg)
    assert (summary["rows"], summary["errors"], summary["generated"]) == (len(rows), 1, len(rows) - 1)
    assert summary["accepted"] + summary["rejected"] == summary["generated"] and summary["accepted"] > 0
    assert summary["error_rows"] == [{"image_id": BAD, "error": "ValueError: the prompt is longer than max_model_len"}]
    out = io.read_parquet(str(tmp_path / "refined" / "train.parquet")).set_index("image_id")
    vocab = settings_from_config(cfg).vocabulary
    assert list(out.loc[BAD, "texts"]) == refine_rules(STATEMENTS[2:], "drone", vocab).texts
    again = run_refine(cfg)  # the failed row was not cached: only it goes to the engine again
    assert again["cache"] == {"hits": len(rows) - 1, "misses": 1} and again["errors"] == 1
    assert len(calls) == 2


# --- the real engine: vLLM built for CPUs in .venv-vllm, a tiny local LM -----------------------------------------


@pytest.fixture
def vllm_python() -> Path:
    if not VLLM_PYTHON.exists():
        if os.environ.get("GEOLOC_REQUIRE_VLLM") == "1":
            pytest.fail(f"{VLLM_PYTHON} is missing: `make vllm-env` builds it (GEOLOC_REQUIRE_VLLM=1)")
        pytest.skip("no .venv-vllm: `make vllm-env`")
    return VLLM_PYTHON


@pytest.mark.ray
@pytest.mark.slow
def test_refine_through_real_vllm_on_the_cpu(ray_session, vllm_python, tmp_path):
    """The production code path (build_processor + vLLMEngineProcessorConfig), CPU bundles, the engine in the
    vLLM venv through `py_executable`; one prompt longer than max_model_len fails in the engine, alone."""
    from geoloc_ray.captions import run_refine
    from geoloc_ray.captions.tiny_llm import make_tiny_llm

    model = make_tiny_llm(tmp_path / "tiny-llm")
    rows = [*ROWS, (BAD, "drone", [" ".join(["a very tall building with many small windows"] * 80)])]
    write_prepared(tmp_path / "art", rows)
    cfg = _cfg(
        tmp_path / "art", model=model, max_model_len=384, enforce_eager=True, batch_size=4,
        runtime_env={"py_executable": ".venv-vllm/bin/python", "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
    )
    cfg.refine.max_new_tokens = 16
    start = time.time()
    summary = run_refine(cfg)
    print(f"real vLLM CPU refine: {time.time() - start:.1f} s, {summary}")
    assert summary["backend"] == "vllm" and summary["rows"] == len(rows)
    assert summary["generated"] == len(rows) - 1 and summary["errors"] == 1
    assert summary["accepted"] + summary["rejected"] == summary["generated"]
    assert summary["error_rows"][0]["image_id"] == BAD
