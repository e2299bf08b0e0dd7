"""bench/gpu_check.py runs on the CPU (a GPU machine runs it on CUDA), so the one GPU check cannot rot; on the CPU
it reports the planner's numbers and leaves every measured GPU field null with a reason, never a made-up one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_and_measures_no_gpu_numbers(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                    "--out", str(tmp_path)], check=True, timeout=1800, cwd=ROOT)
    result = json.loads((tmp_path / "gpu_check.json").read_text())["results"]
    assert result["device"] == "cpu" and result["gpu"] is None and result["bf16_peak_tflops"] is None
    fits = result["memory"]["fits"]
    assert set(fits) == {"stage0", "stage1", "stage2", "gate", "gate_fused"}
    assert fits["stage2"]["kind"] == "triplets" and fits["stage2"]["grad_cache_chunk"] > 0
    for fit in fits.values():
        assert fit["planned_peak_gib"] > 0 and fit["step_tflop"] > 0  # the planner's, measured on fake tensors
        assert fit["measured_peak_gib"] is None and fit["ratio"] is None and "--device cuda" in fit["why_null"]
        assert fit["step_s"] > 0  # the planner's step ran for real on the CPU (the code path CUDA takes)
    emb = result["embedding"]
    assert emb["actor_device"] == "cpu" and emb["images_per_s"] > 0 and emb["fraction_of_bf16_peak"] is None
    assert result["training"]["ok"] and set(result["training"]["kinds"]) == {"pairs", "triplets", "gate",
                                                                              "gate_fused"}
    assert result["faiss"]["available"] is False and result["faiss"]["why"]
