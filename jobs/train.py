"""Ray job: stage 0, the three experts (stage 1, hard-negative mining, stage 2) and the gate -> models/.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py --config configs/production.yaml [--set key=value ...]
"""

import sys

from _common import run  # jobs/ is sys.path[0] when run as `python jobs/train.py`

if __name__ == "__main__":
    sys.exit(run("train"))
