"""`geoloc-ray ladder`: the pipeline once per seed, then each variant's mean and interval over seeds and the
paired differences between consecutive rungs, so a rung's gain can be told apart from run-to-run noise.

Each seed is a full run under artifacts/<ladder.name>/seed-<n> (up-to-date stages are skipped, so a rerun only
aggregates); the intervals come from each run's eval/per_query.parquet (eval/intervals.py does the arithmetic).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config, config_from_dict
from geoloc_ray.eval.intervals import interval
from geoloc_ray.eval.metrics import hit_column
from geoloc_ray.eval.report import diagnostics, save_png, shown

METRICS = ("R@1", "R@10", "score")  # location level, in percent
# (earlier, later): each reported as later - earlier, paired on the same queries of the same seed.
COMPARISONS = [("unified", "aligned"), ("aligned", "static_ensemble"), ("static_ensemble", "moe"),
               ("moe", "oracle_gate"), ("moe", "oracle_mix"),  # how far moe is from its routing upper bounds
               ("platform_gate", "moe")]  # what the fused gate tuning adds
# The method's claims (Score): (text, earlier, later, margin, kind); "gain": later >= earlier + margin,
# "gap": later - earlier <= margin (moe within `margin` points of its routing upper bound).
CLAIMS = [("moe >= static_ensemble + 2", "static_ensemble", "moe", 2.0, "gain"),
          ("static_ensemble >= aligned + 2", "aligned", "static_ensemble", 2.0, "gain"),
          ("moe within 2 points of oracle_gate", "moe", "oracle_gate", 2.0, "gap")]


def ladder_uri(cfg: Config) -> str:
    return artifacts.ladder_dir(cfg, cfg.ladder.name)


def seed_config(cfg: Config, seed: int) -> Config:
    """Seed n's run: its own artifacts folder and training seed n; with `vary: world` also world n in its own
    data.root. Eval gets every variant the comparisons need."""
    tree = cfg.model_dump(mode="json")
    tree["seed"], tree["artifacts"] = seed, artifacts.ladder_seed_run(ladder_uri(cfg), seed)
    needed = [v for pair in COMPARISONS for v in pair]
    tree["eval"]["variants"] += [v for v in dict.fromkeys(needed) if v not in tree["eval"]["variants"]]
    if cfg.ladder.vary == "world":
        tree["data"]["root"] = f"{cfg.data.root.rstrip('/')}-seed-{seed}"
        tree["synth"]["seed"] = seed
    return config_from_dict(tree, source=f"ladder seed {seed}")


def run_ladder(cfg: Config, seeds: Sequence[int] | None = None, train: bool = True) -> str:
    """Train and evaluate every seed (reusing what is up to date), aggregate, write ladder.{md,json,png}.
    `train=False` aggregates the seed runs as they are (another interval method, a subset of seeds, runs made by
    an older version whose config hash differs); a seed with models but no per-query file is evaluated."""
    from geoloc_ray.pipeline import ensure_world, run_pipeline
    from geoloc_ray.stages import BY_NAME

    seeds = list(dict.fromkeys(seeds if seeds else cfg.ladder.seeds))
    if cfg.ladder.interval == "t" and len(seeds) < 2:
        raise ValueError("ladder.interval t needs at least two seeds (or use bootstrap)")
    frames, runs = {}, {}
    for seed in seeds:
        run = seed_config(cfg, seed)
        if train:
            if cfg.ladder.vary == "world":
                ensure_world(run, None, seed)
            run_pipeline(run)
        if not io.exists(artifacts.per_query(run)):  # an eval from before per-query files: redo eval alone
            BY_NAME["eval"].run(run)
        frames[seed], runs[str(seed)] = io.read_parquet(artifacts.per_query(run)), run.artifacts
    summary = {**summarize(frames, cfg), "runs": runs}
    if cfg.ladder.baseline:
        summary["baseline"] = against(frames, baseline_frames(cfg, seeds), cfg)
    write_ladder(ladder_uri(cfg), summary)
    return markdown(summary)


def _values(frame: Any, variant: str, metric: str, suffix: str = "") -> np.ndarray:
    """Per-query values whose mean is the metric, in percent (Score: the mean of hit@1 and hit@10)."""
    hit1, hit10 = (frame[hit_column(variant, k) + suffix].to_numpy(dtype=np.float64) for k in (1, 10))
    return 100.0 * {"R@1": hit1, "R@10": hit10, "score": (hit1 + hit10) / 2}[metric]


def method_text(cfg: Config) -> str:
    lc = cfg.ladder
    if lc.interval == "t":
        return f"paired t-interval over seed means ({100 * lc.confidence:g}%)"
    return (f"paired bootstrap over queries within each seed, then over seeds ({lc.resamples} resamples, "
            f"{100 * lc.confidence:g}% percentile interval)")


def seed_interval(cfg: Config, per_seed: list[np.ndarray]) -> dict[str, float]:
    """The configured interval of per-seed values; a fresh generator each call, so every variant and difference
    is resampled alike."""
    lc = cfg.ladder
    rng = np.random.default_rng(lc.bootstrap_seed)
    return interval(per_seed, lc.interval, lc.resamples, lc.confidence, rng).as_dict()


def excludes_zero(d: dict[str, float]) -> bool:
    return not d["low"] <= 0 <= d["high"]


def summarize(frames: dict[int, Any], cfg: Config) -> dict[str, Any]:
    """Mean and interval per variant and metric, and the paired differences of COMPARISONS, from each seed's
    per-query hits. A variant missing from any seed is left out."""
    lc = cfg.ladder
    ci = partial(seed_interval, cfg)
    columns = [c for c in next(iter(frames.values())).columns if all(c in f for f in frames.values())]
    names = [c.removesuffix(":hit@1") for c in columns if c.endswith(":hit@1") and f"{c}0" in columns]
    present = shown(names) + diagnostics(names)
    seeds = sorted(frames)
    out: dict[str, Any] = {"seeds": seeds, "vary": lc.vary, "method": method_text(cfg), "variants": {},
                           "differences": [], "queries": {str(s): len(frames[s]) for s in seeds}}
    for v in present:
        out["variants"][v] = {m: ci([_values(frames[s], v, m) for s in seeds]) for m in METRICS}
        out["variants"][v]["per_seed"] = {str(s): {m: round(float(_values(frames[s], v, m).mean()), 4)
                                                    for m in METRICS} for s in seeds}
    for earlier, later in [p for p in COMPARISONS if set(p) <= set(present)]:
        diff = {m: ci([_values(frames[s], later, m) - _values(frames[s], earlier, m) for s in seeds])
                for m in METRICS}
        out["differences"].append({"from": earlier, "to": later, **diff,
                                   "significant": {m: excludes_zero(d) for m, d in diff.items()}})
    out["claims"] = claims(out["differences"])
    out["experts"] = expert_gains(frames, present, cfg)
    return out


def expert_gains(frames: dict[int, Any], present: list[str], cfg: Config) -> dict[str, dict[str, Any]]:
    """Per query platform p: Score of expert_p alone minus `aligned` (the head it specialises from), and moe minus
    aligned, on p's queries only, paired: does each expert beat its starting point where it is meant to?"""
    out = {}
    for expert in [v for v in present if v.startswith("expert_") and "aligned" in present]:
        platform = expert.removeprefix("expert_")
        mine = {s: frames[s][frames[s]["platform"] == platform] for s in sorted(frames)}
        if any(len(f) == 0 for f in mine.values()):
            continue
        out[platform] = {later: seed_interval(cfg, [_values(f, later, "score") - _values(f, "aligned", "score")
                                                    for f in mine.values()])
                         for later in (expert, "moe") if later in present}
        out[platform]["queries"] = {str(s): len(f) for s, f in mine.items()}
    return out


def baseline_frames(cfg: Config, seeds: Sequence[int]) -> dict[str, Any]:
    """The baseline ladder's per-query files for `seeds` (from its ladder.json), and where it is."""
    name = cfg.ladder.baseline
    uri = name if "/" in name else artifacts.ladder_dir(cfg, name)
    base = io.read_json(artifacts.require(artifacts.ladder_json(uri), f"ladder (--set ladder.name={name})"))
    missing = [s for s in seeds if str(s) not in base["runs"]]
    if missing:
        raise ValueError(f"baseline ladder {uri} has no run for seeds {missing} (it ran {sorted(base['runs'])})")
    return {"uri": uri, "frames": {s: io.read_parquet(artifacts.per_query(base["runs"][str(s)])) for s in seeds}}


def query_keys(frame: Any, columns: Sequence[str]) -> Any:
    """What a query is, whatever its row: its image and text (`columns`; files of older runs lack the text), and
    which occurrence of that it is. Row order, and so query_id, may differ between two runs of one world."""
    key = frame[columns].astype(str).agg("\x1f".join, axis=1)
    return key + "\x1f" + key.groupby(key).cumcount().astype(str)


def against(frames: dict[int, Any], baseline: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """Each variant's paired difference, this ladder - the baseline, per metric: the same seeds' queries joined
    on what they are (`query_keys`; the same worlds, so the same queries; one missing on either side: error)."""
    base, out = baseline["frames"], {"uri": baseline["uri"], "variants": {}}
    columns = [c for c in ("image_id", "query") if all(c in f for f in [*frames.values(), *base.values()])]
    mine, theirs = ({s: f.assign(query_key=query_keys(f, columns)) for s, f in fr.items()} for fr in (frames, base))
    for seed in frames:
        if set(mine[seed]["query_key"]) != set(theirs[seed]["query_key"]):
            raise ValueError(f"seed {seed}: the baseline's queries differ from this ladder's (another world?)")
    joined = {s: mine[s].merge(theirs[s], on="query_key", suffixes=("", ".base")) for s in sorted(frames)}
    names = [c.removesuffix(":hit@1") for c in next(iter(joined.values())).columns
             if c.endswith(":hit@1") and all(f"{c}.base" in j for j in joined.values())]
    for v in shown(names) + diagnostics(names):
        out["variants"][v] = {m: seed_interval(cfg, [_values(j, v, m) - _values(j, v, m, ".base")
                                                     for j in joined.values()]) for m in METRICS}
    return out


def claims(differences: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CLAIMS judged on the Score difference: "holds"/"fails" when the whole interval is on one side of the
    margin, else "undecided"; `on_mean` says which side the mean is on."""
    by_pair = {(d["from"], d["to"]): d["score"] for d in differences}
    out = []
    for text, earlier, later, margin, kind in CLAIMS:
        d = by_pair.get((earlier, later))
        if d is None:
            continue
        sign = 1.0 if kind == "gain" else -1.0  # gap: the claim is later - earlier <= margin
        low, high = sorted((sign * (d["low"] - margin), sign * (d["high"] - margin)))
        verdict = "holds" if low >= 0 else "fails" if high < 0 else "undecided"
        out.append({"claim": text, "difference": d, "verdict": verdict,
                    "on_mean": bool(sign * (d["mean"] - margin) >= 0)})
    return out


def _cell(d: dict[str, float], signed: bool = False) -> str:
    fmt = "{:+.2f}" if signed else "{:.2f}"
    return f"{fmt.format(d['mean'])} [{fmt.format(d['low'])}, {fmt.format(d['high'])}]"


def markdown(summary: dict[str, Any]) -> str:
    seeds = ", ".join(map(str, summary["seeds"]))
    lines = [f"# Ladder over seeds {seeds} (seeds vary: {summary['vary']})", "",
             f"Location level, percent; mean [interval]. Intervals: {summary['method']}.", "",
             "| variant | R@1 | R@10 | Score | Score per seed |", "|---|---:|---:|---:|---|"]
    for v, s in summary["variants"].items():
        per_seed = ", ".join(f"{p['score']:.1f}" for p in s["per_seed"].values())
        lines.append(f"| {v} | " + " | ".join(_cell(s[m]) for m in METRICS) + f" | {per_seed} |")
    lines += ["", "## Paired differences (later - earlier, same queries)", "",
              "| comparison | R@1 | R@10 | Score | Score interval excludes 0 |", "|---|---:|---:|---:|---|"]
    for d in summary["differences"]:
        lines.append(f"| {d['to']} - {d['from']} | " + " | ".join(_cell(d[m], signed=True) for m in METRICS)
                     + f" | {'yes' if d['significant']['score'] else 'no'} |")
    if summary.get("experts"):
        lines += ["", "## Each expert against `aligned` on its own platform's queries (Score, paired)", "",
                  "| query platform | expert alone - aligned | moe - aligned | queries per seed |", "|---|---:|---:|---|"]
        for platform, d in summary["experts"].items():
            cells = [_cell(d[k], signed=True) if k in d else "-" for k in (f"expert_{platform}", "moe")]
            lines.append(f"| {platform} | {cells[0]} | {cells[1]} | {', '.join(map(str, d['queries'].values()))} |")
    if summary.get("claims"):
        lines += ["", "## Claims (Score)", ""]
        lines += [f"- {c['claim']}: {c['verdict']} (difference {_cell(c['difference'], signed=True)}; "
                  f"{'met' if c['on_mean'] else 'not met'} on the mean)" for c in summary["claims"]]
    if summary.get("baseline"):
        base = summary["baseline"]
        lines += ["", f"## Against the baseline ladder {base['uri']} (this - baseline, same queries)", "",
                  "| variant | R@1 | R@10 | Score | Score interval excludes 0 |", "|---|---:|---:|---:|---|"]
        for v, d in base["variants"].items():
            lines.append(f"| {v} | " + " | ".join(_cell(d[m], signed=True) for m in METRICS)
                         + f" | {'yes' if excludes_zero(d['score']) else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], uri: str) -> None:
    """Mean R@1 / R@10 / Score per variant with interval error bars."""
    from geoloc_ray.eval.report import pyplot

    plt = pyplot()
    names = list(summary["variants"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 3.8))
    width = 0.8 / len(METRICS)
    for i, m in enumerate(METRICS):
        cells = [summary["variants"][v][m] for v in names]
        means = np.array([c["mean"] for c in cells])
        err = np.array([[c["mean"] - c["low"] for c in cells], [c["high"] - c["mean"] for c in cells]])
        ax.bar(np.arange(len(names)) + i * width, means, width, yerr=err.clip(0), capsize=3, label=m)
    ax.set_xticks(np.arange(len(names)) + width, names, rotation=30, ha="right")
    ax.set(ylabel="location level (%)", title=f"seeds {summary['seeds']}: mean and interval")
    ax.legend(fontsize=8)
    save_png(fig, uri)
    plt.close(fig)


def write_ladder(uri: str, summary: dict[str, Any]) -> None:
    io.write_json(artifacts.ladder_json(uri), summary)
    io.write_text(artifacts.ladder_markdown(uri), markdown(summary))
    plot(summary, artifacts.ladder_plot(uri))
