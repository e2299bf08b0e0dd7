"""bench/gpu_train.py runs on the CPU too (a GPU machine runs it on CUDA), so the script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path


def test_gpu_train_bench_steps_every_kind_and_resumes_onto_the_device(tmp_path: Path):
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(root / "bench" / "gpu_train.py"), "--device", "cpu", "--quick",
                    "--out", str(tmp_path)], check=True, timeout=900, cwd=root)
    result = json.loads((tmp_path / "gpu_train.json").read_text())
    assert result["ok"] and set(result["kinds"]) == {"pairs", "triplets", "gate", "gate_fused"}
    assert result["kinds"]["pairs"]["changed"] == ["heads.drone"] and result["kinds"]["gate"]["changed"] == ["gate"]
    assert result["resume"]["start_epoch"] == 1 and result["resume"]["state_devices"] == ["cpu"]
