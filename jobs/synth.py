"""Ray job: write a procedural multi-platform world (GeoText-1652 layout) to the cluster's storage.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/synth.py s3://bucket/worlds/demo --locations 180 --seed 0 [--config ...]

The world is written by the job's driver; point `data.root` of the later stages at the same URI.
"""

import sys

from _common import run  # jobs/ is sys.path[0] when run as `python jobs/synth.py`

if __name__ == "__main__":
    sys.exit(run("synth"))
