"""`geoloc-ray`: one thin command per pipeline stage (recipes only wire library functions)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

from geoloc_ray.config import ConfigError, load_config

STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("geoloc_ray.preprocess.prepare", "run_prepare"),
    "refine": ("geoloc_ray.captions.stage", "run_refine"),
    "train": ("geoloc_ray.train.run", "run_train"),
    "index": ("geoloc_ray.index.build", "run_index"),
    "eval": ("geoloc_ray.eval.evaluate", "run_eval"),
    "pipeline": ("geoloc_ray.pipeline", "run_pipeline"),
}
HELP = {
    "synth": "generate a procedural multi-platform world in the GeoText-1652 layout",
    "prepare": "read, partition, clean and split texts -> prepared/{train,test}.parquet",
    "refine": "rewrite training captions per platform (rules / transformers / vLLM) -> refined/",
    "train": "stage 0 (unified, aligned), three experts (stage 1, mining, stage 2), gate -> models/",
    "index": "embed the gallery with the experts and build the faiss index -> index/",
    "eval": "recall@K of the four variants, per platform and under corruptions -> eval/",
    "pipeline": "prepare -> refine -> train -> index -> eval, skipping stages that are up to date",
    "serve": "start the Ray Serve application (HTTP API + search page) for a trained run",
    "submit": "write a RoboSense Track 4 submission.txt for a queries file and a flat gallery",
    "demo": "synthesize a world, run the whole pipeline on it and print the ablation table",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: the embedded configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.batch_size=64 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geoloc-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help=HELP["synth"])
    p.add_argument("out", help="output folder or URI (becomes data.root)")
    p.add_argument("--locations", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    _add_config_args(p)
    for name in STAGES:
        _add_config_args(sub.add_parser(name, help=HELP[name]))
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
    p.add_argument("--locations", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    return parser


def _call(module: str, func: str, *args: Any, **kwargs: Any) -> Any:
    return getattr(importlib.import_module(module), func)(*args, **kwargs)


def _print(result: Any) -> None:
    if isinstance(result, str):
        print(result)
    elif result is not None:
        print(json.dumps(result, indent=2, default=str))


def run(args: argparse.Namespace) -> Any:
    cfg = load_config(args.config, args.overrides)
    from geoloc_ray.artifacts import apply_storage_options

    apply_storage_options(cfg)
    if args.command == "synth":
        s = cfg.synth
        return _call("geoloc_ray.corpus.synth", "synth_world", args.out,
                     locations=args.locations or s.locations, seed=s.seed if args.seed is None else args.seed,
                     test_fraction=s.test_fraction, drone_views=s.drone_views, ground_views=s.ground_views,
                     image_size=s.image_size, queries_per_image=s.queries_per_image)
    if args.command in STAGES:
        return _call(*STAGES[args.command], cfg)
    if args.command == "serve":
        return _call("geoloc_ray.serve.app", "serve_locally", cfg, block=not args.no_block)
    if args.command == "submit":
        return _call("geoloc_ray.submit", "run_submit", cfg, args.queries, args.gallery, args.out)
    if args.command == "demo":
        return _call("geoloc_ray.pipeline", "run_demo", cfg, locations=args.locations, seed=args.seed)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it reports each SIMD build it probes
    try:
        _print(run(args))
    except ConfigError as exc:
        print(f"geoloc-ray: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"geoloc-ray {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
