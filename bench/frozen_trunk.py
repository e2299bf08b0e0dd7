"""Parameter-efficient expert (frozen shared trunk, only the expert head trains) vs full fine-tuning: train-step
time on the same batch and model, and the trainable-parameter fractions (demo model and production on `meta`).

    python bench/frozen_trunk.py                # demo model (MiniLM + geoloc-vit-tiny), batch 64, bf16 autocast
    python bench/frozen_trunk.py --quick        # batch 8, 2 steps: checks the script, measures nothing

Both variants run one identical step function (text + image forward of one expert under bf16 autocast as the
training does, fp32 InfoNCE, backward, the project's AdamW): PE = `set_trainable(image_trunk=False,
heads=[head])` (the trunk keeps no activations and gets no gradients); full = every parameter trainable, the
text and image trunks too. Rounds alternate the two variants so that machine noise hits both alike; the step
time is the median over all timed steps. Parameter fractions come from `parameter_counts()`; production's
(BGE-M3-sized XLM-R + EVA02-L-14 at 384 px) is built on the `meta` device: counts only, nothing is timed there.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Row, finish, parse, parser, ray_worker_openmp_env, table, timed  # noqa: E402

NAME = "frozen_trunk"
PLATFORMS = ["satellite", "drone", "ground"]
_ATTRS = {
    "floors": ["two-storey", "three-storey", "tall", "low", "five-storey"],
    "colour": ["red brick", "white", "grey concrete", "glass", "yellow"],
    "roof": ["flat", "gabled", "domed", "green", "hipped"],
    "near": ["a parking lot", "a river", "a row of trees", "a football field", "a small lake", "a busy road"],
}


def make_texts(n: int, seed: int) -> list[str]:
    """Query-like training texts: 1-3 short statements joined, as the train loop's TextSampler makes them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pick = {k: v[int(rng.integers(len(v)))] for k, v in _ATTRS.items()}
        statements = [f"a {pick['floors']} {pick['colour']} building", f"it has a {pick['roof']} roof",
                      f"next to {pick['near']}"]
        out.append(", ".join(statements[: int(rng.integers(1, 4))]))
    return out


def make_variants(model, head: str) -> dict:
    """Two independent copies of the same weights: `pe` (frozen trunk) and `full` (everything trains)."""
    pe, full = copy.deepcopy(model), copy.deepcopy(model)
    pe.set_trainable(image_trunk=False, heads=[head])
    full.set_trainable(image_trunk=True, heads=[head])
    full.text_trunk.requires_grad_(True)  # set_trainable never trains the text trunk: a full fine-tune does
    return {"pe": pe.train(), "full": full.train()}


def make_step(model, cfg, head: str, tokens: dict, pixels, locations) -> Callable[[], float]:
    """One training step of `head` on a fixed batch; whatever requires grad in `model` is what trains."""
    import torch

    from geoloc_ray.train.loop import make_optimizer
    from geoloc_ray.train.losses import info_nce
    from geoloc_ray.train.worker_types import JobSpec

    job = JobSpec(name="bench", kind="pairs", head=head, epochs=1, lr=1e-5, steps_per_epoch=10_000)
    optimizer, _ = make_optimizer(model, job, cfg)

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.bf16):
            t = model.text_head(head, model.text_trunk_output(tokens))
            v = model.image_head(head, model.image_trunk_output(pixels))
        loss = info_nce(t.float(), v.float(), locations, cfg.train.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def saved_activation_mb(model, cfg, head: str, tokens: dict, pixels) -> float:
    """MiB of tensors autograd keeps for the backward pass of one forward (the memory cost of training a part)."""
    import torch

    seen: dict[tuple[int, int], int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        seen[(x.untyped_storage().data_ptr(), x.storage_offset())] = x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=cfg.train.bf16):
        model.text_head(head, model.text_trunk_output(tokens))
        model.image_head(head, model.image_trunk_output(pixels))
    return sum(seen.values()) / 2**20


def time_steps(steps: dict[str, Callable[[], float]], n_steps: int, warmup: int, rounds: int
               ) -> dict[str, list[float]]:
    """Per-step seconds of each variant; rounds alternate which variant goes first."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            for _ in range(warmup if r == 0 else 1):
                steps[name]()
            times[name] += [timed(steps[name])[1] for _ in range(n_steps)]
    return times


def fractions(counts: dict) -> dict:
    """One expert's share of a one-expert model and of the 3-expert + gate model; all experts + gate's share."""
    first = next(iter(counts["heads"].values()))
    expert = first["total"]
    trainable = sum(h["total"] for h in counts["heads"].values()) + counts["gate"]
    return {
        "total": counts["total"], "trunk": counts["trunk"], "text_trunk": counts["text_trunk"],
        "image_trunk": counts["image_trunk"], "expert": expert, "expert_text": first["text"],
        "expert_image": first["image"], "gate": counts["gate"],
        "expert_of_one_expert_model": expert / (counts["trunk"] + expert),
        "expert_of_full_model": expert / counts["total"],
        "experts_and_gate_of_full_model": trainable / counts["total"],
    }


def production_model_cfg():
    """The production architecture, as tests/test_production_arch.py builds it."""
    from geoloc_ray.config import ImageTowerConfig, ModelConfig, TextTowerConfig

    return ModelConfig(
        text=TextTowerConfig(kind="bge_m3", path="BAAI/bge-m3", expert_layers=2, pooling="cls", max_length=64),
        image=ImageTowerConfig(model_name="EVA02-L-14", pretrained=None, image_size=384, expert_layers=4),
        embed_dim=1024, gate_hidden=512,
    )


def meta_fractions(model_cfg) -> dict:
    from geoloc_ray.model import build_model

    return fractions(build_model(model_cfg, heads=PLATFORMS, gate=True, device="meta").parameter_counts())


def measure_steps(cfg, args) -> dict:
    """Build the demo one-expert model, time both variants on one batch, count their activations."""
    import torch

    from geoloc_ray.model import build_model, image_preprocess

    torch.set_num_threads(args.threads)
    model = build_model(cfg.model, heads=[args.head], gate=False, seed=0)
    tokens = model.tokenize(make_texts(args.batch, 0))
    rng = np.random.default_rng(0)
    size = image_preprocess(model).size
    pixels = image_preprocess(model)(rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8))
    locations = torch.arange(args.batch)
    variants = make_variants(model, args.head)
    steps = {name: make_step(m, cfg, args.head, tokens, pixels, locations) for name, m in variants.items()}
    times = time_steps(steps, args.steps, args.warmup, args.rounds)
    out = {}
    for name, m in variants.items():
        counts = m.parameter_counts()
        out[name] = {"median_step_s": statistics.median(times[name]), "min_step_s": min(times[name]),
                     "steps_timed": len(times[name]), "trainable": counts["trainable"], "total": counts["total"],
                     "trainable_fraction": counts["trainable_fraction"],
                     "saved_activations_mb": saved_activation_mb(m, cfg, args.head, tokens, pixels)}
    return out


def rows_for(step: dict, demo: dict, production: dict | None, args) -> list[Row]:
    pe, full = step["pe"], step["full"]
    ratio = pe["median_step_s"] / full["median_step_s"]
    rows = [
        Row(f"PE expert train step vs full fine-tune (demo model, batch {args.batch}, bf16, {args.threads} threads)",
            "<= 0.5x time", f"{ratio:.2f}x ({pe['median_step_s'] * 1e3:.0f} vs {full['median_step_s'] * 1e3:.0f} "
            f"ms/step; activations kept {pe['saved_activations_mb']:.0f} vs {full['saved_activations_mb']:.0f} MiB)",
            ratio <= 0.5),
        Row("trainable params, one PE expert of a one-expert model (demo)", "<= 15%",
            f"{pe['trainable_fraction']:.1%} ({pe['trainable'] / 1e6:.1f}M of {pe['total'] / 1e6:.1f}M)",
            pe["trainable_fraction"] <= 0.15),
        Row("trainable params, 3 experts + gate of the full model (demo)", "report",
            f"{demo['experts_and_gate_of_full_model']:.1%} (one expert {demo['expert_of_full_model']:.1%})", None),
    ]
    if production:
        rows += [
            Row("trainable params, one PE expert of a one-expert model (production, meta)", "<= 15%",
                f"{production['expert_of_one_expert_model']:.1%} ({production['expert'] / 1e6:.0f}M of "
                f"{(production['trunk'] + production['expert']) / 1e6:.0f}M)",
                production["expert_of_one_expert_model"] <= 0.15),
            Row("trainable params, 3 experts + gate of the full model (production, meta)", "report",
                f"{production['experts_and_gate_of_full_model']:.1%} of {production['total'] / 1e6:.0f}M "
                f"(one expert {production['expert_of_full_model']:.1%})", None),
        ]
    return rows


def main(argv: list[str] | None = None) -> dict:
    from geoloc_ray.config import load_config

    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the first round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (PE, full), (full, PE), ...")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--head", default="satellite")
    p.add_argument("--no-production", action="store_true", help="skip the production architecture on meta")
    args = parse(p, argv, {"batch": 8, "steps": 2, "warmup": 1, "rounds": 2})
    ray_worker_openmp_env(args.omp_passive)  # before torch / faiss load OpenMP
    started = time.time()
    cfg = load_config()  # the embedded demo profile (configs/demo.yaml)
    step = measure_steps(cfg, args)
    print(table([{"variant": k, **v} for k, v in step.items()]), flush=True)
    demo = meta_fractions(cfg.model)
    production = None if args.no_production else meta_fractions(production_model_cfg())
    print(table([{"model": k, **v} for k, v in {"demo": demo, "production": production}.items() if v]), flush=True)
    results = {"step": step, "demo_fractions": demo, "production_fractions": production,
               "step_time_ratio_pe_over_full": step["pe"]["median_step_s"] / step["full"]["median_step_s"]}
    finish(NAME, args, started, results, rows_for(step, demo, production, args))
    return results


if __name__ == "__main__":
    main()
