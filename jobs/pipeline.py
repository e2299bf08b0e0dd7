"""Ray job: prepare -> refine -> train -> index -> eval, skipping the stages that are up to date.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pipeline.py --config configs/production.yaml [--set key=value ...]
"""

import sys

from _common import run  # jobs/ is sys.path[0] when run as `python jobs/pipeline.py`

if __name__ == "__main__":
    sys.exit(run("pipeline"))
