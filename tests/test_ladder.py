"""The multi-seed ladder without training: interval arithmetic on fixed inputs, and the aggregation of
synthetic per-query files into means, intervals, paired differences and claims."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from geoloc_ray.eval.intervals import Interval, bootstrap_interval, interval, t_interval

T_975_DF2 = 4.302652729749464  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


def test_bootstrap_is_deterministic_for_a_fixed_rng():
    rng = np.random.default_rng(5)
    per_seed = [rng.integers(0, 2, 40) * 100.0, rng.integers(0, 2, 55) * 100.0, rng.integers(0, 2, 30) * 100.0]
    first = bootstrap_interval(per_seed, 500, 0.95, np.random.default_rng(3))
    assert first == bootstrap_interval(per_seed, 500, 0.95, np.random.default_rng(3))
    assert first.mean == pytest.approx(np.mean([v.mean() for v in per_seed]))
    assert first.low < first.mean < first.high


def test_bootstrap_resamples_seeds_as_well_as_queries():
    """Constant queries within a seed: only the seed draw varies. Two seeds at 10 and 20 give resample means
    10, 15 or 20 with probabilities 1/4, 1/2, 1/4, so the 95% percentile interval is exactly [10, 20]."""
    per_seed = [np.full(7, 10.0), np.full(9, 20.0)]
    assert bootstrap_interval(per_seed, 2000, 0.95, np.random.default_rng(0)) == Interval(15.0, 10.0, 20.0)
    assert bootstrap_interval([np.full(5, 3.0)], 200) == Interval(3.0, 3.0, 3.0)
    with pytest.raises(ValueError, match="at least one query"):
        bootstrap_interval([np.zeros(3), np.zeros(0)])


def test_paired_t_interval_matches_a_hand_computation():
    # per-query differences of two variants; the seeds' mean differences are 1, 2 and 4
    per_seed = [np.array([0.0, 2.0]), np.array([2.0, 2.0, 2.0]), np.array([8.0, 0.0, 4.0, 4.0])]
    mean = 7 / 3
    sd = math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2)
    half = T_975_DF2 * sd / math.sqrt(3)
    got = t_interval(per_seed, 0.95)
    assert (got.mean, got.low, got.high) == pytest.approx((mean, mean - half, mean + half), rel=1e-12)
    assert interval(per_seed, "t") == got and got.excludes(0.0) is False  # half = 3.79 > 2.33
    with pytest.raises(ValueError, match="two seeds"):
        t_interval(per_seed[:1])


def _frame(rng: np.random.Generator, n: int, rates: dict[str, tuple[float, float]]):
    """A per_query.parquet table: per variant, hit@1 with probability p1 and hit@10 with p10 (>= hit@1)."""
    import pandas as pd

    from geoloc_ray.eval.metrics import hit_column

    table = pd.DataFrame({"query_id": [f"q{i:06d}" for i in range(n)], "platform": ["drone"] * n})
    u = rng.random(n)  # one difficulty per query, shared by the variants: their hits are paired
    for name, (p1, p10) in rates.items():
        table[hit_column(name, 1)], table[hit_column(name, 10)] = u < p1, u < p10
    return table


RATES = {"unified": (0.2, 0.5), "aligned": (0.3, 0.6), "static_ensemble": (0.35, 0.65), "moe": (0.4, 0.7),
         "oracle_gate": (0.5, 0.8), "oracle_mix": (0.55, 0.85), "platform_gate": (0.38, 0.7),
         "expert_drone": (0.3, 0.6),
         "moe_places": (0.4, 0.75)}


def test_summary_means_intervals_and_paired_differences():
    from geoloc_ray.config import Config
    from geoloc_ray.ladder import COMPARISONS, summarize

    rng = np.random.default_rng(0)
    frames = {s: _frame(rng, 200 + 10 * s, RATES) for s in (0, 1, 2)}
    frames[2] = frames[2].drop(columns=["expert_drone:hit@1"])  # missing in one seed: left out
    summary = summarize(frames, Config())
    assert list(summary["variants"]) == ["unified", "aligned", "static_ensemble", "moe", "moe_places", "oracle_gate",
                                         "oracle_mix", "platform_gate"]
    for name, stats in summary["variants"].items():
        r1 = [100 * frames[s][f"{name}:hit@1"].mean() for s in (0, 1, 2)]
        r10 = [100 * frames[s][f"{name}:hit@10"].mean() for s in (0, 1, 2)]
        assert stats["R@1"]["mean"] == pytest.approx(np.mean(r1), abs=1e-4)
        assert stats["score"]["mean"] == pytest.approx((np.mean(r1) + np.mean(r10)) / 2, abs=1e-4)
        assert stats["per_seed"]["1"]["R@10"] == pytest.approx(r10[1], abs=1e-4)
        assert stats["R@1"]["low"] <= stats["R@1"]["mean"] <= stats["R@1"]["high"]
    assert [(d["from"], d["to"]) for d in summary["differences"]] == COMPARISONS
    gain = summary["differences"][0]  # aligned - unified: +10 R@1 on every query band, same queries
    assert gain["R@1"]["mean"] == pytest.approx(summary["variants"]["aligned"]["R@1"]["mean"]
                                                - summary["variants"]["unified"]["R@1"]["mean"], abs=1e-3)
    assert gain["significant"]["R@1"] and gain["R@1"]["low"] > 0
    assert "paired bootstrap over queries within each seed, then over seeds" in summary["method"]
    assert {c["claim"] for c in summary["claims"]} == {"moe >= static_ensemble + 2", "static_ensemble >= aligned + 2",
                                                       "moe within 2 points of oracle_gate"}
    assert summarize(frames, Config()) == summary  # fixed bootstrap seed: the same report twice
    t = summarize(frames, Config(ladder={"interval": "t"}))
    assert t["method"].startswith("paired t-interval") and t["variants"]["moe"]["score"]["mean"] == pytest.approx(
        summary["variants"]["moe"]["score"]["mean"])


def test_claims_are_judged_on_the_whole_interval():
    from geoloc_ray.ladder import claims

    def diff(a, b, mean, low, high):
        return {"from": a, "to": b, "score": {"mean": mean, "low": low, "high": high}}

    verdicts = {c["claim"]: (c["verdict"], c["on_mean"]) for c in claims([
        diff("static_ensemble", "moe", 3.0, 2.5, 3.5), diff("aligned", "static_ensemble", 2.5, 1.0, 4.0),
        diff("moe", "oracle_gate", 4.0, 3.0, 5.0)])}
    assert verdicts == {"moe >= static_ensemble + 2": ("holds", True),
                        "static_ensemble >= aligned + 2": ("undecided", True),
                        "moe within 2 points of oracle_gate": ("fails", False)}


def test_seed_runs_live_under_the_ladder_folder_and_worlds_only_vary_when_asked(tmp_path):
    from geoloc_ray.config import Config
    from geoloc_ray.ladder import seed_config

    cfg = Config(artifacts=str(tmp_path / "artifacts" / "demo"), data={"root": str(tmp_path / "world")},
                 eval={"variants": ["moe"]})
    world = seed_config(cfg, 4)
    assert world.artifacts == str(tmp_path / "artifacts" / "ladder" / "seed-4")
    assert (world.seed, world.synth.seed, world.data.root) == (4, 4, str(tmp_path / "world") + "-seed-4")
    assert world.eval.variants == ["moe", "unified", "aligned", "static_ensemble", "oracle_gate", "oracle_mix",
                                   "platform_gate"]
    same = seed_config(cfg.model_copy(update={"ladder": cfg.ladder.model_copy(update={"vary": "training"})}), 4)
    assert (same.seed, same.synth.seed, same.data.root) == (4, cfg.synth.seed, cfg.data.root)


def test_ladder_dir_sits_beside_the_run():
    from geoloc_ray import artifacts

    assert artifacts.ladder_dir("s3://bucket/runs/prod", "ladder") == "s3://bucket/runs/ladder"
    assert artifacts.ladder_dir("s3://bucket", "ladder") == "s3://bucket/ladder"
    assert artifacts.ladder_dir("/a/artifacts/demo/", "x") == "/a/artifacts/x"


def test_run_ladder_aggregates_each_seeds_per_query_file(tmp_path, monkeypatch):
    """Training is stubbed: run_pipeline and ensure_world are recorded, the per-query files are synthetic."""
    from geoloc_ray import artifacts, io, ladder, pipeline
    from geoloc_ray.cli import build_parser
    from geoloc_ray.config import Config

    cfg = Config(artifacts=str(tmp_path / "artifacts" / "demo"), data={"root": str(tmp_path / "world")},
                 ladder={"resamples": 200})
    calls = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda run: calls.append(("pipeline", run.seed)))
    monkeypatch.setattr(pipeline, "ensure_world", lambda run, loc, seed: calls.append(("world", run.data.root)))
    rng = np.random.default_rng(1)
    for seed in (1, 2):
        io.write_parquet(artifacts.per_query(ladder.seed_config(cfg, seed)), _frame(rng, 80, RATES))
    text = ladder.run_ladder(cfg, build_parser().parse_args(["ladder", "--seeds", "1,2"]).seeds)
    assert calls == [("world", str(tmp_path / "world-seed-1")), ("pipeline", 1),
                     ("world", str(tmp_path / "world-seed-2")), ("pipeline", 2)]
    out = tmp_path / "artifacts" / "ladder"
    saved = json.loads((out / "ladder.json").read_text())
    assert saved["seeds"] == [1, 2] and saved["runs"]["2"] == str(out / "seed-2")
    assert (out / "ladder.md").read_text() == text and (out / "ladder.png").stat().st_size > 0
    assert "| static_ensemble - aligned |" in text and "## Claims (Score)" in text
    calls.clear()  # --aggregate-only: the runs as they are, nothing trained, the same report
    args = build_parser().parse_args(["ladder", "--seeds", "2,1", "--aggregate-only"])
    assert ladder.run_ladder(cfg, args.seeds, train=not args.aggregate_only) == text
    assert calls == []


def test_a_ladder_is_compared_with_a_baseline_ladder_query_by_query(tmp_path, monkeypatch):
    """Two ladders on the same worlds: the second reports each variant minus the first's, paired by what each
    query is (image + text): the baseline's rows are shuffled and renumbered, as two runs of one world may
    number their queries differently."""
    from geoloc_ray import artifacts, io, ladder, pipeline
    from geoloc_ray.config import Config

    monkeypatch.setattr(pipeline, "run_pipeline", lambda run: None)
    monkeypatch.setattr(pipeline, "ensure_world", lambda run, loc, seed: None)
    base_cfg = Config(artifacts=str(tmp_path / "artifacts" / "demo"), ladder={"resamples": 200, "name": "base"})
    new_cfg = base_cfg.model_copy(update={"ladder": base_cfg.ladder.model_copy(
        update={"name": "new", "baseline": "base"})})
    better = {**RATES, "moe": (0.5, 0.8)}  # +10 R@1 and R@10 on moe, the rest unchanged
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        frame = _frame(rng, 90, RATES).assign(image_id=[f"{i % 45:04d}.jpg" for i in range(90)],
                                              query=[f"text {i}" for i in range(90)])
        shuffled = frame.sample(frac=1, random_state=0).assign(query_id=frame["query_id"].to_numpy())
        io.write_parquet(artifacts.per_query(ladder.seed_config(base_cfg, seed)), shuffled)
        io.write_parquet(artifacts.per_query(ladder.seed_config(new_cfg, seed)),
                         _frame(np.random.default_rng(seed), 90, better).assign(image_id=frame["image_id"],
                                                                                  query=frame["query"]))
    with pytest.raises(Exception, match="not found"):
        ladder.run_ladder(new_cfg, [1, 2])  # the baseline ladder has not run yet
    ladder.run_ladder(base_cfg, [1, 2])
    text = ladder.run_ladder(new_cfg, [1, 2])
    diff = json.loads((tmp_path / "artifacts" / "new" / "ladder.json").read_text())["baseline"]["variants"]
    assert diff["aligned"]["score"] == {"mean": 0.0, "low": 0.0, "high": 0.0}  # the same hits, query by query
    assert diff["moe"]["R@1"]["mean"] == pytest.approx(10.0, abs=3.5) and diff["moe"]["R@1"]["low"] > 0
    assert "## Against the baseline ladder" in text and "| moe | +" in text
    with pytest.raises(ValueError, match="no run for seeds \\[3\\]"):
        ladder.baseline_frames(new_cfg, [1, 3])


def test_each_expert_is_compared_with_aligned_on_its_own_platforms_queries_only():
    from geoloc_ray.config import Config
    from geoloc_ray.ladder import summarize

    rng = np.random.default_rng(2)
    frames = {}
    for s in (0, 1):
        drone = _frame(rng, 60, {"aligned": (0.3, 0.6), "moe": (0.3, 0.6), "expert_drone": (0.4, 0.7),
                                 "expert_ground": (0.0, 0.0)})
        ground = _frame(rng, 30, {"aligned": (0.3, 0.6), "moe": (0.2, 0.5), "expert_drone": (0.4, 0.7),
                                  "expert_ground": (0.3, 0.6)}).assign(platform="ground")
        frames[s] = pd.concat([drone, ground], ignore_index=True)
    experts = summarize(frames, Config(ladder={"resamples": 200}))["experts"]
    assert set(experts) == {"drone", "ground"}  # expert_ground's zero hits on drone queries do not count
    assert experts["drone"]["expert_drone"]["mean"] == pytest.approx(10.0, abs=4)
    assert experts["drone"]["moe"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    assert experts["ground"]["expert_ground"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    assert experts["ground"]["moe"]["mean"] < 0 and experts["drone"]["queries"] == {"0": 60, "1": 60}


def test_the_plans_rule_picks_arms_as_written():
    import importlib.util

    from tests.ray_cluster import REPO

    spec = importlib.util.spec_from_file_location("ladder_arms", REPO / "bench" / "ladder_arms.py")
    arms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arms)

    def row(name, m, d):
        return {"arm": name, "m": m, "d": d}

    # rule 1: the candidate with the highest moe Score; rule 3: within 0.25 of it, fewer changes wins
    assert arms.choose([row("A", 30, -1), row("B", 31, 0.5), row("C", 32, 0.2)], [0, 1, 2])[0] == "C"
    assert arms.choose([row("A", 30, -1), row("B", 31.9, 0.5), row("C", 32, 0.2)], [0, 1, 2])[0] == "B"
    # rule 2: no candidate: the highest d unless it costs more than 0.5 of A's moe Score
    assert arms.choose([row("A", 30, -1.0), row("B", 29.8, -0.2)], [0, 1])[0] == "B"
    assert arms.choose([row("A", 30, -1.0), row("B", 29.0, -0.2)], [0, 1])[0] == "A"
