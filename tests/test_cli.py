"""The CLI stays light: building its parser (and `--help`) imports no stage code and no torch."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from geoloc_ray.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    from geoloc_ray.cli import build_parser
    parser = build_parser()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            parser.parse_args(["--help"])
        except SystemExit:
            pass
    heavy = ("torch", "ray", "faiss", "open_clip", "pyarrow", "pandas")
    print(json.dumps({"help": out.getvalue(), "heavy": [m for m in heavy if m in sys.modules],
                      "stage_modules": sorted(m for m in sys.modules if m.startswith(
                          ("geoloc_ray.train", "geoloc_ray.eval", "geoloc_ray.index", "geoloc_ray.captions",
                           "geoloc_ray.preprocess")))}))
""")


def test_help_imports_no_torch_and_no_stage_code() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=ROOT,
                          check=True)
    seen = json.loads(proc.stdout)
    assert "plan" in seen["help"] and all(s.name in seen["help"] for s in STAGES)
    assert seen["heavy"] == []  # 'torch' not in sys.modules after build_parser() and --help
    assert seen["stage_modules"] == []


def test_every_stage_target_names_a_function() -> None:
    """The registry names its functions as strings: each must import and be callable."""
    for stage in STAGES:
        module, _, func = stage.target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), stage.target
