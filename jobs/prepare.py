"""Ray job: read, partition, clean and split texts -> prepared/{train,test}.parquet.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/prepare.py --config configs/production.yaml [--set key=value ...]
"""

import sys

from _common import run  # jobs/ is sys.path[0] when run as `python jobs/prepare.py`

if __name__ == "__main__":
    sys.exit(run("prepare"))
