"""Ray job: embed the gallery with the experts, build the (sharded IVF-PQ) faiss index -> index/.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/index.py --config configs/production.yaml [--set key=value ...]
"""

import sys

from _common import run  # jobs/ is sys.path[0] when run as `python jobs/index.py`

if __name__ == "__main__":
    sys.exit(run("index"))
