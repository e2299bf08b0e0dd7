"""Embedding actor throughput: `embedding.ImageEmbedder` itself (what index, mining, eval and submit run on their
actors) on random-weight EVA02-L-14 @ 384 px, on the GPU when there is one, and its fraction of the bf16 peak.

The model (trunk + three expert image heads, random init: no model hub on the device) is saved once and loaded
by the actor class the way a Ray actor loads it, on the device it resolves to (`devices.resolve_device`), with the
actor's bf16 and `torch.compile` settings. Batches are `{"pixels": uint8}` (decoding is timed apart, on the
actor's decode threads). FLOPs per image come from torch's FlopCounterMode over the same call.

    python bench/gpu_embedding.py --out DIR                 # GPU machine: EVA02-L-14 @ 384, batches 64..256
    python bench/gpu_embedding.py --device cpu --quick      # CPU smoke run on a tiny EVA (tests run this)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a part of torch.cuda.get_device_name(); the most specific
# match wins ("H100 PCIe" before "H100", which is the SXM part). A card not here has no peak: pass one explicitly.
DATASHEET_BF16_TFLOPS = {"H200": 990.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 990.0, "A100": 312.0,
                         "L40S": 362.0}


def datasheet_peak(device_name: str) -> float | None:
    """The datasheet bf16 peak of a CUDA device by its name (None: not in the table)."""
    hits = [k for k in DATASHEET_BF16_TFLOPS if k in device_name]
    return DATASHEET_BF16_TFLOPS[max(hits, key=len)] if hits else None
PLATFORMS = ["satellite", "drone", "ground"]


def saved_model(folder: str, model_name: str, image_size: int, expert_layers: int, embed_dim: int,
                text: Any = None) -> str:
    """A random-weight PE-MoE model with this image tower, saved where the actor class can load it. `text`: its
    text tower's config (default MiniLM; the image path never runs it, but loading the model builds it)."""
    from geoloc_ray.config import ImageTowerConfig, ModelConfig, TextTowerConfig
    from geoloc_ray.model import build_model, save_model

    cfg = ModelConfig(image=ImageTowerConfig(model_name=model_name, image_size=image_size,
                                             expert_layers=expert_layers), embed_dim=embed_dim,
                      text=text or TextTowerConfig())
    uri = str(Path(folder) / "moe")
    save_model(build_model(cfg, heads=PLATFORMS, gate=False, seed=0, image_pretrained=False), uri)
    return uri


def timed_calls(embedder, batch: dict, iters: int, warmup: int) -> float:
    """Seconds per call of the actor on one batch (GPU work synchronised: the call returns numpy)."""
    for _ in range(warmup):
        embedder(dict(batch))
    t0 = time.perf_counter()
    for _ in range(iters):
        embedder(dict(batch))
    return (time.perf_counter() - t0) / iters


def flops_per_image(embedder, batch: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        embedder(dict(batch))
    return counter.get_total_flops() / len(batch["pixels"])


def decode_rate(embedder, folder: str, n: int, size: int) -> float:
    """Images/s of the actor's threaded JPEG decode (`ImageEmbedder._decode`) at the tower's input size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    uris = []
    for i in range(n):
        uris.append(str(Path(folder) / f"{i}.jpg"))
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(uris[-1], quality=90)
    t0 = time.perf_counter()
    embedder._decode(uris)
    return n / (time.perf_counter() - t0)


def matmul_tflops(n: int = 8192, iters: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu"], default="auto",
                   help="cpu hides the GPUs (as Ray does for an actor given none)")
    p.add_argument("--quick", action="store_true", help="tiny EVA at 64 px, one small batch")
    p.add_argument("--batches", default="64,128,256")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--variants", default="bf16,bf16+compile", help="actor settings: index.bf16 / index.compile")
    p.add_argument("--decode-threads", type=int, default=4)
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "out")))
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    import numpy as np
    import torch

    from geoloc_ray.devices import resolve_device
    from geoloc_ray.embedding import ImageEmbedder

    device = resolve_device("auto")
    name, size, layers, dim = ("geoloc-eva-tiny", 64, 1, 64) if args.quick else ("EVA02-L-14", 384, 4, 1024)
    batches = [4] if args.quick else [int(b) for b in args.batches.split(",")]
    iters, warmup = (1, 1) if args.quick else (args.iters, 3)
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": name,
                    "image_size": size, "torch": torch.__version__, "code": "geoloc_ray.embedding.ImageEmbedder",
                    "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        uri = saved_model(tmp, name, size, layers, dim)
        for variant in args.variants.split(","):
            embedder = ImageEmbedder({"embedding": (uri, PLATFORMS)}, bf16="bf16" in variant,
                                     compile="compile" in variant, decode_threads=args.decode_threads)
            rng = np.random.default_rng(0)
            for bs in batches:
                batch = {"pixels": rng.integers(0, 255, (bs, size, size, 3), dtype=np.uint8)}
                seconds = timed_calls(embedder, batch, iters, warmup)
                flops = flops_per_image(embedder, batch) if "compile" not in variant else None
                result["runs"].append({"variant": variant, "batch": bs, "actor_device": embedder.device,
                                       "images_per_s": bs / seconds, "gflops_per_image": (flops or 0) / 1e9})
        result["decode_images_per_s"] = decode_rate(embedder, tmp, 16 if args.quick else 256, size)
    gflops = max(r["gflops_per_image"] for r in result["runs"])
    for run in result["runs"]:
        run["gflops_per_image"] = run["gflops_per_image"] or gflops  # compile hides ops from the counter
        run["tflops"] = run["images_per_s"] * run["gflops_per_image"] / 1e3
    if device == "cuda":
        result["matmul_bf16_tflops"] = matmul_tflops()
        peak = datasheet_peak(result["device"])
        result["datasheet_bf16_tflops"] = peak
        for run in result["runs"]:
            run["fraction_of_datasheet_peak"] = run["tflops"] / peak if peak else None
            run["fraction_of_measured_matmul"] = run["tflops"] / result["matmul_bf16_tflops"]
    for run in result["runs"]:
        print(f"ImageEmbedder {run['variant']:13s} on {run['actor_device']:4s} batch {run['batch']:4d}: "
              f"{run['images_per_s']:9.1f} img/s {run['gflops_per_image']:7.1f} GFLOP/img {run['tflops']:8.2f} "
              f"TFLOP/s {run.get('fraction_of_datasheet_peak') or 0:.1%} of peak")
    print(f"decode ({args.decode_threads} threads): {result['decode_images_per_s']:.0f} img/s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_embedding.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
