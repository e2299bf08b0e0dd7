"""Gallery embedding throughput: Ray Data actor pool (`embedding.embed_images`, what `geoloc-ray index` runs) with
1 and 2 actors vs a plain single-process loop (decode + `image_vectors` in batches), same images, same model.

    python bench/data_embedding.py             # 100-location synthetic world, its test images repeated to 20k rows
    python bench/data_embedding.py --quick     # 4 locations, 256 rows, 1 actor: checks the script, measures nothing

The model is the demo architecture (MiniLM + geoloc-vit-tiny, 3 expert heads + gate) with random weights, saved
with `save_model`: throughput does not depend on training. Every side decodes the JPEGs itself (the actors get
`image_uri` rows, as in the index stage) and writes the 3-expert fused vector. An actor runs torch with 1 thread
(`ImageEmbedder`'s default), so the plain loop is timed at 1 thread (= one actor's share) and at 2 (the whole
machine). Ray's time includes a fixed cost (actor start-up, model load in each actor, scheduling); running each
pool on the full rows and on a small prefix gives both that cost and the marginal (steady) images/s:
marginal = (N - n0) / (T_N - T_n0). CPU only: see bench/README.md about the GPU row.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    Row,
    finish,
    int_list,
    local_ray,
    parse,
    parser,
    ray_worker_openmp_env,
    table,
    timed,
)

NAME = "data_embedding"
PLATFORMS = ["satellite", "drone", "ground"]


def make_gallery(root: str, locations: int, seed: int) -> list[dict[str, Any]]:
    """A synthetic world's test images as gallery rows (what the index stage embeds)."""
    from geoloc_ray.config import DataConfig
    from geoloc_ray.corpus.read import read_split
    from geoloc_ray.corpus.synth import synth_world

    synth_world(root, locations, seed, progress=False)
    records, _ = read_split(DataConfig(root=root), "test")
    return [{"image_id": r.image_id, "image_uri": r.image_uri, "platform": r.platform,
             "location_id": r.location_id} for r in records]


def repeat_rows(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """`n` rows cycling over the gallery (distinct ids): enough work to time past the fixed costs."""
    return [{**rows[i % len(rows)], "image_id": f"{rows[i % len(rows)]['image_id']}#{i // len(rows)}"}
            for i in range(n)]


def make_model(uri: str) -> None:
    """The demo architecture, 3 experts + gate, random weights, saved like a trained `models/moe`."""
    from geoloc_ray.config import load_config
    from geoloc_ray.model import build_model, save_model

    cfg = load_config()
    save_model(build_model(cfg.model, heads=PLATFORMS, gate=True, seed=0).eval(), uri, cfg)


def plain_embed(uri: str, rows: list[dict[str, Any]], batch: int, threads: int) -> dict[str, float]:
    """One process: load the model, then decode + embed batch after batch (what one actor does, minus Ray)."""
    import numpy as np
    import torch

    from geoloc_ray.embedding import image_vectors, input_size
    from geoloc_ray.model import load_model
    from geoloc_ray.preprocess.images import decode_pixels

    torch.set_num_threads(threads)
    model, load_s = timed(lambda: load_model(uri).eval())
    size = input_size(model)

    def run(uris: list[str]) -> int:
        done = 0
        for start in range(0, len(uris), batch):
            pixels, ok = decode_pixels(uris[start : start + batch], size)
            done += len(image_vectors(model, pixels[np.asarray(ok, dtype=bool)], PLATFORMS))
        return done

    uris = [r["image_uri"] for r in rows]
    run(uris[: 2 * batch])  # warm-up: first-call allocations, as an actor's first batches pay them too
    done, seconds = timed(run, uris)
    if done != len(rows):
        raise RuntimeError(f"embedded {done} of {len(rows)} rows")
    return {"threads": threads, "n": done, "model_load_s": load_s, "seconds": seconds,
            "images_per_s": done / seconds}


def ray_embed(uri: str, rows: list[dict[str, Any]], actors: int, actor_cpus: float, batch: int) -> float:
    """Seconds for `embed_images` over the rows (a fresh actor pool: start-up and model loads included)."""
    import ray.data

    from geoloc_ray.config import ActorPool, IndexConfig
    from geoloc_ray.embedding import embed_images

    ic = IndexConfig(actors=ActorPool(count=actors, num_cpus=actor_cpus, batch_size=batch))
    # Blocks of 4 batches: whole batches per actor call, and enough blocks to keep every actor busy.
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // (4 * batch)))
    frame, seconds = timed(embed_images, ds, {"embedding": (uri, PLATFORMS)}, ic)
    if len(frame) != len(rows):
        raise RuntimeError(f"embedded {len(frame)} of {len(rows)} rows")
    return seconds


def ray_pool(uri: str, rows: list[dict[str, Any]], actors: int, args) -> dict[str, float]:
    """Full rows and a small prefix through the same pool size: wall images/s, fixed cost, marginal images/s."""
    small = rows[: args.prefix]
    t_small = ray_embed(uri, small, actors, args.actor_cpus, args.batch)
    t_full = ray_embed(uri, rows, actors, args.actor_cpus, args.batch)
    # Noise can make the prefix run the slower one (--quick): then there is no marginal rate to report.
    marginal = (len(rows) - len(small)) / (t_full - t_small) if t_full > t_small else None
    return {"actors": actors, "actor_cpus": args.actor_cpus, "n": len(rows), "seconds": t_full,
            "wall_images_per_s": len(rows) / t_full, "prefix_n": len(small), "prefix_seconds": t_small,
            "marginal_images_per_s": marginal,
            "fixed_cost_s": t_small - len(small) / marginal if marginal else None}


def _pool_text(pool: dict, base: dict) -> str:
    wall = f"wall {pool['wall_images_per_s']:.0f} img/s"
    if not pool["marginal_images_per_s"]:
        return f"{wall}; no marginal rate (the prefix run was not faster: noise or too few images)"
    r = pool["marginal_images_per_s"] / base["images_per_s"]
    return (f"{r:.2f}x marginal ({pool['marginal_images_per_s']:.0f} vs {base['images_per_s']:.0f} img/s); "
            f"{wall} incl. {pool['fixed_cost_s']:.1f} s fixed cost")


def _quiet_ray_data() -> None:
    """No per-dataset progress logging in the middle of the tables."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def rows_for(plain: dict[int, dict], pools: list[dict]) -> list[Row]:
    """Each pool against the plain loop with as many threads as the pool has actors (1 thread per actor)."""
    out = []
    for pool in pools:
        base = plain.get(pool["actors"]) or plain[max(plain)]
        out.append(Row(f"Ray Data embedding, {pool['actors']} actor(s) x {pool['actor_cpus']} CPU vs plain loop at "
                       f"{base['threads']} thread(s), {pool['n']} images", "report", _pool_text(pool, base), None))
    if len(pools) > 1 and pools[0]["marginal_images_per_s"] and pools[-1]["marginal_images_per_s"]:
        one, many = pools[0], pools[-1]
        out.append(Row(f"Ray Data scaling, {many['actors']} vs {one['actors']} actor(s)", "report",
                       f"{many['marginal_images_per_s'] / one['marginal_images_per_s']:.2f}x marginal images/s", None))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--locations", type=int, default=100, help="synthetic world size (its test split is the gallery)")
    p.add_argument("--images", type=int, default=20_000, help="rows to embed (the gallery repeated)")
    p.add_argument("--prefix", type=int, default=1_024, help="rows of the small run that measures fixed costs")
    p.add_argument("--batch", type=int, default=64, help="index.actors.batch_size")
    p.add_argument("--actors", type=int_list, default=int_list("1,2"), help="actor pool sizes")
    p.add_argument("--actor-cpus", type=float, default=0.5, help="index.actors.num_cpus")
    p.add_argument("--threads", type=int_list, default=int_list("1,2"), help="plain-loop torch threads")
    p.add_argument("--seed", type=int, default=0)
    args = parse(p, argv, {"locations": 4, "images": 256, "prefix": 64, "actors": [1], "threads": [1]})
    ray_worker_openmp_env(args.omp_passive)  # before torch loads OpenMP
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        gallery = make_gallery(f"{tmp}/world", args.locations, args.seed)
        rows = repeat_rows(gallery, args.images)
        uri = f"{tmp}/model"
        make_model(uri)
        plain = {t: plain_embed(uri, rows, args.batch, t) for t in args.threads}
        print(table(list(plain.values())), flush=True)
        with local_ray():
            _quiet_ray_data()
            pools = [ray_pool(uri, rows, a, args) for a in args.actors]
        print(table(pools), flush=True)
    results = {"gallery_images": len(gallery), "rows": len(rows), "plain": list(plain.values()), "ray": pools}
    finish(NAME, args, started, results, rows_for(plain, pools))
    return results


if __name__ == "__main__":
    main()
