"""What every `jobs/<stage>.py` shares: the CLI's own parser, config loading and stage call, not a copy.

`ray job submit --working-dir . -- python jobs/train.py --config configs/production.yaml --set k=v` runs
exactly `geoloc-ray train --config configs/production.yaml --set k=v` inside the job. There `init_ray` finds
the job's cluster (the job supervisor sets RAY_ADDRESS) instead of starting a local instance.
"""

from __future__ import annotations

import sys

from geoloc_ray.cli import main

VERBOSE_FLAGS = ("-v", "--verbose")


def run(command: str, argv: list[str] | None = None) -> int:
    """`geoloc-ray <command> <argv>`; `-v` may come anywhere (the CLI wants it before the command)."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = [a for a in args if a in VERBOSE_FLAGS][:1]
    return main([*verbose, command, *(a for a in args if a not in VERBOSE_FLAGS)])
