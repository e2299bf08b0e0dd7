"""One GPU check, for whenever a GPU is at hand: what the capacity planner promised against what the GPU does.

Writes ONE JSON (`bench/out/gpu_check.json`, or `--out DIR`), in four parts:
- memory: per fit kind (stage 0 and stage 1 pairs, stage 2 triplets with GradCache, gate, gate_fused) the
  planner's peak per worker (`train.plan.plan_fits`: fake tensors, no GPU) against `torch.cuda.max_memory_allocated`
  of one real step at the configured sizes: the planner's own step (`train.measure`, the worker's pieces, every
  text at `model.text.max_length` tokens) on the fit's model built the same way, materialised on the GPU with
  random values. One process, no DDP: compared with the planner's peak less its DDP buckets [goal: within 15%].
  Also each step's seconds and TFLOP/s (the planner's step FLOPs / seconds) against the bf16 peak.
- embedding: `embedding.ImageEmbedder` (the actor class of index, mining and eval) on the config's image tower,
  batch `index.actors.batch_size`, `index.bf16` / `index.compile`: images/s and fraction of bf16 peak [goal >=
  50%] (bench/gpu_embedding.py's timing).
- training: one step of every kind through the train loop's own functions (bench/gpu_train.py's `one_step`) on
  the demo model: finite loss, only the kind's parts change.
- faiss: the project's exact search (`index.faiss_index.exact_search`) on the GPU, checked against the CPU.
  faiss-gpu may be absent: that is recorded, not a failure.

On the CPU (`--device cpu`) nothing is made up: memory comes from the planner alone and every measured GPU field
is null with a reason. `--quick` runs the demo profile (tiny models) at batch 8: seconds to a minute.

    python bench/gpu_check.py                                  # GPU: configs/production.yaml, under 8 minutes
    python bench/gpu_check.py --device cpu --quick             # CPU smoke run (tests/test_gpu_check.py)

The GPU machine of the device tool has torch but not this project's other packages, nor Ray (none needed here):
docs/BENCHMARKS.md says what to carry. `--text-path` names a small local text model folder (e.g. the
rehearsal's `build/rehearsal/models/bge-m3`, loaded as `kind: hf`) for the parts that load a whole model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Row, finish, parse, parser  # noqa: E402

NAME = "gpu_check"
GIB = 2**30
QUICK = ["train.batch_size=8", "train.stage2.grad_cache_chunk=4", "index.actors.batch_size=8"]
NO_GPU = "no CUDA device in this run (--device cpu): measured GPU fields need --device cuda"


def load(args: argparse.Namespace):
    """The config under check: `--config` (default production), or the demo profile at small batches (--quick)."""
    from geoloc_ray.config import load_config

    path = args.config or (None if args.quick else str(Path(__file__).resolve().parent.parent / "configs" /
                                                      "production.yaml"))
    return load_config(path, (QUICK if args.quick else []) + args.overrides)


def kind_fits(cfg) -> dict[str, Any]:
    """The first fit of each kind of the recipe (`plan.recipe_fits`): stage0, stage1, stage2, gate, gate_fused."""
    from geoloc_ray.train.plan import recipe_fits

    picked: dict[str, Any] = {}
    for fit in recipe_fits(cfg):
        picked.setdefault(fit.stage, fit)
    return picked


# ----- one real step -------------------------------------------------------------------------------------------
def materialise(model, device: str):
    """A meta-device model's storage on `device` with random values: parameters N(0, 0.02), integer buffers as
    built (position ids 0..n-1, token type ids 0), computed buffers (EVA's RoPE tables) recomputed by timm."""
    import torch

    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for name, b in model.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))
            else:
                b.zero_()
        for module in model.modules():
            if hasattr(module, "init_non_persistent_buffers"):
                module.init_non_persistent_buffers()
    return model


def real_step(cfg, fit, device: str) -> dict[str, Any]:
    """The planner's step of `fit` (train.measure) on real tensors on `device`, from the steady state the planner
    measures (AdamW moments held, gradients freed); on a GPU after a warm-up step."""
    import torch

    from geoloc_ray.train import measure, steps
    from geoloc_ray.train.loop import _set_trainable, make_optimizer, on_device

    job, rows = fit.job, fit.rows
    model = measure._meta_model(cfg, job)
    _set_trainable(model, job)
    on_device(model, job, cfg, "meta")  # the worker's dtypes, as the planner takes them
    model = materialise(model, device).train()
    optimizer, _ = make_optimizer(model, job, cfg)
    measure._steady_optimizer(model, optimizer)
    ctx = steps.make_context(model, job, cfg, np.random.default_rng(0), device, None)
    host = None  # GradCache keeps the batch's model inputs on the host and moves them chunk by chunk
    if job.kind == "triplets" and job.grad_cache_chunk:
        host = torch.randn(rows * (1 + cfg.train.hard_negatives.per_query), 3, cfg.model.image.image_size,
                           cfg.model.image.image_size)
    run = {"pairs": measure._pairs, "gate": measure._gate, "gate_fused": measure._gate_fused}

    def step() -> None:
        with torch.device(device):  # the step's own inputs (pixels, tokens, labels) are made on the device
            if job.kind == "triplets":
                measure._triplets(ctx, rows, host)
            else:
                run[job.kind](ctx, rows)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = device.startswith("cuda")
    if cuda:  # a warm-up step: lazy CUDA set-up (cuBLAS handles and workspaces, kernels) stays out of the peak
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else None
    return {"step_s": seconds, "measured_peak_gib": peak}  # the model goes with this frame: the caller frees it


def free_cached(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def memory(cfg, device: str, quick: bool, peak_tflops: float | None) -> dict[str, Any]:
    """Per fit kind: the planner's numbers, and on a GPU the real step's peak, seconds and TFLOP/s."""
    from geoloc_ray.train.plan import plan_fits

    planned = plan_fits(cfg)
    out: dict[str, Any] = {}
    for stage, fit in kind_fits(cfg).items():
        p = planned[fit.job.name]
        single = p["peak_gib"] - p["ddp_buckets_gib"]  # one process: no DDP bucket copy of the gradients
        row: dict[str, Any] = {"fit": fit.job.name, "kind": fit.job.kind, "rows_per_worker": fit.rows,
                               "grad_cache_chunk": fit.job.grad_cache_chunk, "planned_peak_gib": p["peak_gib"],
                               "planned_peak_gib_one_process": round(single, 3), "step_tflop": p["step_tflops"],
                               "measured_peak_gib": None, "ratio": None, "within_15pct": None, "step_s": None,
                               "tflops": None, "fraction_of_bf16_peak": None}
        if device.startswith("cuda") or quick:  # on the CPU only the small profile's step runs (a smoke test)
            row.update(real_step(cfg, fit, device))
            free_cached(device)  # the next kind's peak starts from an empty cache
            row["tflops"] = p["step_tflops"] / row["step_s"] if device.startswith("cuda") else None
        if row["measured_peak_gib"] is not None:
            row["ratio"] = row["measured_peak_gib"] / single
            row["within_15pct"] = abs(row["ratio"] - 1) <= 0.15
            row["fraction_of_bf16_peak"] = row["tflops"] / peak_tflops if peak_tflops else None
        else:
            row["why_null"] = NO_GPU
        out[stage] = row
    return {"fits": out}


# ----- embedding actor, training kinds, faiss ------------------------------------------------------------------
def text_tower(args: argparse.Namespace):
    """The text tower of the models saved for the embedding and training parts: `--text-path` (kind hf) or MiniLM."""
    from geoloc_ray.config import TextTowerConfig

    return TextTowerConfig(kind="hf", path=args.text_path) if args.text_path else TextTowerConfig()


def embedding(cfg, args: argparse.Namespace, device: str, peak_tflops: float | None) -> dict[str, Any]:
    """`ImageEmbedder` images/s on the config's image tower and its fraction of the bf16 peak."""
    from bench.gpu_embedding import PLATFORMS, flops_per_image, saved_model, timed_calls
    from geoloc_ray.embedding import ImageEmbedder, compile_image_path

    image, ic = cfg.model.image, cfg.index
    batch = ic.actors.batch_size
    out: dict[str, Any] = {"model": image.model_name, "image_size": image.image_size, "batch": batch,
                           "bf16": ic.bf16, "compile": ic.compile, "actor_device": None, "images_per_s": None,
                           "gflops_per_image": None, "tflops": None, "fraction_of_bf16_peak": None,
                           "meets_50pct": None}
    if device == "cpu" and not args.quick:
        return {**out, "why_null": "the configured tower at its batch is not timed on the CPU: --quick, or a GPU"}
    iters, warmup = (1, 1) if args.quick else (10, 3)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        uri = saved_model(tmp, image.model_name, image.image_size, image.expert_layers, cfg.model.embed_dim,
                          text=text_tower(args))
        embedder = ImageEmbedder({"embedding": (uri, PLATFORMS)}, torch_threads=ic.torch_threads, bf16=ic.bf16,
                                 decode_threads=ic.decode_threads, device=device)
    pixels = {"pixels": np.random.default_rng(0).integers(0, 255, (batch, image.image_size, image.image_size, 3),
                                                           dtype=np.uint8)}
    gflops = flops_per_image(embedder, pixels) / 1e9  # before compiling: compiled graphs hide their ops
    if ic.compile and embedder.device == "cuda":  # what the actor's constructor does under index.compile
        for model, heads in embedder.models.values():
            compile_image_path(model, heads)
    start = time.perf_counter()
    seconds = timed_calls(embedder, pixels, iters, warmup)  # the warm-up calls compile
    rate = batch / seconds
    out.update(actor_device=embedder.device, images_per_s=rate, gflops_per_image=gflops, tflops=rate * gflops / 1e3,
               warmup_s=time.perf_counter() - start - seconds * iters)
    if peak_tflops:
        out["fraction_of_bf16_peak"] = out["tflops"] / peak_tflops
        out["meets_50pct"] = out["fraction_of_bf16_peak"] >= 0.5
    else:
        out["why_null"] = NO_GPU if device == "cpu" else "no bf16 peak known for this GPU: pass --peak-tflops"
    return out


def training(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """One step of every kind through the train loop's functions on the demo model (bench/gpu_train.py)."""
    from bench.gpu_train import step_every_kind
    from geoloc_ray.config import load_config

    batch = 4 if args.quick else 64
    text = text_tower(args)
    cfg = load_config(None, [f"train.batch_size={batch}", "train.bf16=true", "train.cache_shard_mb=0",
                             f"model.text.kind={text.kind}", f"model.text.path={text.path}"])
    with tempfile.TemporaryDirectory(prefix="gpu-check-train-") as tmp:
        kinds, _, _ = step_every_kind(cfg, device, batch, tmp)
    return {"model": "demo", "batch": batch, "kinds": kinds,
            "ok": all(k["finite"] and k["steps"] == 1 for k in kinds.values())}


def faiss_search(cfg, quick: bool) -> dict[str, Any]:
    """The exact search mining, eval and submit share, on the GPU when faiss has one; the CPU's answer to check."""
    try:
        import faiss
    except ImportError as exc:
        return {"available": False, "why": f"faiss not importable: {exc}"}
    from geoloc_ray.index.faiss_index import exact_search, usable_gpus

    if usable_gpus() == 0:
        return {"available": False, "faiss": faiss.__version__,
                "why": "faiss sees no GPU (a faiss-cpu build, or no GPU in this run)"}
    n, nq, k = (2_000, 50, 10) if quick else (200_000, 1_000, 10)
    dim = len(cfg.model.platforms) * cfg.model.embed_dim
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((n, dim), dtype=np.float32)
    queries = rng.standard_normal((nq, dim), dtype=np.float32)
    exact_search(queries[:8], gallery, k)  # warm-up: GPU resources, kernels
    start = time.perf_counter()
    _, ids = exact_search(queries, gallery, k)
    seconds = time.perf_counter() - start
    cpu = faiss.IndexFlatIP(dim)
    cpu.add(gallery)
    _, truth = cpu.search(queries[:50], k)
    agree = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids[:50], truth, strict=True)]))
    return {"available": True, "faiss": faiss.__version__, "gpus": usable_gpus(), "gallery": n, "dim": dim,
            "queries": nq, "k": k, "seconds": seconds, "queries_per_s": nq / seconds, "agrees_with_cpu": agree}


# ----- main ----------------------------------------------------------------------------------------------------
def bf16_peak(args: argparse.Namespace, device: str) -> tuple[str | None, float | None]:
    """The GPU's name and bf16 peak: `--peak-tflops` if given, else the datasheet table by name."""
    if not device.startswith("cuda"):
        return None, None
    import torch

    from bench.gpu_embedding import datasheet_peak

    name = torch.cuda.get_device_name(device)
    return name, args.peak_tflops or datasheet_peak(name)


def rows_for(results: dict[str, Any]) -> list[Row]:
    out = []
    for stage, m in results["memory"]["fits"].items():
        measured = (f"{m['measured_peak_gib']:.2f} GiB measured vs {m['planned_peak_gib_one_process']:.2f} planned "
                    f"({m['ratio']:.2f}x)" if m["measured_peak_gib"] is not None else
                    f"planned {m['planned_peak_gib_one_process']:.2f} GiB; not measured (no GPU)")
        out.append(Row(f"{stage} ({m['fit']}, {m['kind']}): GPU peak vs planner", "within 15%", measured,
                       m["within_15pct"]))
    e = results["embedding"]
    frac = e["fraction_of_bf16_peak"]
    measured = "not run: " + e.get("why_null", "") if e["images_per_s"] is None else (
        f"{e['images_per_s']:.1f} img/s on {e['actor_device']}" + (f", {frac:.1%} of peak" if frac is not None
                                                                    else ", fraction: no GPU peak"))
    out.append(Row(f"ImageEmbedder {e['model']} @ {e['image_size']} px, batch {e['batch']}", ">= 50% of bf16 peak",
                   measured, e["meets_50pct"]))
    t = results["training"]
    out.append(Row("one step of every training kind (demo model)", "finite", str(t["ok"]), t["ok"]))
    f = results["faiss"]
    out.append(Row("faiss exact search on the GPU", "runs, agrees with the CPU",
                   f"{f['queries_per_s']:.0f} q/s, agreement {f['agrees_with_cpu']:.3f}" if f["available"]
                   else f"not run: {f['why']}", f["agrees_with_cpu"] >= 0.99 if f["available"] else None))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__)
    p.add_argument("--config", default=None, help="YAML config (default configs/production.yaml; --quick: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set index.compile=false (repeatable)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when torch sees one")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak in TFLOP/s (default: a datasheet table by device name)")
    p.add_argument("--text-path", default=None, help="a small local text model folder (kind hf) for saved models")
    args = parse(p, argv, {})
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA: the actor's `auto` sees none
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda, but torch sees no CUDA device")
    started = time.time()
    cfg = load(args)
    gpu, peak = bf16_peak(args, device)
    results: dict[str, Any] = {"device": device, "gpu": gpu, "bf16_peak_tflops": peak, "torch": torch.__version__,
                               "profile": cfg.profile}
    for part, run in (("memory", lambda: memory(cfg, device, args.quick, peak)),
                      ("embedding", lambda: embedding(cfg, args, device, peak)),
                      ("training", lambda: training(args, device)),
                      ("faiss", lambda: faiss_search(cfg, args.quick))):
        t0 = time.perf_counter()
        results[part] = run()
        results[part]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"{part}: {results[part]['wall_s']} s", flush=True)
    finish(NAME, args, started, results, rows_for(results))
    return results


if __name__ == "__main__":
    main()
