"""Shared helpers of the benchmark scripts: machine description, timing, tables, JSON results in bench/out/.

Every script measures RATIOS inside one run (the machines here are 2 shared, noisy cores: absolute numbers
drift between runs, a ratio of two things timed side by side much less), prints a small table and writes
`bench/out/<name>.json`:
    {"name", "args", "machine", "started", "wall_s", "peak_rss_mb", "results", "rows"}
`rows` are the summary lines `run_all.py` collects: {"row", "target", "measured", "met"} (met None = report).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

# Same environment the Makefile and the tests use: offline model hub, no usage stats, quiet tokenizers.
for _key, _value in {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)


@dataclass
class Row:
    """One line of the summary table: a claim, its target and what this run measured."""

    row: str
    target: str
    measured: str
    met: bool | None  # None: reported, no pass/fail target

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----- arguments ---------------------------------------------------------------------------------------------
def parser(doc: str | None) -> argparse.ArgumentParser:
    """Every script: its sizes as options (defaults = the full measurement), `--quick` for a smoke run."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs, measures nothing")
    p.add_argument("--out", default=str(OUT), help="folder for <name>.json (default bench/out)")
    p.add_argument("--omp-passive", action="store_true",
                   help="OMP_WAIT_POLICY=PASSIVE for both sides (a shared, busy machine; --quick sets it)")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None, quick: dict[str, Any]) -> argparse.Namespace:
    """Parse; with --quick the `quick` sizes become the defaults (an option given explicitly still wins)."""
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**{"omp_passive": True, **quick})
        args = p.parse_args(argv)
    return args


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# ----- machine -----------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed versions without importing (importing torch alone takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPUs (and how busy they were), memory, versions, commit."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(), "cpus": os.cpu_count(), "cpus_usable": affinity, "mem_gb": _mem_total_gb(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
        "platform": platform.platform(), "gpu": None,  # no benchmark here uses a GPU (see bench/README.md)
        "omp": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
        "versions": _versions(["torch", "faiss-cpu", "ray", "open_clip_torch", "transformers", "numpy"]),
        "git_commit": _git("rev-parse", "--short", "HEAD"), "git_dirty": bool(_git("status", "--porcelain")),
    }


def ray_worker_openmp_env(passive: bool = False) -> None:
    """Give this process the OpenMP environment Ray gives its workers; call before torch / faiss are imported.

    Ray sets OMP_NUM_THREADS = floor(assigned CPUs), at least 1, in every worker (the train worker and the
    embedding actors here get 1); the threads actually used are then set explicitly (torch.set_num_threads,
    faiss.omp_set_num_threads). Set in the driver, Ray's workers inherit the same value, so an in-process
    baseline and the Ray side run under one OpenMP setting. `passive` adds OMP_WAIT_POLICY=PASSIVE: while other
    jobs hold the cores, spinning OpenMP threads made 2-thread torch steps 30-100x slower here, erratically;
    passive waiting keeps a shared machine's numbers usable (and costs a little on a quiet one).
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if passive:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# ----- timing and memory ---------------------------------------------------------------------------------------
def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(fn's result, seconds it took)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def best_time(fn: Callable[[], Any], min_seconds: float = 1.0, max_repeats: int = 10, min_repeats: int = 1
              ) -> tuple[float, int]:
    """Fastest of several runs (interference from other processes only ever adds time) and how many ran.

    Repeats until `min_seconds` in total have passed (at least `min_repeats` times, at most `max_repeats`):
    fast settings are timed several times, slow ones once or `min_repeats` times.
    """
    best, total, runs = float("inf"), 0.0, 0
    while runs < max_repeats and (runs < min_repeats or total < min_seconds):
        _, seconds = timed(fn)
        best, total, runs = min(best, seconds), total + seconds, runs + 1
    return best, runs


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its largest finished child (Linux reports KiB)."""
    return {"self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


class TreeMemory:
    """Samples the memory of a process and all its descendants (Ray workers, a make's children) in a thread.

    `ru_maxrss` sees one process at a time; a pipeline's cost is the sum over its process tree. The sum is of PSS
    (each shared page split between the processes that map it): summed RSS would count Ray's shared libraries
    and object store once per worker (a 2-CPU Serve run "used" 10 GB that way).
    """

    def __init__(self, pid: int, interval_s: float = 1.0):
        self.pid, self.interval_s, self.peak_mb = pid, interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0.0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_full_info().pss
            except (psutil.Error, AttributeError):  # gone, or no PSS on this platform: its RSS then
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ----- Ray --------------------------------------------------------------------------------------------------
@contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[None]:
    """A private local Ray instance (never `ray stop`: other people's instances run on this machine)."""
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=512 * 2**20, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                       "RAY_USAGE_STATS_ENABLED": "0"}})
    try:
        yield
    finally:
        ray.shutdown()


# ----- output -----------------------------------------------------------------------------------------------
def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain fixed-width table (floats to 3 significant digits) for the terminal."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def finish(name: str, args: argparse.Namespace, started: float, results: dict[str, Any], rows: Sequence[Row]
           ) -> Path:
    """Print the summary rows and write bench/out/<name>.json; returns its path."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": name, "quick": bool(getattr(args, "quick", False)), "args": vars(args),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_s": round(time.time() - started, 1), "peak_rss_mb": peak_rss_mb(), "machine": machine(),
        "results": results, "rows": [r.to_dict() for r in rows],
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\n{name}: summary" + (" (--quick: sizes too small to mean anything)" if payload["quick"] else ""))
    print(table([r.to_dict() for r in rows], ["row", "target", "measured", "met"]))
    print(f"wrote {path} (wall {payload['wall_s']} s, peak RSS {payload['peak_rss_mb']['self']} MiB)")
    return path
