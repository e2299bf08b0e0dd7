"""GPU row: image-tower embedding throughput (images/s) and its fraction of the GPU's bf16 peak.

Runs the production image path of the project (EVA02-L-14 at 384 px through open_clip, split by
`geoloc_ray.model.image_tower` into the shared trunk and three expert tails, i.e. what `gallery_vectors` runs
for indexing) with random weights (no model hub on the device), in bf16 autocast. FLOPs per image are counted
with torch's FlopCounterMode; the fraction is measured FLOP/s over the datasheet's dense bf16 peak (990 TFLOP/s
for an H200 SXM) and over a bf16 matmul measured in the same run.

    python bench/gpu_embedding.py --out DIR            # on a GPU machine (the device tool)
    python bench/gpu_embedding.py --quick              # CPU smoke test with a tiny EVA config
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATASHEET_BF16_TFLOPS = {"H200": 990.0, "H100": 990.0, "A100": 312.0}


def build_path(model_name: str, image_size: int, expert_layers: int, device: str):
    """The trunk + three expert tails + projections, as the project builds them (random init)."""
    import torch

    from geoloc_ray.config import ImageTowerConfig
    from geoloc_ray.model.heads import TowerHead
    from geoloc_ray.model.image_tower import build_visual, split_visual
    from geoloc_ray.model.text_tower import clone_tail

    cfg = ImageTowerConfig(model_name=model_name, image_size=image_size, expert_layers=expert_layers)
    visual, _ = build_visual(cfg, "cpu", load_weights=False)
    trunk, tail = split_visual(visual, expert_layers)
    heads = torch.nn.ModuleList([TowerHead(clone_tail(tail), 1024) for _ in range(3)])
    return visual.to(device).eval(), trunk.to(device).eval(), heads.to(device).eval()


def gallery_forward(trunk, heads, x):
    out = trunk(x)
    return [h(out) for h in heads]


def timed(fn, x, device: str, warmup: int, iters: int, autocast: bool = True) -> float:
    import torch

    with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
        for _ in range(warmup):
            fn(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def flops_per_image(fn, x, device: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16), counter:
        fn(x)
    return counter.get_total_flops() / len(x)


def matmul_tflops(device: str, n: int = 8192, iters: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def main(argv: list[str] | None = None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke test with the tiny EVA config")
    p.add_argument("--batches", default="64,128,256")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "out")))
    p.add_argument("--variants", default="autocast,bf16,bf16+compile",
                   help="autocast: fp32 weights under bf16 autocast (what the project runs); bf16: weights cast "
                        "to bf16; +compile: torch.compile")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    name, size, layers = ("geoloc-eva-tiny", 64, 1) if args.quick else ("EVA02-L-14", 384, 4)
    batches = [4] if args.quick else [int(b) for b in args.batches.split(",")]
    visual, trunk, heads = build_path(name, size, layers, device)
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": name,
                    "image_size": size, "torch": torch.__version__, "runs": []}
    per_image = {}
    x0 = torch.randn(2, 3, size, size, device=device)
    per_image["visual tower"] = flops_per_image(visual, x0, device)
    per_image["trunk + 3 expert tails"] = flops_per_image(lambda t: gallery_forward(trunk, heads, t), x0, device)
    for variant in args.variants.split(","):
        if "bf16" in variant and not args.quick:
            visual, trunk, heads = visual.to(torch.bfloat16), trunk.to(torch.bfloat16), heads.to(torch.bfloat16)
        paths = {"visual tower": visual,
                 "trunk + 3 expert tails": lambda t, tr=trunk, hs=heads: gallery_forward(tr, hs, t)}
        if "compile" in variant:
            paths = {k: torch.compile(v) for k, v in paths.items()}
        for bs in batches:
            x = torch.randn(bs, 3, size, size, device=device)
            x = x.to(torch.bfloat16) if "bf16" in variant and not args.quick else x
            for label, fn in paths.items():
                seconds = timed(fn, x, device, warmup=2 if args.quick else 5, iters=1 if args.quick else args.iters,
                                autocast=variant == "autocast")
                result["runs"].append({"path": label, "variant": variant, "batch": bs, "images_per_s": bs / seconds,
                                       "gflops_per_image": per_image[label] / 1e9,
                                       "tflops": per_image[label] * bs / seconds / 1e12})
    if device == "cuda":
        result["matmul_bf16_tflops"] = matmul_tflops(device)
        peak = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in result["device"]), None)
        result["datasheet_bf16_tflops"] = peak
        for run in result["runs"]:
            run["fraction_of_datasheet_peak"] = run["tflops"] / peak if peak else None
            run["fraction_of_measured_matmul"] = run["tflops"] / result["matmul_bf16_tflops"]
    for run in result["runs"]:
        print(f"{run['path']:24s} {run['variant']:13s} batch {run['batch']:4d}: {run['images_per_s']:9.1f} img/s "
              f"{run['gflops_per_image']:7.1f} GFLOP/img {run['tflops']:8.2f} TFLOP/s "
              f"{run.get('fraction_of_datasheet_peak') or 0:.1%} of peak")
    print(f"bf16 matmul 8192^3: {result.get('matmul_bf16_tflops', 0):.0f} TFLOP/s; datasheet peak "
          f"{result.get('datasheet_bf16_tflops')}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_embedding.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
