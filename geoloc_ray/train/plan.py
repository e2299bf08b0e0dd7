"""The capacity planner (`geoloc-ray plan`): before anyone rents a GPU, whether every fit of the recipe fits one.

Per fit: trainable parameters, peak memory per worker and FLOPs of one step (`measure`: measured by torch on
fake tensors at the configured sizes), against `train.gpu_memory_gib` less 10% headroom; per training dataset,
the bytes one row puts in the object store (its ids: images are decoded as the batches stream) and the bytes it
decodes to (the dataset's own decode, as the Arrow block Ray stores while streaming). `train` runs it
first and refuses a fit that cannot fit, naming the key to change.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from geoloc_ray.artifacts import ALIGNED, GATE, STAGE0, UNIFIED
from geoloc_ray.config import Config, StageConfig
from geoloc_ray.train.data import Source
from geoloc_ray.train.worker_types import JobSpec

HEADROOM = 0.10  # of the GPU's memory kept free: CUDA context, the caching allocator's slack, what is not measured
GIB = 2**30


@dataclass(frozen=True)
class PlannedFit:
    job: JobSpec
    rows: int  # per worker and step
    stage: str  # the config section sizing it (train.<stage>)
    change: str  # which keys to change, and how, when it does not fit


def _fit(cfg: Config, name: str, kind: str, stage: str, **job: Any) -> PlannedFit:
    from geoloc_ray.train.run import stage_fit

    section: StageConfig = getattr(cfg.train, stage)
    spec = stage_fit(cfg, name, kind, section, Source(""), "", **job).job
    change = "lower train.batch_size"
    if stage == "stage2":
        change = ("set a smaller train.stage2.grad_cache_chunk (0 = the whole batch at once) or lower "
                  "train.stage2.batch_size")
    return PlannedFit(spec, spec.batch_size or cfg.train.batch_size, stage, change)


def recipe_fits(cfg: Config) -> list[PlannedFit]:
    """Every fit `run_train` makes, in its order, with the jobs it builds (`stage_fit`, `stage2_job`)."""
    from geoloc_ray.train.run import stage2_job

    t = cfg.train
    fits = [_fit(cfg, STAGE0, "pairs", "stage0", head=UNIFIED, image_trunk=cfg.model.train_image_trunk_in_stage0),
            _fit(cfg, UNIFIED, "pairs", "stage1", head=UNIFIED),
            _fit(cfg, ALIGNED, "pairs", "stage1", head=ALIGNED),
            _fit(cfg, GATE, "gate", "gate")]
    fits += [_fit(cfg, f"{p}-stage1", "pairs", "stage1", head=p) for p in cfg.model.platforms]
    if t.stage2.epochs > 0:
        fits += [_fit(cfg, f"{p}-stage2", "triplets", "stage2", head=p, **stage2_job(cfg))
                 for p in cfg.model.platforms]
    if t.gate_fused.epochs > 0:
        fits.append(_fit(cfg, "gate-fused", "gate_fused", "gate_fused"))
    return fits


_MEASURED: dict[tuple, Any] = {}  # this process's measurements: a plan with one key changed re-measures its fits


def _shape(cfg: Config, fit: PlannedFit) -> tuple:
    """What a fit's step depends on: fits equal in it (the experts, unified and aligned) are measured once."""
    j = fit.job
    stages = {"stage0", "stage1", "stage2", "gate", "gate_fused", "gpu_memory_gib"}  # they reach the step as `j`
    train = cfg.train.model_dump_json(exclude=stages)
    return (cfg.model.model_dump_json(), train, j.kind, fit.rows, j.image_trunk, j.text_layers, j.grad_cache_chunk,
            j.other_platform_weight is None)


def plan_fits(cfg: Config) -> dict[str, dict[str, Any]]:
    """Per fit: its measurement, the GPU it lands on and whether it fits with the headroom."""
    from geoloc_ray.train.measure import measure_step

    gpu = cfg.train.gpu_memory_gib
    first: dict[tuple, str] = {}
    out = {}
    for fit in recipe_fits(cfg):
        key = _shape(cfg, fit)
        if key not in _MEASURED:
            _MEASURED[key] = measure_step(cfg, fit.job, fit.rows)
        m = _MEASURED[key]
        first.setdefault(key, fit.job.name)
        # DDP keeps a flat copy of the gradients in its buckets (gradient_as_bucket_view is off)
        ddp = m.trainable_bytes if cfg.train.num_workers > 1 else 0
        peak = (m.peak_bytes + ddp) / GIB
        out[fit.job.name] = {
            "kind": fit.job.kind, "rows_per_worker": fit.rows, "grad_cache_chunk": fit.job.grad_cache_chunk,
            "trainable_params": m.trainable_params, "peak_gib": round(peak, 3), "ddp_buckets_gib": round(ddp / GIB, 3),
            "at_peak_gib": {k: round(v / GIB, 3) for k, v in m.at_peak.items() if v},
            "step_tflops": round(m.flops / 1e12, 3), "gpu_gib": gpu,
            "fits": gpu is None or peak <= (1 - HEADROOM) * gpu, "change": fit.change,
            "measured_as": first[key],
        }
    return out


# ----- object store rows -----------------------------------------------------------------------------------------
def _jpeg(folder: str, size: int) -> str:
    from PIL import Image

    path = os.path.join(folder, "row.jpg")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, "JPEG")
    return path


def _statements(cfg: Config) -> list[str]:
    """A row's statements for the byte count: `preprocess.max_statement_words` words each, 10 of them (captioned
    rows hold 3-10); beside the pixels they are a rounding error."""
    words = cfg.preprocess.max_statement_words
    return [" ".join(["building"] * words) for _ in range(10)]


def _uri(cfg: Config, name: str) -> str:
    """An image URI as long as the config's own (the ids rows hold them)."""
    from geoloc_ray import io

    return io.join(cfg.data.root, cfg.data.image_root, name)


def _block_bytes(batch: dict[str, Any]) -> int:
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(BlockAccessor.batch_to_block(batch)).size_bytes()


def row_bytes(cfg: Config) -> dict[str, dict[str, int]]:
    """Per training dataset, measured as the Arrow blocks Ray Data stores: `object_store_bytes_per_row`, what a row
    holds in the object store before and during a fit (pairs and mined triplets as ids: image URIs and statements;
    the gate's statements); `decoded_bytes_per_row`, a row once its images are decoded (pixels at
    `model.image.image_size`; stage 2's positive and negatives), which exists only in the blocks streaming to the
    workers, `decode_block_rows` rows a block (`decoded_block_bytes`, several in flight at once)."""
    import pyarrow as pa

    from geoloc_ray.train.data import decode_batch, decode_block_rows, decode_triplet_batch, with_text

    size, negatives = cfg.model.image.image_size, cfg.train.hard_negatives.per_query
    texts = _statements(cfg)
    text_list = np.empty(1, dtype=object)
    text_list[0] = texts
    neg_locations = [[f"{k:04d}" for k in range(1, negatives + 1)]]
    pair_ids = {"image_id": np.array(["0000/image-01.jpeg"]), "platform": np.array(["drone"]),
                "location_id": np.array(["0000"]), "texts": text_list}
    triplet_ids = {"query": np.array([texts[0]]), "location_id": np.array(["0000"]), "platform": np.array(["drone"]),
                   "neg_location_ids": neg_locations}
    with tempfile.TemporaryDirectory() as d:
        uri = _jpeg(d, size)
        pairs = decode_batch({**pair_ids, "image_uri": np.array([uri])}, size=size)
        triplets = decode_triplet_batch({**triplet_ids, "image_uri": np.array([uri]), "neg_uris": [[uri] * negatives]},
                                        size=size)
    pair_ids["image_uri"] = np.array([_uri(cfg, "0000/image-01.jpeg")])
    triplet_ids |= {"image_uri": pair_ids["image_uri"],
                    "neg_uris": [[_uri(cfg, f"{k:04d}/image-01.jpeg") for k in range(1, negatives + 1)]]}
    gate = with_text(pa.table({"texts": [texts], "platform": ["drone"], "location_id": ["0000"]}))
    out = {"texts": {"object_store_bytes_per_row": _block_bytes(gate), "decoded_bytes_per_row": 0,
                     "decode_block_rows": 0, "decoded_block_bytes": 0}}
    for name, ids, decoded, images in (("pairs", pair_ids, pairs, 1), ("triplets", triplet_ids, triplets,
                                                                        1 + negatives)):
        rows, per_row = decode_block_rows(images, size), _block_bytes(decoded)
        out[name] = {"object_store_bytes_per_row": _block_bytes(ids), "decoded_bytes_per_row": per_row,
                     "decode_block_rows": rows, "decoded_block_bytes": rows * per_row}
    return out


STAGE_ROWS = {"stage0": "pairs", "stage1": "pairs", "stage2": "triplets", "gate": "texts", "gate_fused": "pairs"}


def plan(cfg: Config) -> dict[str, Any]:
    """`geoloc-ray plan --json`: {"fits": {fit: {...}}, "rows": {stage: {"object_store_bytes_per_row", ...}}}."""
    per_dataset = row_bytes(cfg)
    stages = sorted({f.stage for f in recipe_fits(cfg)}, key=list(STAGE_ROWS).index)
    rows = {s: {"dataset": STAGE_ROWS[s], **per_dataset[STAGE_ROWS[s]]} for s in stages}
    return {"fits": plan_fits(cfg), "rows": rows, "headroom": HEADROOM}


def misfits(result: dict[str, Any]) -> list[str]:
    """One line per fit that does not fit, naming the fit and the keys to change."""
    out = []
    for name, f in result["fits"].items():
        if not f["fits"]:
            out.append(f"fit {name!r} needs {f['peak_gib']:.1f} GiB per worker, over {1 - result['headroom']:.0%} of "
                       f"train.gpu_memory_gib ({f['gpu_gib']:g} GiB): {f['change']}")
    return out


def table(result: dict[str, Any]) -> str:
    """The human report: one line per fit, then the rows' object-store bytes."""
    lines = [f"{'fit':<18}{'kind':<12}{'rows':>6}{'chunk':>7}{'trainable':>12}{'peak GiB':>10}{'GPU GiB':>9}"
             f"{'step TFLOP':>12}  fits"]
    for name, f in result["fits"].items():
        gpu = "-" if f["gpu_gib"] is None else f"{f['gpu_gib']:g}"
        lines.append(f"{name:<18}{f['kind']:<12}{f['rows_per_worker']:>6}{f['grad_cache_chunk'] or '-':>7}"
                     f"{f['trainable_params'] / 1e6:>11.1f}M{f['peak_gib']:>10.2f}{gpu:>9}{f['step_tflops']:>12.2f}"
                     f"  {'yes' if f['fits'] else 'NO'}")
    lines.append("")
    lines.append(f"{'stage':<18}{'dataset':<12}{'object store B/row':>20}{'decoded B/row':>15}"
                 f"{'streamed block':>16}")
    for s, r in result["rows"].items():
        block = f"{r['decode_block_rows']} rows {r['decoded_block_bytes'] / 2**20:.0f} MiB" if r["decode_block_rows"] else "-"
        lines.append(f"{s:<18}{r['dataset']:<12}{r['object_store_bytes_per_row']:>20,}{r['decoded_bytes_per_row']:>15,}"
                     f"{block:>16}")
    lines += [""] + (misfits(result) or [f"every fit fits with {result['headroom']:.0%} headroom"])
    return "\n".join(lines)


def check_plan(cfg: Config) -> dict[str, dict[str, Any]]:
    """`train`'s pre-flight: the fits' plan, or ValueError naming each fit that cannot fit (nothing to check
    without GPUs)."""
    if not cfg.train.use_gpu:
        return {}
    fits = plan_fits(cfg)
    problems = misfits({"fits": fits, "headroom": HEADROOM})
    if problems:
        raise ValueError("training would run out of GPU memory (geoloc-ray plan):\n  " + "\n  ".join(problems))
    return fits

