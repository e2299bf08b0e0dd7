"""`geoloc-ray`: one thin command per pipeline stage (recipes only wire library functions).

The pipeline stages come from the stage registry (`geoloc_ray.stages`); `synth`, `serve`, `submit` and `demo`
are the commands around it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config, ConfigError, load_config
from geoloc_ray.stages import BY_NAME

QUIET_COMMANDS = ("pipeline", "demo", "ladder")  # long runs: one progress line on screen, the rest in logs/

HELP = {
    "synth": "generate a procedural multi-platform world in the GeoText-1652 layout",
    "pipeline": "prepare -> refine -> train -> index -> eval, skipping stages that are up to date",
    "serve": "start the Ray Serve application (HTTP API + search page) for a trained run",
    "submit": "write a RoboSense Track 4 submission.txt for a queries file and a flat gallery",
    "demo": "synthesize a world, run the whole pipeline on it and print the ablation table",
    "ladder": "train and evaluate the ladder over several seeds; means, intervals and paired rung differences",
    "rehearse": "the production profile end to end on this machine: autoscaling cluster, S3, vLLM, a lost node",
    "plan": "per fit of the recipe: parameters, peak GPU memory per worker, step FLOPs, object-store bytes per row",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: the embedded configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.batch_size=64 (repeatable)")


def _add_world_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--locations", type=int, default=None, help="override synth.locations")
    p.add_argument("--seed", type=int, default=None, help="override synth.seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geoloc-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help=HELP["synth"])
    p.add_argument("out", help="output folder or URI (becomes data.root)")
    _add_world_args(p)
    _add_config_args(p)
    for stage in BY_NAME.values():
        _add_config_args(sub.add_parser(stage.name, help=stage.help))
    _add_config_args(sub.add_parser("pipeline", help=HELP["pipeline"]))
    p = sub.add_parser("serve", help=HELP["serve"])
    _add_config_args(p)
    p.add_argument("--no-block", action="store_true", help="start the app and return")
    p = sub.add_parser("submit", help=HELP["submit"])
    _add_config_args(p)
    p.add_argument("--queries", required=True, help="queries file: q_00001<TAB>text per line")
    p.add_argument("--gallery", required=True, help="flat folder (or URI) of image_<8hex>.jpeg")
    p.add_argument("--out", default="submission.txt")
    p = sub.add_parser("demo", help=HELP["demo"])
    _add_config_args(p)
    _add_world_args(p)
    p = sub.add_parser("ladder", help=HELP["ladder"])
    _add_config_args(p)
    p.add_argument("--seeds", type=_seed_list, default=None, help="e.g. 0,1,2 (default: ladder.seeds)")
    p.add_argument("--aggregate-only", action="store_true",
                   help="train nothing: aggregate the seed runs already under the ladder folder as they are")
    p = sub.add_parser("plan", help=HELP["plan"])
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON (exit 1 when a fit does not fit)")
    p = sub.add_parser("rehearse", help=HELP["rehearse"])
    p.add_argument("--world", default=None, help="a GeoText-layout folder (default: a small synthetic world)")
    p.add_argument("--out", default="build/rehearsal/out", help="where rehearsal.json and job.log go")
    p.add_argument("--locations", type=int, default=10, help="locations of the synthetic world")
    p.add_argument("--no-kill", action="store_true", help="do not kill a GPU node during stage 1")
    p.add_argument("--config", default=None, help="default: configs/rehearsal.yaml of this checkout")
    return parser


def _seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds wants comma-separated integers, got {text!r}") from None


def _print(result: Any) -> None:
    if isinstance(result, str):
        print(result)
    elif result is not None:
        print(json.dumps(result, indent=2, default=str))


def _synth(cfg: Config, args: argparse.Namespace) -> Any:
    from geoloc_ray.corpus.synth import synth_from_config

    world = {k: v for k, v in (("locations", args.locations), ("seed", args.seed)) if v is not None}
    return synth_from_config(cfg.synth.model_copy(update=world), args.out)


def _serve(cfg: Config, args: argparse.Namespace) -> Any:
    from geoloc_ray.serve.app import serve_locally

    return serve_locally(cfg, block=not args.no_block)


def _submit(cfg: Config, args: argparse.Namespace) -> Any:
    from geoloc_ray.submit import run_submit

    return run_submit(cfg, args.queries, args.gallery, args.out)


def _pipeline(cfg: Config, args: argparse.Namespace) -> Any:
    from geoloc_ray.pipeline import run_pipeline

    return run_pipeline(cfg)


def _demo(cfg: Config, args: argparse.Namespace) -> Any:
    from geoloc_ray.pipeline import run_demo

    return run_demo(cfg, locations=args.locations, seed=args.seed)


def _ladder(cfg: Config, args: argparse.Namespace) -> Any:
    from geoloc_ray.ladder import run_ladder

    return run_ladder(cfg, seeds=args.seeds, train=not args.aggregate_only)


def _rehearse(cfg: Config | None, args: argparse.Namespace) -> Any:
    from pathlib import Path

    from geoloc_ray.rehearse.run import Options, rehearse

    opts = Options(out=Path(args.out).resolve(), world=Path(args.world).resolve() if args.world else None,
                   locations=args.locations, kill_stage=None if args.no_kill else "stage1")
    if args.config:
        opts.config = Path(args.config).resolve()
    report = rehearse(opts)
    if report["problems"]:
        raise RehearsalFailed("; ".join(report["problems"]) + f" (see {opts.out / 'rehearsal.json'})")
    return report


def _plan(cfg: Config, args: argparse.Namespace) -> Any:
    """Print the plan; a fit that does not fit is an error (exit 1) naming the fit and the key to change."""
    from geoloc_ray.train.plan import misfits, plan, table

    result = plan(cfg)
    print(json.dumps(result, indent=2) if args.json else table(result), flush=True)
    problems = misfits(result)
    if problems:
        raise ValueError("; ".join(problems))
    return None


class RehearsalFailed(RuntimeError):
    """The rehearsal ran but did not show what it must (job, nodes, refine, restarts, search)."""


COMMANDS = {"synth": _synth, "pipeline": _pipeline, "serve": _serve, "submit": _submit, "demo": _demo,
            "ladder": _ladder, "plan": _plan}


def run(cfg: Config, args: argparse.Namespace) -> Any:
    from geoloc_ray.runtime import use_storage

    use_storage(cfg)  # synth and submit touch storage without starting Ray
    if args.command in BY_NAME:
        return BY_NAME[args.command].run(cfg)
    return COMMANDS[args.command](cfg, args)


def log_path(cfg: Config, command: str) -> str:
    """Where a quiet run's full output goes: the run's `logs/` when local, else a local temp folder."""
    root = artifacts.logs_dir(cfg) if io.is_local(cfg.artifacts) else os.path.join(tempfile.gettempdir(),
                                                                                   "geoloc_ray_logs")
    return os.path.join(root, f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log")


def main(argv: list[str] | None = None) -> int:
    from geoloc_ray.runtime import in_ray_job

    args = build_parser().parse_args(argv)
    if args.command == "rehearse":  # its config is the checkout's rehearsal.yaml, loaded with run-time overrides
        return _run_rehearse(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it reports each SIMD build it probes
    log = None
    try:
        cfg = load_config(args.config, args.overrides)
        output: contextlib.AbstractContextManager = contextlib.nullcontext()
        # A Ray job's output is its job log (dashboard, `ray job logs`): only an interactive run goes quiet.
        if args.command in QUIET_COMMANDS and not args.verbose and not in_ray_job():
            from geoloc_ray.console import quiet

            log = log_path(cfg, args.command)
            output = quiet(log)
        with output:
            result = run(cfg, args)
    except ConfigError as exc:
        print(f"geoloc-ray: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"geoloc-ray {args.command}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if log:
            print(f"full log: {log}", file=sys.stderr)
    _print(result)
    return 0


def _run_rehearse(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = _rehearse(None, args)
    except (RehearsalFailed, FileNotFoundError, ValueError) as exc:
        print(f"geoloc-ray rehearse: error: {exc}", file=sys.stderr)
        return 1
    _print({k: report[k] for k in ("job", "nodes_started", "refine", "models", "index", "fault", "serve")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
