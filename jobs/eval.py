"""Ray job: recall@K of the four variants, per platform and under corruptions -> eval/metrics.json.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/eval.py --config configs/production.yaml [--set key=value ...]
"""

import sys

from _common import run  # jobs/ is sys.path[0] when run as `python jobs/eval.py`

if __name__ == "__main__":
    sys.exit(run("eval"))
