"""configs/rehearsal.yaml is configs/production.yaml scaled down in size only: the two files, read raw and
flattened to dotted keys, differ only in the keys named here. Any other difference (a stage switched to another
backend, a GPU request dropped, a check turned off) fails, so the rehearsal keeps proving production's path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PRODUCTION, REHEARSAL = REPO / "configs" / "production.yaml", REPO / "configs" / "rehearsal.yaml"
LEAVES = {"runtime_env", "storage_options"}  # compared whole: their inner keys are one setting

# What the rehearsal is and where it runs: its name, CPU compute under production's GPU requests, its bucket,
# its local tiny models, and vLLM built for CPUs (its own venv, an eager engine) instead of production's pip env.
WHERE = {"profile", "device", "artifacts", "data.root", "model.text.path", "model.image.pretrained",
         "refine.vllm.model", "refine.vllm.runtime_env", "refine.vllm.enforce_eager"}
# Sizes: model widths and depths, image size, batches, epochs, generation lengths, actors/replicas, CPUs each.
SIZES = {"model.image.model_name", "model.image.image_size", "model.embed_dim", "model.gate_hidden",
         "train.num_workers", "train.cpus_per_worker", "train.batch_size", "train.stage0.epochs",
         "train.stage2.epochs", "train.gate.epochs", "train.gate_fused.epochs",
         "train.stage1.min_steps", "train.stage2.min_steps", "train.stage2.batch_size", "train.stage2.grad_cache_chunk",
         "refine.max_new_tokens", "refine.actors.batch_size", "refine.actors.num_cpus", "refine.vllm.concurrency",
         "refine.vllm.batch_size", "refine.vllm.max_model_len", "index.actors.batch_size", "index.text_batch_size",
         "index.actors.count", "serve.num_cpus", "serve.replicas.encoder", "serve.replicas.expert",
         "serve.replicas.shard"}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key not in LEAVES:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing() -> dict[str, tuple[Any, Any]]:
    prod, rehearsal = (flatten(yaml.safe_load(p.read_text())) for p in (PRODUCTION, REHEARSAL))
    missing = "<absent>"
    return {k: (prod.get(k, missing), rehearsal.get(k, missing)) for k in sorted(prod.keys() | rehearsal.keys())
            if prod.get(k, missing) != rehearsal.get(k, missing)}


def test_rehearsal_differs_from_production_in_sizes_only():
    diff = differing()
    other = {k: v for k, v in diff.items() if k not in WHERE | SIZES}
    assert not other, f"configs/rehearsal.yaml departs from production.yaml outside the size keys: {other}"
    stale = (WHERE | SIZES) - diff.keys()
    assert not stale, f"named as differing but equal to production (drop them from the list): {sorted(stale)}"


def test_rehearsal_keeps_production_families_and_requests():
    from geoloc_ray.config import load_config

    prod, cfg = load_config(PRODUCTION), load_config(REHEARSAL)  # both valid configs
    assert (cfg.profile, cfg.device, prod.device) == ("rehearsal", "cpu", "auto")
    assert cfg.model.image.model_name.startswith("EVA02-") and prod.model.image.model_name.startswith("EVA02-")
    assert cfg.model.text.kind == "bge_m3" and cfg.refine.backend == "vllm"
    for c in (cfg, prod):  # what makes it production's path, held by the equality above; said here by name
        assert c.artifacts.startswith("s3://") and c.data.root.startswith("s3://")
        assert (c.index.kind, c.index.shards) == ("ivf", 4) and c.index.actors.num_gpus > 0 and c.serve.num_gpus > 0
        assert c.train.use_gpu and c.train.global_negatives and c.train.checkpoint_every_epochs == 1
    assert cfg.train.num_workers == 2  # stage 0 data-parallel over two GPU nodes
    assert cfg.train.stage1.epochs >= 3  # a node is killed after stage 1's first checkpoint: it must resume
    assert cfg.train.max_failures >= 1


def test_rehearsal_model_keeps_the_split_rule(tmp_path):
    """Production shares text L1-L22 of 24 and image L1-L20 of 24 (`expert_layers` 2 and 4): the rehearsal's
    tiny models keep those keys, so each expert owns the last 2 text layers and the last 4 EVA02 blocks."""
    from geoloc_ray.config import load_config
    from geoloc_ray.model import build_model
    from geoloc_ray.model.tiny import make_tiny_bge_m3

    text = make_tiny_bge_m3(str(tmp_path / "bge-m3"))
    cfg = load_config(REHEARSAL, [f"model.text.path={text}"])
    model = build_model(cfg.model, heads=["satellite"], gate=True, seed=0)
    head = model.heads["satellite"]
    assert (len(model.text_trunk.layers), len(head.text.tail.layers)) == (2, 2)
    assert (len(model.image_trunk.net.blocks), len(head.image.tail.blocks)) == (8, 4)
    assert type(model.image_trunk.net).__name__ == "Eva" and type(model.text_trunk.hf_config).__name__ == (
        "XLMRobertaConfig")
    assert len(model.tokenizer) > 1000 and model.tokenizer.eos_token_id is not None


def test_rehearsal_index_on_a_tiny_gallery_is_exact():
    """IVF, 4 shards, nlist auto on a few dozen images: each shard's lists are capped by its vectors (faiss wants
    39 training points per list), so probing them all equals exact search."""
    from geoloc_ray.config import load_config
    from geoloc_ray.index.faiss_index import (
        build_index,
        choose_spec,
        exact_search,
        merge_topk,
        search,
        shard_rows,
    )

    ic = load_config(REHEARSAL).index
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((45, 3 * 64)).astype(np.float32)
    queries = rng.standard_normal((6, 3 * 64)).astype(np.float32)
    parts = shard_rows(len(gallery), ic.shards)
    spec = choose_spec(max(len(p) for p in parts), gallery.shape[1], ic)
    assert spec.factory == "IVF1,Flat" and spec.nprobe == 1
    found = []
    for rows in parts:
        scores, ids = search(build_index(gallery[rows], spec, ic.train_sample), queries, 10)
        found.append((scores, np.where(ids >= 0, ids + rows[0], -1)))
    scores, ids = merge_topk(found, 10)
    exact_scores, exact_ids = exact_search(queries, gallery, 10)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)


@pytest.mark.parametrize("path", [PRODUCTION, REHEARSAL])
def test_serve_section_fits_serve_args(path):
    from geoloc_ray.config import load_config
    from geoloc_ray.serve.settings import AppArgs

    cfg = load_config(path)
    assert AppArgs.from_config(cfg).device == cfg.device
