"""Issue 22's tuning arms side by side, and the rule of docs/ladder/PLAN.md applied to them.

Reads each arm's ladder.json (`geoloc-ray ladder --set ladder.name=<arm> ...`), prints one markdown row per arm
(moe, static_ensemble, their paired difference, oracle_mix and moe's distance to it, Score) and the arm the
pre-registered rule picks:

    python bench/ladder_arms.py artifacts/arm-replay artifacts/arm-equal artifacts/arm-equal-t2 artifacts/arm-t2

The first arm is the plan's arm A (the reference of rules 2 and 3); `--changes` gives each arm's number of
settings changed from A, in the same order (default 0,1,2,1 as PLAN.md lists them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TIE = 0.25  # rule 3: moe Scores closer than this are a tie
SLACK = 0.5  # rule 2: the highest d may cost at most this much moe Score against arm A


def load(folder: str) -> dict[str, Any]:
    path = Path(folder) / "ladder.json"
    if not path.exists():
        raise SystemExit(f"{path}: no ladder.json (run the arm's ladder first)")
    return json.loads(path.read_text())


def difference(summary: dict[str, Any], earlier: str, later: str) -> dict[str, float] | None:
    for d in summary["differences"]:
        if (d["from"], d["to"]) == (earlier, later):
            return d["score"]
    return None


def arm_row(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """What the rule and the table need of one arm (Score, location level, percent)."""
    v = summary["variants"]
    d = difference(summary, "static_ensemble", "moe")
    if d is None or "moe" not in v:
        raise SystemExit(f"{name}: its ladder has no moe - static_ensemble difference")
    return {"arm": name, "m": v["moe"]["score"]["mean"], "d": d["mean"], "d_cell": d,
            "static": v["static_ensemble"]["score"]["mean"], "aligned": v["aligned"]["score"]["mean"],
            "unified": v["unified"]["score"]["mean"],
            "oracle_mix": v.get("oracle_mix", {}).get("score", {}).get("mean"),
            "to_mix": difference(summary, "moe", "oracle_mix"), "seeds": summary["seeds"]}


def choose(rows: list[dict[str, Any]], changes: list[int]) -> tuple[str, str]:
    """PLAN.md's rule: (the chosen arm, why)."""
    ref, fewer = rows[0], {r["arm"]: c for r, c in zip(rows, changes, strict=True)}
    candidates = [r for r in rows if r["d"] > 0]
    if not candidates:
        best = max(rows, key=lambda r: r["d"])
        if best["m"] < ref["m"] - SLACK:
            return ref["arm"], (f"rule 2: no arm has moe - static_ensemble > 0; the highest ({best['arm']}, "
                                f"{best['d']:+.2f}) costs more than {SLACK} moe Score against {ref['arm']}")
        return best["arm"], f"rule 2: no arm has moe - static_ensemble > 0; the highest is {best['d']:+.2f}"
    best = max(candidates, key=lambda r: r["m"])
    why = f"rule 1: moe - static_ensemble > 0 in {[r['arm'] for r in candidates]}; the highest moe Score"
    simplest = min([r for r in candidates if best["m"] - r["m"] < TIE], key=lambda r: (fewer[r["arm"]], -r["m"]))
    if simplest is not best:
        why += f"; rule 3: {simplest['arm']} is within {TIE} of it with fewer settings changed"
    return simplest["arm"], why


def cell(d: dict[str, float] | None) -> str:
    return "-" if d is None else f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arms", nargs="+", help="ladder folders, arm A first")
    p.add_argument("--changes", default="0,1,2,1", help="settings changed from arm A, per arm")
    args = p.parse_args(argv)
    changes = [int(c) for c in args.changes.split(",")]
    if len(changes) != len(args.arms):
        raise SystemExit(f"--changes has {len(changes)} entries for {len(args.arms)} arms")
    rows = [arm_row(Path(a).name, load(a)) for a in args.arms]
    lines = ["| arm | unified | aligned | static_ensemble | moe | moe - static_ensemble | oracle_mix | "
             "oracle_mix - moe |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mix = "-" if r["oracle_mix"] is None else f"{r['oracle_mix']:.2f}"
        lines.append(f"| {r['arm']} | {r['unified']:.2f} | {r['aligned']:.2f} | {r['static']:.2f} | {r['m']:.2f} | "
                     f"{cell(r['d_cell'])} | {mix} | {cell(r['to_mix'])} |")
    arm, why = choose(rows, changes)
    text = "\n".join(lines) + f"\n\nSeeds {rows[0]['seeds']}. Chosen: **{arm}** ({why}).\n"
    print(text)
    return text


if __name__ == "__main__":
    main()
