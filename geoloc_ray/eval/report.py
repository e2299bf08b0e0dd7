"""Evaluation outputs: metrics.json (the DESIGN.md contract), a markdown table and PNG plots."""

from __future__ import annotations

import io as _pyio
from typing import Any

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config

LADDER = ["unified", "aligned", "static_ensemble", "moe"]
# Rows of every table: the ladder, then moe with one image per location (k distinct places), then any others.
ORDER = [*LADDER, "moe_places"]
# The routing diagnostics get their own table (moe's experts under other routings, each expert alone).
ROUTINGS = ["oracle_gate", "oracle_mix", "platform_gate"]


def is_diagnostic(name: str) -> bool:
    return name in ROUTINGS or name.startswith("expert_")


def shown(names: Any) -> list[str]:
    """The ladder-table variants present in `names`, in table order (known ones first, the rest as they come)."""
    names = [n for n in names if not is_diagnostic(n)]
    return [v for v in ORDER if v in names] + [v for v in names if v not in ORDER]


def diagnostics(names: Any) -> list[str]:
    """The routing diagnostics present in `names`: the routings, then the experts alone."""
    names = list(names)
    return [v for v in ROUTINGS if v in names] + [v for v in names if v.startswith("expert_")]


def ladder_table(results: dict[str, Any], level: str = "location") -> str:
    """The ablation ladder (and moe_places) as a markdown table (recalls in percent)."""
    lines = [f"| variant ({level}) | R@1 | R@5 | R@10 | Score |", "|---|---:|---:|---:|---:|"]
    for name in shown(results["variants"]):
        m = results["variants"][name][level]
        lines.append(f"| {name} | {m['R@1']:.2f} | {m['R@5']:.2f} | {m['R@10']:.2f} | {m['score']:.2f} |")
    return "\n".join(lines)


def platform_table(results: dict[str, Any]) -> str:
    platforms = sorted({p for v in results["variants"].values() for p in v["per_platform"]})
    lines = ["| variant | " + " | ".join(f"{p} Score" for p in platforms) + " |",
             "|---|" + "---:|" * len(platforms)]
    for name in shown(results["variants"]):
        per = results["variants"][name]["per_platform"]
        lines.append(f"| {name} | " + " | ".join(f"{per[p]['location']['score']:.2f}" for p in platforms) + " |")
    return "\n".join(lines)


def routing_table(results: dict[str, Any]) -> str:
    """moe next to its routing diagnostics: location-level R@1, R@10, Score and the Score per query platform."""
    variants = results["variants"]
    platforms = sorted({p for v in variants.values() for p in v["per_platform"]})
    lines = ["| variant | R@1 | R@10 | Score | " + " | ".join(f"{p} Score" for p in platforms) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(platforms)]
    for name in [n for n in ["moe"] if n in variants] + diagnostics(variants):
        m, per = variants[name]["location"], variants[name]["per_platform"]
        cells = [f"{per[p]['location']['score']:.2f}" if p in per else "-" for p in platforms]
        lines.append(f"| {name} | {m['R@1']:.2f} | {m['R@10']:.2f} | {m['score']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _score(results: dict[str, Any], variant: str, platform: str, level: str = "location") -> float | None:
    block = results["variants"].get(variant, {}).get("per_platform", {}).get(platform, {}).get(level)
    return None if block is None else block["score"]


def own_expert_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per query platform with its own expert evaluated: which expert alone scores best (location-level Score),
    the own expert's Score, and aligned's (the head every expert specialises from; None when not evaluated)."""
    experts = {v.removeprefix("expert_") for v in results["variants"] if v.startswith("expert_")}
    rows = []
    for platform in sorted(experts):
        scores = {e: _score(results, f"expert_{e}", platform) for e in sorted(experts)}
        scores = {e: s for e, s in scores.items() if s is not None}
        if platform not in scores:
            continue
        best = max(scores, key=lambda e: (scores[e], e == platform))  # a tie goes to the own expert
        queries = results["variants"][f"expert_{platform}"]["per_platform"][platform].get("queries")
        rows.append({"platform": platform, "best": best, "best_score": scores[best], "own_score": scores[platform],
                     "aligned_score": _score(results, "aligned", platform), "queries": queries})
    return rows


def _why(results: dict[str, Any], row: dict[str, Any]) -> str:
    """Whether specialising on the platform's images hurt (own expert below aligned) or another expert is just better."""
    p, aligned = row["platform"], row["aligned_score"]
    if aligned is None:
        return "Evaluate `aligned` (the experts' starting head) to tell whether specialising hurt."
    own_img, aligned_img = _score(results, f"expert_{p}", p, "image"), _score(results, "aligned", p, "image")
    image = "" if own_img is None or aligned_img is None else f"; image level {own_img:.2f} vs {aligned_img:.2f}"
    versus = f"({row['own_score']:.2f} vs {aligned:.2f}{image})"
    if row["own_score"] < aligned:
        return (f"expert_{p} also scores below aligned, the head it specialises from {versus}: training on {p} "
                f"images alone made it worse on {p} queries (too few images for its schedule, or a mixed gallery "
                "it never trained on), a fault of the expert's training, not of the routing; oracle_gate is no "
                "upper bound for these queries.")
    return (f"expert_{p} improves on aligned, the head it specialises from {versus}, yet expert_{row['best']}, "
            "trained on another platform's images, ranks these queries' places better over the mixed gallery.")


def own_expert_section(results: dict[str, Any]) -> str:
    """A table and one sentence per query platform: does the platform's own expert score best alone, and why not."""
    rows = own_expert_rows(results)
    if not rows:
        return ""
    lines = ["| query platform | best expert alone | Score | own expert Score | aligned Score |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {r['platform']} | expert_{r['best']} | {r['best_score']:.2f} | {r['own_score']:.2f} | "
              + ("-" if r["aligned_score"] is None else f"{r['aligned_score']:.2f}") + " |" for r in rows]
    lines.append("")
    for r in rows:
        p, gap = r["platform"], r["best_score"] - r["own_score"]
        if r["best"] == p:
            lines.append(f"- {p} queries: their own expert_{p} scores best alone ({r['own_score']:.2f}).")
            continue
        noise = ""
        if r["queries"]:  # Score = (R@1 + R@10) / 2: one query moves it 50/n (one recall) to 100/n (both)
            n = r["queries"]
            noise = f"; {n} queries, one query moves Score {50 / n:.2f}-{100 / n:.2f}"
            noise += ": within noise" if gap <= 100 / n else ""
        lines.append(f"- {p} queries: expert_{r['best']} alone scores best ({r['best_score']:.2f}), {gap:.2f} above "
                     f"their own expert_{p} ({r['own_score']:.2f}{noise}). {_why(results, r)}")
    return "\n".join(lines)


def gate_tables(gate: dict[str, Any]) -> str:
    """Each routing's weight matrix: mean weight per expert (columns) by the query's true platform (rows)."""
    parts = []
    for name, summary in gate.get("by_variant", {"moe": gate}).items():
        weights = summary["mean_weights"]
        experts = list(next(iter(weights.values()))) if weights else []
        parts += [f"**{name}** (top expert = query platform: {100 * summary['accuracy']:.1f}%)", "",
                  "| query platform | " + " | ".join(experts) + " |", "|---|" + "---:|" * len(experts)]
        parts += [f"| {p} | " + " | ".join(f"{row[e]:.2f}" for e in experts) + " |" for p, row in weights.items()]
        parts.append("")
    return "\n".join(parts)


def corruption_table(results: dict[str, Any]) -> str:
    names = shown(results["variants"])
    lines = ["| corruption | severity | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for kind, by_sev in results.get("corruptions", {}).items():
        for sev, by_var in sorted(by_sev.items()):
            cells = [f"{by_var[v]['location']['score']:.2f}" if v in by_var else "-" for v in names]
            lines.append(f"| {kind} | {sev} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    parts = [
        "# Evaluation", "",
        f"{meta.get('queries')} queries over a mixed gallery of {meta.get('gallery')} images "
        f"({meta.get('locations')} locations); chance location-level {meta.get('chance')}.", "",
        "## Ablation ladder, location level (Score = (R@1 + R@10) / 2)", "", ladder_table(results, "location"), "",
        "moe_places: the moe ranking with one image per location (its best), so the top k are k distinct places.",
        "",
        "## Image level", "", ladder_table(results, "image"), "",
        "## Location-level Score per query platform", "", platform_table(results), "",
    ]
    if diagnostics(results["variants"]):
        parts += ["## Routing diagnostics, location level", "", routing_table(results), "",
                  "oracle_gate: one-hot weight on the query's true platform; oracle_mix: per query platform the "
                  "fixed expert weights (a simplex grid, vertices and equal weights included) that score best on "
                  "that platform's test queries, chosen on the test set itself (an upper bound of any gate that "
                  "knows the platform, never a result); platform_gate: the gate trained on platform labels, "
                  "before fused tuning (at the MoE's temperature); "
                  "expert_<platform>: that expert alone over the mixed gallery.", ""]
        if own := own_expert_section(results):
            parts += ["### Does each platform's own expert score best alone?", "", own, ""]
    if results.get("gate"):
        parts += ["## Gate weights (query platform x expert)", "", gate_tables(results["gate"])]
    if results.get("corruptions"):
        parts += ["## Location-level Score under gallery image corruptions", "", corruption_table(results), ""]
    return "\n".join(parts)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (jobs and workers have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, uri: str) -> None:
    buf = _pyio.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    io.write_bytes(uri, buf.getvalue())


def plots(cfg: Config, results: dict[str, Any]) -> list[str]:
    plt = pyplot()
    out = artifacts.eval_dir(cfg)
    written = []
    names = shown(results["variants"])

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in names:
        curve = results["curves"][name]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
    ax.set(xlabel="K", ylabel="location-level Recall@K (%)", title="Recall@K")
    ax.legend()
    save_png(fig, io.join(out, "recall_at_k.png"))
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
    save_png(fig, io.join(out, "per_platform.png"))
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
        save_png(fig, io.join(out, "gate_weights.png"))
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
        save_png(fig, io.join(out, "corruptions.png"))
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
