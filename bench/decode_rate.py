"""JPEG decode + resize to the tower's input size, images per second per CPU core: what sizes the CPUs of a GPU
node. The embedding and training data stages run `preprocess.images.decode_pixels` (read, decode, RGB, bicubic
resize) in Ray Data CPU map tasks, one core each; a GPU consumes what enough of them decode.

    python bench/decode_rate.py                 # 384 px from 512 and 1024 px sources, 300 images each
    python bench/decode_rate.py --quick         # 20 images: checks the script, measures nothing

The rate per core is images per CPU-second of the decoding thread (`time.thread_time`), not per wall second: on
a shared machine other jobs take wall time, not this thread's CPU time (cache and memory-bandwidth contention
still count, so a quiet machine may be a little faster). A full decode (no JPEG draft mode, what decode_pixels did
before issue 21) is timed on the same files as the baseline. The wall rate is recorded beside it. Sources are
synthetic photographs in entropy (a smooth random field plus sensor-like noise, JPEG quality 90): random noise
would compress badly and decode slower than a photo, a flat colour much faster. From the rate and a GPU's
images/s (`--gpu-images-per-s`, the anchor: EVA02-L-14 at 384 px compiled in bf16, ~1k img/s per H100) it derives
the decode cores one GPU needs: gpu rate / per-core rate.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Row, finish, int_list, parse, parser, table  # noqa: E402

NAME = "decode_rate"


def photo_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 (size, size, 3): a random 24 x 24 colour field upsampled (structure) plus noise (texture)."""
    from PIL import Image

    coarse = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    return np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)


def write_sources(folder: Path, n: int, size: int, seed: int) -> tuple[list[str], float]:
    """n JPEGs of size x size; (their paths, mean bytes per file)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{size}-{i}.jpg"
        Image.fromarray(photo_like(rng, size)).save(path, quality=90)
        paths.append(str(path))
    return paths, float(np.mean([Path(p).stat().st_size for p in paths]))


def full_decode(paths: list[str], target: int) -> tuple[np.ndarray, list[bool]]:
    """The baseline: decode_pixels before JPEG draft mode (every pixel decoded, then resized)."""
    from PIL import Image

    out = np.zeros((len(paths), target, target, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            out[i] = np.asarray(im.convert("RGB").resize((target, target), Image.BICUBIC))
    return out, [True] * len(paths)


def measure(paths: list[str], target: int, repeats: int, chunk: int, decode) -> dict[str, float]:
    """Best of `repeats` passes over `paths` through `decode` in chunks (a map task's batch)."""
    best_cpu, best_wall = math.inf, math.inf
    for _ in range(repeats):
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        for s in range(0, len(paths), chunk):
            pixels, ok = decode(paths[s : s + chunk], target)
            assert all(ok) and pixels.shape[1:] == (target, target, 3)
        best_cpu = min(best_cpu, time.thread_time() - cpu0)
        best_wall = min(best_wall, time.perf_counter() - wall0)
    return {"images_per_cpu_s": len(paths) / best_cpu, "images_per_wall_s": len(paths) / best_wall,
            "cpu_ms_per_image": 1000 * best_cpu / len(paths)}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=300, help="images per source size")
    p.add_argument("--sources", default="512,1024", help="source JPEG sizes (square), comma separated")
    p.add_argument("--target", type=int, default=384, help="the tower's input size (production: 384)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=64, help="images per decode_pixels call")
    p.add_argument("--gpu-images-per-s", type=float, default=1000.0,
                   help="what one GPU consumes (EVA02-L-14 @ 384 compiled bf16 on an H100: ~1k)")
    args = parse(p, argv, {"images": 20, "repeats": 1})
    from geoloc_ray.preprocess.images import decode_pixels

    started = time.time()
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as d:
        for size in int_list(args.sources):
            paths, mean_bytes = write_sources(Path(d), args.images, size, seed=size)
            r = measure(paths, args.target, args.repeats, args.chunk, decode_pixels)
            baseline = measure(paths, args.target, args.repeats, args.chunk, full_decode)
            r |= {"full_decode_images_per_cpu_s": baseline["images_per_cpu_s"],
                  "draft_speedup": r["images_per_cpu_s"] / baseline["images_per_cpu_s"],"source_px": size, "mean_jpeg_bytes": round(mean_bytes),
                  "cores_per_gpu": args.gpu_images_per_s / r["images_per_cpu_s"]}
            results[f"{size}->{args.target}"] = r
            rows.append(Row(f"JPEG {size} px -> {args.target} px decode + bicubic resize, per core "
                            f"(preprocess.images.decode_pixels)", "report",
                            f"{r['images_per_cpu_s']:.0f} img/CPU-s ({r['cpu_ms_per_image']:.2f} ms/img; wall "
                            f"{r['images_per_wall_s']:.0f} img/s); {r['cores_per_gpu']:.1f} cores per GPU at "
                            f"{args.gpu_images_per_s:.0f} img/s; {r['draft_speedup']:.2f}x a full decode "
                            f"({r['full_decode_images_per_cpu_s']:.0f} img/CPU-s)", None))
    print(table([{"source": k, **{c: v[c] for c in ("images_per_cpu_s", "full_decode_images_per_cpu_s",
                                                             "images_per_wall_s", "cores_per_gpu")}}
                 for k, v in results.items()]))
    finish(NAME, args, started, {"gpu_images_per_s": args.gpu_images_per_s, "sizes": results}, rows)


if __name__ == "__main__":
    main()
