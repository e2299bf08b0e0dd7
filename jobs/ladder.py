"""Ray job: the pipeline once per seed, then means, intervals and paired rung differences -> artifacts/<ladder>/.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/ladder.py --config configs/production.yaml --seeds 0,1,2 [--set key=value ...]
"""

import sys

from _common import run  # jobs/ is sys.path[0] when run as `python jobs/ladder.py`

if __name__ == "__main__":
    sys.exit(run("ladder"))
