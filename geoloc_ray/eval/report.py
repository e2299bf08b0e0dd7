"""Evaluation outputs: metrics.json (the DESIGN.md contract), a markdown table and PNG plots."""

from __future__ import annotations

import io as _pyio
from typing import Any

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config

LADDER = ["unified", "aligned", "static_ensemble", "moe"]


def ladder_table(results: dict[str, Any], level: str = "location") -> str:
    """The ablation ladder as a markdown table (recalls in percent)."""
    lines = [f"| variant ({level}) | R@1 | R@5 | R@10 | Score |", "|---|---:|---:|---:|---:|"]
    for name in [v for v in LADDER if v in results["variants"]]:
        m = results["variants"][name][level]
        lines.append(f"| {name} | {m['R@1']:.2f} | {m['R@5']:.2f} | {m['R@10']:.2f} | {m['score']:.2f} |")
    return "\n".join(lines)


def platform_table(results: dict[str, Any]) -> str:
    platforms = sorted({p for v in results["variants"].values() for p in v["per_platform"]})
    lines = ["| variant | " + " | ".join(f"{p} Score" for p in platforms) + " |",
             "|---|" + "---:|" * len(platforms)]
    for name in [v for v in LADDER if v in results["variants"]]:
        per = results["variants"][name]["per_platform"]
        lines.append(f"| {name} | " + " | ".join(f"{per[p]['location']['score']:.2f}" for p in platforms) + " |")
    return "\n".join(lines)


def corruption_table(results: dict[str, Any]) -> str:
    lines = ["| corruption | severity | " + " | ".join(v for v in LADDER if v in results["variants"]) + " |",
             "|---|---:|" + "---:|" * len([v for v in LADDER if v in results["variants"]])]
    for kind, by_sev in results.get("corruptions", {}).items():
        for sev, by_var in sorted(by_sev.items()):
            cells = [f"{by_var[v]['location']['score']:.2f}" for v in LADDER if v in by_var]
            lines.append(f"| {kind} | {sev} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    parts = [
        "# Evaluation", "",
        f"{meta.get('queries')} queries over a mixed gallery of {meta.get('gallery')} images "
        f"({meta.get('locations')} locations); chance location-level {meta.get('chance')}.", "",
        "## Ablation ladder, location level (Score = (R@1 + R@10) / 2)", "", ladder_table(results, "location"), "",
        "## Image level", "", ladder_table(results, "image"), "",
        "## Location-level Score per query platform", "", platform_table(results), "",
    ]
    if results.get("gate"):
        parts += ["## Gate", "", f"top-expert accuracy vs the query's platform: "
                  f"{100 * results['gate']['accuracy']:.1f}%", ""]
    if results.get("corruptions"):
        parts += ["## Location-level Score under gallery image corruptions", "", corruption_table(results), ""]
    return "\n".join(parts)


def _save_png(fig, uri: str) -> None:
    buf = _pyio.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    io.write_bytes(uri, buf.getvalue())


def plots(cfg: Config, results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = artifacts.eval_dir(cfg)
    written = []
    names = [v for v in LADDER if v in results["variants"]]

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in names:
        curve = results["curves"][name]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
    ax.set(xlabel="K", ylabel="location-level Recall@K (%)", title="Recall@K")
    ax.legend()
    _save_png(fig, io.join(out, "recall_at_k.png"))
    written.append("recall_at_k.png")

    platforms = sorted({p for n in names for p in results["variants"][n]["per_platform"]})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        per = results["variants"][name]["per_platform"]
        ax.bar([j + i * width for j in range(len(platforms))], [per[p]["location"]["score"] for p in platforms],
               width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(platforms))], platforms)
    ax.set(ylabel="location-level Score", title="Score per query platform")
    ax.legend(fontsize=8)
    _save_png(fig, io.join(out, "per_platform.png"))
    written.append("per_platform.png")

    if results.get("gate"):
        weights = results["gate"]["mean_weights"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        bottom = [0.0] * len(weights)
        for expert in cfg.model.platforms:
            vals = [weights[p][expert] for p in weights]
            ax.bar(list(weights), vals, bottom=bottom, label=f"expert: {expert}")
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set(xlabel="query platform", ylabel="mean gate weight", title="Gate weights by query platform")
        ax.legend(fontsize=8)
        _save_png(fig, io.join(out, "gate_weights.png"))
        written.append("gate_weights.png")

    if results.get("corruptions"):
        kinds = list(results["corruptions"])
        fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.2), squeeze=False)
        for ax, kind in zip(axes[0], kinds, strict=True):
            sevs = sorted(results["corruptions"][kind], key=int)
            for name in names:
                clean = results["variants"][name]["location"]["score"]
                ax.plot([0, *map(int, sevs)],
                        [clean, *[results["corruptions"][kind][s][name]["location"]["score"] for s in sevs]],
                        marker="o", label=name)
            ax.set(title=kind, xlabel="severity", ylabel="Score")
        axes[0][0].legend(fontsize=7)
        _save_png(fig, io.join(out, "corruptions.png"))
        written.append("corruptions.png")
    plt.close("all")
    return written


def write_report(cfg: Config, results: dict[str, Any]) -> None:
    """metrics.json first (the contract), then the table and plots; the plot list is added to metrics.json."""
    io.write_json(artifacts.metrics(cfg), results)
    io.write_text(io.join(artifacts.eval_dir(cfg), "results.md"), markdown(results))
    if cfg.eval.plots:
        results["plots"] = plots(cfg, results)
        io.write_json(artifacts.metrics(cfg), results)
