"""Run every benchmark (full sizes, or --quick smoke runs) and collect one summary.

    python bench/run_all.py                       # everything at full size (~45 min on 2 quiet cores; see README)
    python bench/run_all.py --quick               # every script at its smoke size (~5 min: mostly Ray start-ups)
    python bench/run_all.py --only index_ann,frozen_trunk
    python bench/run_all.py --list                # the commands, without running them

Each benchmark runs as its own process (its own Ray instance, threads and memory), one after another, with its
output in bench/out/logs/. Writes bench/out/summary.json and bench/out/BENCHMARKS.partial.md: one line per claim
(row, target, measured, met?, command) and each run's wall time and peak memory (summed over its process tree).
The serve benchmarks print JSON rather than writing a file; their rows are built here from that JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import OUT, ROOT, Row, TreeMemory, machine, parser, table  # noqa: E402


def _overhead_rows(r: dict) -> list[Row]:
    return [Row("Serve graph overhead: HTTP p50 vs in-process encode + search p50 (1 client)", "report",
                f"{r['overhead_ratio_p50']}x ({r['http_p50_ms']} vs {r['in_process_p50_ms']} ms; p99 "
                f"{r['http_p99_ms']} vs {r['in_process_p99_ms']} ms; {r['requests']} requests)", None)]


def _batching_rows(r: dict) -> list[Row]:
    b, u = r["batched"], r["unbatched"]
    return [Row(f"@serve.batch: throughput batched (max {b['max_batch_size']}) vs unbatched, {b['clients']} clients",
                "report", f"{r['throughput_ratio_batched_over_unbatched']}x ({b['throughput_rps']} vs "
                f"{u['throughput_rps']} req/s; p50 {b['p50_ms']} vs {u['p50_ms']} ms)", None)]


def _load_rows(r: dict) -> list[Row]:
    return [Row(f"Serve load: {r['clients']} clients x {r['duration_s']:.0f} s", "0 errors",
                f"{r['throughput_rps']} req/s, p50 {r['p50_ms']} ms, p90 {r['p90_ms']} ms, p99 {r['p99_ms']} ms, "
                f"{r['errors']} errors, {r['degraded']} degraded", r["errors"] == 0)]


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    full: list[str]
    quick: list[str]
    rows_from_stdout: Callable[[dict], list[Row]] | None = None  # the serve scripts print JSON, write no file
    common_options: bool = True  # takes bench.common's --out / --omp-passive (index_memory: --out only)


BENCHES = [
    Bench("frozen_trunk", "bench/frozen_trunk.py", [], ["--quick"]),
    Bench("train_overhead", "bench/train_overhead.py", [], ["--quick"]),
    Bench("data_embedding", "bench/data_embedding.py", [], ["--quick"]),
    Bench("index_ann", "bench/index_ann.py", [], ["--quick"]),
    # serve_overhead needs --requests > 20 (it drops its first 20 in-process timings as warm-up)
    Bench("serve_overhead", "bench/serve_overhead.py", ["--requests", "200"], ["--requests", "30"], _overhead_rows),
    Bench("serve_batching", "bench/serve_batching.py", ["--clients", "16", "--duration", "30"],
          ["--clients", "4", "--duration", "2"], _batching_rows),
    Bench("serve_load", "bench/serve_load.py", ["--clients", "16", "--duration", "60"],
          ["--clients", "4", "--duration", "3"], _load_rows),
    Bench("demo_walltime", "bench/demo_walltime.py", [], ["--quick"]),
    Bench("ddp_step", "bench/ddp_step.py", [], ["--quick"]),
    Bench("index_memory", "bench/index_memory.py", [], ["--sizes", "2000,4000", "--dim", "64", "--shards", "2"],
          common_options=False),
]
# Not here: bench/gpu_check.py, gpu_train.py and gpu_embedding.py are device checks for the GPU machine (docs/BENCHMARKS.md
# names their commands); on a CPU they only smoke-test themselves, which the tests already do.


def command(bench: Bench, quick: bool, out: Path, omp_passive: bool = False) -> list[str]:
    args = bench.quick if quick else bench.full
    if bench.rows_from_stdout is None:  # our scripts take the common options
        args = [*args, *(["--out", str(out)] if str(out) != str(OUT) else []),
                *(["--omp-passive"] if omp_passive and not quick and bench.common_options else [])]
    return [sys.executable, bench.script, *args]


def shown(cmd: list[str]) -> str:
    """The command as a user types it from the repo root."""
    return " ".join(["python", *cmd[1:]])


def last_json(text: str) -> dict | None:
    """The last top-level JSON object in a program's output (the serve scripts print theirs at the end)."""
    decoder, found, start = json.JSONDecoder(), None, 0
    while (start := text.find("{", start)) != -1:
        if start == 0 or text[start - 1] == "\n":
            try:
                obj, end = decoder.raw_decode(text, start)
                found, start = (obj if isinstance(obj, dict) else found), end
                continue
            except json.JSONDecodeError:
                pass
        start += 1
    return found


def run_one(bench: Bench, args) -> dict[str, Any]:
    """Run one script as a subprocess; its rows (from its JSON file or its printed JSON), wall time, memory."""
    quick, out, timeout = args.quick, Path(args.out), args.timeout
    cmd, logs = command(bench, quick, out, args.omp_passive), out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = logs / f"{bench.name}.out", logs / f"{bench.name}.err"
    print(f"[run_all] {shown(cmd)}", flush=True)
    start = time.perf_counter()
    with open(stdout_path, "w") as so, open(stderr_path, "w") as se:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=so, stderr=se)
        with TreeMemory(proc.pid) as mem:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    run = {"name": bench.name, "command": shown(cmd), "rc": rc, "wall_s": round(time.perf_counter() - start, 1),
           "peak_tree_pss_mb": round(mem.peak_mb), "stdout": str(stdout_path), "stderr": str(stderr_path)}
    run["rows"] = [r.to_dict() for r in collect_rows(bench, rc, out, stdout_path)]
    print(f"[run_all] {bench.name}: rc {rc}, {run['wall_s']} s, peak {run['peak_tree_pss_mb']} MiB", flush=True)
    return run


def collect_rows(bench: Bench, rc: int, out: Path, stdout_path: Path) -> list[Row]:
    failed = Row(f"{bench.name} (did not finish)", "-", f"exit code {rc}: see {stdout_path.parent}", False)
    if rc != 0:
        return [failed]
    try:
        if bench.rows_from_stdout is not None:
            data = last_json(stdout_path.read_text())
            return bench.rows_from_stdout(data) if data else [failed]
        rows = json.loads((out / f"{bench.name}.json").read_text())["rows"]
        return [Row(**r) for r in rows]
    except (OSError, KeyError, TypeError, ValueError) as exc:
        return [Row(f"{bench.name} (unreadable result)", "-", f"{type(exc).__name__}: {exc}", False)]


def _cell(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {True: "yes", False: "**no**", None: "-"}[value]
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(runs: list[dict[str, Any]], quick: bool, info: dict[str, Any]) -> str:
    lines = [f"<!-- written by bench/run_all.py{' --quick' if quick else ''} on "
             f"{time.strftime('%Y-%m-%d %H:%M')}; commit {info['git_commit']}"
             f"{' (dirty)' if info['git_dirty'] else ''} -->",
             f"Measured on {info['cpus_usable']} x {info['cpu']}, {info['mem_gb']} GB, no GPU; load average at "
             f"the start {info['load_avg_1_5_15'][0]}." + (" **--quick smoke run: the numbers mean nothing.**"
                                                            if quick else ""),
             "", "| row | target | measured | met? | command |", "|---|---|---|---|---|"]
    for run in runs:
        for r in run["rows"]:
            lines.append("| " + " | ".join(_cell(v) for v in (r["row"], r["target"], r["measured"], r["met"],
                                                               f"`{run['command']}`")) + " |")
    lines += ["", "| benchmark | wall | peak memory (process tree) | exit |", "|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run['name']} | {run['wall_s'] / 60:.1f} min | {run['peak_tree_pss_mb'] / 1024:.1f} GB | "
                     f"{run['rc']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--only", help="comma-separated benchmark names")
    p.add_argument("--skip", default="", help="comma-separated benchmark names to leave out")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    p.add_argument("--list", action="store_true", help="print the commands and exit")
    args = p.parse_args(argv)
    out = Path(args.out)
    names = set(args.only.split(",")) if args.only else {b.name for b in BENCHES}
    chosen = [b for b in BENCHES if b.name in names and b.name not in set(args.skip.split(","))]
    if args.list:
        print("\n".join(shown(command(b, args.quick, out, args.omp_passive)) for b in chosen))
        return {}
    info = machine()
    runs = [run_one(b, args) for b in chosen]
    summary = {"quick": args.quick, "machine": info, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "BENCHMARKS.partial.md").write_text(markdown(runs, args.quick, info))
    rows = [{"bench": run["name"], **r} for run in runs for r in run["rows"]]
    print(table(rows, ["bench", "row", "target", "measured", "met"]))
    print(f"wrote {out / 'summary.json'} and {out / 'BENCHMARKS.partial.md'}")
    return summary


if __name__ == "__main__":
    main()
