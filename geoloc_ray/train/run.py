"""The training recipe.

stage 0: `unified` on all platforms and the original captions (in the embedded default this also trains the
image trunk from scratch; afterwards the trunk is frozen, as a pretrained trunk is in production).
stage 1, heads on the frozen trunk, in parallel: `unified` (the stage-0 head continued on the original captions),
`aligned` (the same start, on the refined captions) and the gate; then the three platform experts, each
specialising the aligned head on its platform's refined captions. Then hard-negative mining with the stage-1
experts, and stage 2 for the experts. `unified` and `aligned` get the same stage-1 budget, so the ladder
compares text sources, not training length.

Every model lands in `models/<name>/` (safetensors + manifest). A model whose manifest carries the current
training hash is reused, so a resumed job redoes only what is missing.
"""

from __future__ import annotations

import logging
from typing import Any

from geoloc_ray import artifacts, io
from geoloc_ray.config import Config, config_hash
from geoloc_ray.train.fit import fit_concurrently
from geoloc_ray.train.loop import JobSpec

log = logging.getLogger(__name__)

TRAIN_SECTIONS = ["data", "preprocess", "refine", "model", "train", "seed"]


def _is_done(uri: str, train_hash: str) -> bool:
    manifest = io.join(uri, "manifest.json")
    return io.exists(manifest) and io.read_json(manifest).get("extra", {}).get("train_hash") == train_hash


def _round(cfg: Config, train_hash: str, specs: list[tuple[JobSpec, Any, str]], min_steps: int = 0
           ) -> dict[str, Any]:
    """Fit the specs whose model is not up to date, concurrently; returns metrics per job."""
    todo = []
    for job, make_dataset, out in specs:
        if _is_done(out, train_hash):
            log.info("%s: up to date at %s, skipped", job.name, out)
            continue
        dataset = make_dataset()
        job.steps_per_epoch = max(1, -(-dataset.count() // cfg.train.batch_size))
        if job.kind != "gate":
            job.epochs = max(job.epochs, -(-min_steps // job.steps_per_epoch))
        todo.append((job, dataset, f"{job.name}-{train_hash}", out))
    if not todo:
        return {}
    results = fit_concurrently(cfg, todo, cfg.train.num_workers, extra={"train_hash": train_hash})
    return {r.job: r.metrics for r in results}


def _image_size(cfg: Config) -> int:
    if cfg.model.image.image_size is None:
        raise ValueError("model.image.image_size must be set for training (the decode size)")
    return cfg.model.image.image_size


def run_train(cfg: Config) -> dict[str, Any]:
    """All training rounds; returns per-job metrics and where the models are."""
    from geoloc_ray.runtime import init_ray
    from geoloc_ray.train import data
    from geoloc_ray.train.mining import mine_hard_negatives

    artifacts.apply_storage_options(cfg)
    init_ray(cfg)
    prepared, refined = artifacts.prepared(cfg, "train"), artifacts.refined_train(cfg)
    for uri, stage in ((prepared, "prepare"), (refined, "refine")):
        if not io.exists(uri):
            raise FileNotFoundError(f"{uri} not found: run `geoloc-ray {stage}` first")
    h = config_hash(cfg, TRAIN_SECTIONS)
    size, t, seed = _image_size(cfg), cfg.train, cfg.seed
    held_out = data.split_locations(io.read_parquet(prepared, columns=["location_id"])["location_id"],
                                    t.val_fraction)
    names = ("stage0", "unified", "aligned", "gate", "moe")
    models = {name: artifacts.model_dir(cfg, name) for name in names}
    metrics: dict[str, Any] = {}

    stage0 = JobSpec(name="stage0", kind="pairs", head="unified", image_trunk=cfg.model.train_image_trunk_in_stage0,
                     text_layers=t.stage0.train_text_layers, epochs=t.stage0.epochs, lr=t.stage0.lr, seed=seed)
    metrics.update(_round(cfg, h, [(stage0, lambda: data.pairs_dataset(prepared, size, exclude=held_out),
                                     models["stage0"])], t.stage0.min_steps))

    platforms = list(cfg.model.platforms)
    stage1_uri = {p: artifacts.model_dir(cfg, f"experts/{p}-stage1") for p in platforms}

    def head_job(name: str, uri: str, platforms_: list[str] | None, init: str, init_head: str, out: str):
        job = JobSpec(name=f"{name}-stage1" if platforms_ else name, kind="pairs", head=name, init=init,
                      init_head=init_head, epochs=t.stage1.epochs, lr=t.stage1.lr,
                      text_layers=t.stage1.train_text_layers, seed=seed)
        return job, (lambda: data.pairs_dataset(uri, size, platforms=platforms_, exclude=held_out)), out

    heads = [head_job("unified", prepared, None, models["stage0"], "unified", models["unified"]),
             head_job("aligned", refined, None, models["stage0"], "unified", models["aligned"]),
             (JobSpec(name="gate", kind="gate", init=models["stage0"], epochs=t.gate.epochs, lr=t.gate.lr,
                      seed=seed), lambda: data.texts_dataset(refined, exclude=held_out), models["gate"])]
    metrics.update(_round(cfg, h, heads, t.stage1.min_steps))
    # Each expert specialises the aligned head on its platform's subset.
    experts = [head_job(p, refined, [p], models["aligned"], "aligned", stage1_uri[p]) for p in platforms]
    metrics.update(_round(cfg, h, experts, t.stage1.min_steps))

    final_uri = stage1_uri
    if t.stage2.epochs > 0:
        stage2_uri = {p: artifacts.model_dir(cfg, f"experts/{p}-stage2") for p in platforms}
        mined = {p: artifacts.artifact(cfg, "mined", f"{p}.parquet") for p in platforms}
        if not all(_is_done(stage2_uri[p], h) for p in platforms):
            metrics["mining"] = mine_hard_negatives(cfg, stage1_uri, refined, mined, exclude=held_out)
        round2 = [
            (JobSpec(name=f"{p}-stage2", kind="triplets", head=p, init=stage1_uri[p], epochs=t.stage2.epochs,
                     lr=t.stage2.lr, text_layers=t.stage2.train_text_layers, seed=seed),
             lambda p=p: data.triplets_dataset(mined[p], size), stage2_uri[p])
            for p in platforms
        ]
        metrics.update(_round(cfg, h, round2, t.stage2.min_steps))
        final_uri = stage2_uri

    if t.gate_fused.epochs > 0 and held_out:
        untuned = artifacts.model_dir(cfg, "moe-untuned")
        assemble_moe(cfg, [final_uri[p] for p in platforms], models["gate"], untuned, h)
        tune = JobSpec(name="gate-fused", kind="gate_fused", init=untuned, epochs=t.gate_fused.epochs,
                       lr=t.gate_fused.lr, seed=seed)
        metrics.update(_round(cfg, h, [(tune, lambda: data.pairs_dataset(refined, size, locations=held_out),
                                        models["moe"])]))
    else:
        assemble_moe(cfg, [final_uri[p] for p in platforms], models["gate"], models["moe"], h)
    return {"train_hash": h, "held_out_locations": len(held_out), "models": {**models, "experts": final_uri},
            "metrics": metrics}


def assemble_moe(cfg: Config, expert_uris: list[str], gate_uri: str, out_uri: str, train_hash: str) -> None:
    """One model = the shared trunk + the three expert heads + the gate (what index and serve load)."""
    import torch

    from geoloc_ray.model import load_model, save_model

    experts = [load_model(u) for u in expert_uris]
    moe = experts[0]
    reference = moe.image_trunk.state_dict()
    for other in experts[1:]:
        for key, tensor in other.image_trunk.state_dict().items():
            if not torch.equal(tensor, reference[key]):
                raise ValueError(f"experts do not share the image trunk ({key} differs): retrain from one stage 0")
        for name in other.head_names:
            moe.heads[name] = other.heads[name]
    moe.gate = load_model(gate_uri).gate
    save_model(moe, out_uri, cfg, extra={"experts": moe.head_names, "train_hash": train_hash,
                                         "sources": {"experts": expert_uris, "gate": gate_uri}})
