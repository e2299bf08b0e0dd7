"""Ray job: rewrite training captions per platform (vLLM on GPU workers) -> refined/.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/refine_captions.py --config configs/production.yaml [--set key=value ...]
"""

import sys

from _common import run  # jobs/ is sys.path[0] when run as `python jobs/refine_captions.py`

if __name__ == "__main__":
    sys.exit(run("refine"))
