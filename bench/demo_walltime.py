"""Wall time of `make demo` from a FRESH CLONE: the venv set-up (`make venv`) and the pipeline (`make demo` with
the venv ready) timed apart, each pipeline stage's share, and the peak memory of each part's process tree.

    python bench/demo_walltime.py                              # clone this repo's HEAD into a temp dir, run both
    python bench/demo_walltime.py --ref my-branch --keep       # another commit; keep the clone (7 GB venv!)
    python bench/demo_walltime.py --quick [--run-dir artifacts/demo --log demo.log]   # parse only, run nothing

The clone is `git clone` of --repo (default: this checkout; uncommitted changes are NOT in it, on purpose) into a
temp dir. Commands run there with this venv's variables removed from the environment (PATH, VIRTUAL_ENV,
PYTHONPATH, RAY_ADDRESS, OMP_*), as a user's shell would have them. Stage seconds come from the pipeline's
`artifacts/demo/pipeline/last_run.json` and from the `stages: ...; total Ns` line `geoloc-ray demo` prints
(it adds the world synthesis); the rest of `make demo`'s time is interpreter start-up, imports and Ray start/stop.
Memory: the summed PSS of the command's whole process tree (Ray's processes included), sampled every second.
--quick parses an existing run (--run-dir, --log); with none, its row says so (it never invents a timing).
Host speed: hosts of one kind differ ~2x in train-step time (two "AMD EPYC" hosts: 167 and 315 ms per PE expert
step), and the demo is mostly training, so before the demo the PE and full-fine-tune steps of
`bench/frozen_trunk.py` are timed on this host (this checkout's venv) and reported beside its wall time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, Row, TreeMemory, finish, parse, parser, table  # noqa: E402

NAME = "demo_walltime"
STAGES_LINE = re.compile(r"^stages: (?P<stages>.*); total (?P<total>[\d.]+)s\s*$", re.MULTILINE)
STAGE_ITEM = re.compile(r"^(?P<name>\w+) (?:(?P<seconds>[\d.]+)s|(?P<skipped>skipped))$")


# ----- parsing (what --quick checks) ---------------------------------------------------------------------------
def parse_stages_line(log: str) -> dict[str, Any] | None:
    """`geoloc-ray demo`'s last `stages: synth 3s, prepare 12s, train skipped, ...; total 400s` line."""
    matches = list(STAGES_LINE.finditer(log))
    if not matches:
        return None
    last = matches[-1]
    stages: dict[str, float | None] = {}
    for item in last["stages"].split(", "):
        m = STAGE_ITEM.match(item.strip())
        if m:
            stages[m["name"]] = None if m["skipped"] else float(m["seconds"])
    return {"stages": stages, "total_s": float(last["total"])}


def read_last_run(run_dir: Path) -> dict[str, dict[str, Any]] | None:
    path = run_dir / "pipeline" / "last_run.json"
    return json.loads(path.read_text()) if path.exists() else None


def stage_shares(printed: dict[str, Any] | None, last_run: dict | None, pipeline_s: float | None) -> list[dict]:
    """One row per stage: seconds (last_run.json, else the printed line) and share of the pipeline's wall time."""
    seconds: dict[str, float | None] = dict((printed or {}).get("stages", {}))
    for name, info in (last_run or {}).items():
        seconds[name] = info.get("seconds") if info.get("status") == "ran" else None
    whole = pipeline_s or (printed or {}).get("total_s")
    if whole:  # what no stage accounts for: interpreter start-up, imports, Ray start/stop, the report
        seconds["other"] = max(0.0, whole - sum(s for s in seconds.values() if s is not None))
    return [{"stage": name, "seconds": s, "share": (s / whole if s is not None and whole else None),
             "status": "ran" if s is not None else "skipped"} for name, s in seconds.items()]


# ----- running ------------------------------------------------------------------------------------------------
def user_env() -> dict[str, str]:
    """This environment without the bench's venv and Ray/OpenMP settings: what a user's shell would pass make."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "RAY_ADDRESS", "PYTHONHOME") and not k.startswith("OMP_")}
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    return env


def run_logged(command: str, cwd: Path, log: Path, timeout: float) -> dict[str, Any]:
    """Run a shell command, output to `log`; wall seconds, exit code and peak process-tree memory."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, shell=True, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=user_env(),
                                start_new_session=True)
        with TreeMemory(proc.pid) as mem:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 15)  # our own process group only
                rc = proc.wait()
    return {"command": command, "rc": rc, "seconds": time.perf_counter() - start, "peak_tree_pss_mb": mem.peak_mb,
            "log": str(log)}


def clone(repo: str, ref: str, dest: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["git", "clone", "--quiet", repo, str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "checkout", "--quiet", ref], check=True)
    return time.perf_counter() - start


def host_speed(timeout: float) -> dict[str, int]:
    """Median ms per train step of `bench/frozen_trunk.py`'s PE expert and full fine-tune (demo model, batch 64,
    bf16, 2 threads) on this host now: what a demo timing is read against."""
    with tempfile.TemporaryDirectory(prefix="bench-host-") as out:
        subprocess.run([sys.executable, str(ROOT / "bench" / "frozen_trunk.py"), "--no-production", "--rounds", "1",
                        "--out", out], check=True, capture_output=True, timeout=timeout)
        step = json.loads((Path(out) / "frozen_trunk.json").read_text())["results"]["step"]
    return {name: round(v["median_step_s"] * 1000) for name, v in step.items()}


def run_fresh(args) -> dict[str, Any]:
    """Clone, `make venv`, then the pipeline command; each timed apart."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-demo-"))
    checkout = work / "geoloc_ray"
    logs = Path(args.out)  # logs outlive the temp clone, so a failure can be read afterwards
    logs.mkdir(parents=True, exist_ok=True)
    try:
        clone_s = clone(args.repo, args.ref, checkout)
        commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        print(f"cloned {args.repo}@{commit} into {checkout} in {clone_s:.1f}s; running `{args.venv_command}` ...",
              flush=True)
        venv = run_logged(args.venv_command, checkout, logs / "demo_walltime.venv.log", args.timeout)
        if venv["rc"] != 0:
            raise RuntimeError(f"`{args.venv_command}` failed ({venv['rc']}); see {venv['log']}")
        venv["disk_gb"] = _disk_gb(checkout / ".venv")
        host = None if args.no_host_speed else host_speed(args.timeout)
        print(f"venv ready in {venv['seconds']:.0f}s; running `{args.command}` ...", flush=True)
        pipeline = run_logged(args.command, checkout, logs / "demo_walltime.demo.log", args.timeout)
        if pipeline["rc"] != 0:
            raise RuntimeError(f"`{args.command}` failed ({pipeline['rc']}); see {pipeline['log']}")
        log = Path(pipeline["log"]).read_text()
        printed, last_run = parse_stages_line(log), read_last_run(checkout / args.run_dir)
        return {"commit": commit, "clone_s": clone_s, "venv": venv, "host_ms_per_step": host,
                "pipeline": pipeline, "printed": printed,
                "last_run": last_run, "shares": stage_shares(printed, last_run, pipeline["seconds"]),
                "total_s": clone_s + venv["seconds"] + pipeline["seconds"], "workdir": str(work)}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _disk_gb(path: Path) -> float | None:
    try:
        out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
        return round(int(out.split()[0]) / 2**20, 2)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def parse_existing(args) -> dict[str, Any]:
    """--quick: parse a finished run's outputs; nothing found stays nothing found."""
    run_dir = Path(args.run_dir) if Path(args.run_dir).is_absolute() else ROOT / args.run_dir
    last_run = read_last_run(run_dir)
    log = Path(args.log).read_text() if args.log else None
    source = f"{run_dir} + {args.log or 'no log'}"
    if last_run is None and log is None:
        source = f"no run found under {run_dir} (run `make demo` first, or pass --log)"
    printed = parse_stages_line(log or "")
    pipeline_s = printed["total_s"] if printed else None
    return {"source": source, "printed": printed, "last_run": last_run,
            "shares": stage_shares(printed, last_run, pipeline_s), "pipeline": {"seconds": pipeline_s}}


def rows_for(result: dict[str, Any], args) -> list[Row]:
    seconds = result["pipeline"]["seconds"]
    stages = ", ".join(f"{s['stage']} {s['seconds']:.0f}s ({s['share']:.0%})" for s in result["shares"]
                       if s["seconds"] is not None and s["share"] is not None)
    cores = os.cpu_count()
    pipeline_row = Row(f"`{args.command}` wall time from a fresh clone, venv ready ({cores} cores)",
                       f"<= {args.target_min:g} min",
                       f"{seconds / 60:.1f} min ({stages})" if seconds else f"no timing found: {result['source']}",
                       None if seconds is None else seconds <= args.target_min * 60)
    if "venv" not in result:
        return [pipeline_row]
    venv, host = result["venv"], result.get("host_ms_per_step")
    host_row = Row("host speed before the demo: `bench/frozen_trunk.py` train step (batch 64, bf16, 2 threads)",
                   "report", f"PE expert {host['pe']} ms, full fine-tune {host['full']} ms" if host else "not measured",
                   None)
    return [pipeline_row, host_row,
            Row(f"`{args.venv_command}` in a fresh clone (pip install -e .[cpu])", "report",
                f"{venv['seconds'] / 60:.1f} min, {venv['disk_gb'] or '?'} GB on disk", None),
            Row("fresh clone -> demo results, whole (clone + venv + demo)", "report",
                f"{result['total_s'] / 60:.1f} min; peak memory (process tree) venv "
                f"{venv['peak_tree_pss_mb'] / 1024:.1f} GB, demo {result['pipeline']['peak_tree_pss_mb'] / 1024:.1f} GB",
                None)]


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--repo", default=str(ROOT), help="what to clone (a path or URL)")
    p.add_argument("--ref", default="HEAD", help="commit, branch or tag to check out")
    p.add_argument("--venv-command", default="make venv")
    p.add_argument("--command", default="make demo", help="the pipeline command, run after the venv command")
    p.add_argument("--run-dir", default="artifacts/demo", help="the run's artifacts folder, relative to the clone")
    p.add_argument("--log", help="--quick: a saved output of `geoloc-ray demo` to parse")
    p.add_argument("--workdir", help="where to clone (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the clone (and its ~7 GB venv)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per command")
    p.add_argument("--target-min", type=float, default=10.0)
    p.add_argument("--no-host-speed", action="store_true", help="skip timing the host's train step first")
    args = parse(p, argv, {})
    started = time.time()
    result = parse_existing(args) if args.quick else run_fresh(args)
    print(table(result["shares"], ["stage", "status", "seconds", "share"]), flush=True)
    finish(NAME, args, started, result, rows_for(result, args))
    return result


if __name__ == "__main__":
    main()
