"""Stage 2's GradCache step (train/grad_cache.py): the chunked step's loss and every gradient are the one-shot
step's, whatever the chunk; dropout in the re-encoded layers replays the first pass's random state; stage 2's
own keys. The two-worker (DDP, no_sync) case runs in tests/test_train_parallel.py's single spawn."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from geoloc_ray.config import config_from_dict
from geoloc_ray.train.loop import _init_model
from geoloc_ray.train.worker_types import JobSpec

SIZE, ROWS, NEGS = 64, 7, 2  # 7 rows x (1 + 2) = 21 images


def _cfg():
    # deterministic inputs: one statement per text, no style dropout, no augmentation, fp32
    return config_from_dict({"train": {"batch_size": ROWS, "statements_per_text": 1, "style_dropout": 0.0,
                                       "bf16": False, "global_negatives": True, "cache_shard_mb": 0},
                             "preprocess": {"augment": {"enabled": False}}})


def _triplets(n: int = ROWS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"query": np.array([f"a roof of colour {i % 5} at place {i // 2}" for i in range(n)]),
            "location_id": np.array([f"{i // 2:04d}" for i in range(n)]),
            "platform": np.array([["satellite", "drone", "ground"][i % 3] for i in range(n)]),
            "pixels": rng.integers(0, 255, (n, SIZE, SIZE, 3), dtype=np.uint8),
            "neg_pixels": rng.integers(0, 255, (n, NEGS, SIZE, SIZE, 3), dtype=np.uint8),
            "neg_location_ids": np.array([[f"{900 + i:04d}", f"{800 + i:04d}"] for i in range(n)])}


@pytest.fixture(scope="module")
def model():
    return _init_model(_cfg(), JobSpec(name="s2", kind="triplets", head="drone", seed=0))


def _step(model, chunk: int, batch=None) -> tuple[float, dict[str, torch.Tensor]]:
    """One stage-2 step as the worker loop takes it (kind.run_step), on a copy of `model` in train mode."""
    from geoloc_ray.train.kinds import kind_of
    from geoloc_ray.train.steps import make_context

    cfg = _cfg()
    job = JobSpec(name="s2", kind="triplets", head="drone", grad_cache_chunk=chunk)
    m = copy.deepcopy(model).train()
    ctx = make_context(m, job, cfg, np.random.default_rng(0), "cpu", None)
    torch.manual_seed(11)  # the text layers' dropout draws the same masks in every run
    loss, _ = kind_of("triplets").run_step(ctx, _triplets() if batch is None else batch)
    return float(loss), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def _assert_same(a, b) -> None:
    assert abs(a[0] - b[0]) < 1e-5
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for name, g in b[1].items():
        torch.testing.assert_close(a[1][name], g, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("chunk", [1, 4, 7, 21, 64])  # 4 leaves a short last chunk of 21; 64 > the batch
def test_the_chunked_step_has_the_one_shot_loss_and_gradients(model, chunk):
    one_shot = _step(model, 0)
    assert any(float(g.abs().max()) > 0 for g in one_shot[1].values())
    _assert_same(_step(model, chunk), one_shot)


def _with_image_dropout(model):
    """The image head's projection behind a dropout: pass 2 must draw pass 1's masks again."""
    m = copy.deepcopy(model)
    head = m.heads["drone"].image
    head.proj = torch.nn.Sequential(torch.nn.Dropout(0.3), head.proj)
    return m


def _chunk_by_chunk_reference(model, chunk: int) -> tuple[float, dict[str, torch.Tensor]]:
    """The same step with every chunk's graph kept (no caching): the masks in the order pass 1 draws them."""
    from geoloc_ray.train import encode as enc
    from geoloc_ray.train.steps import _accuracy, _triplet_images, _triplets_contrastive, make_context

    job = JobSpec(name="s2", kind="triplets", head="drone")
    m = copy.deepcopy(model).train()
    ctx = make_context(m, job, _cfg(), np.random.default_rng(0), "cpu", None)
    batch = _triplets()
    torch.manual_seed(11)
    images, platforms = _triplet_images(batch)
    x = enc.pixels(ctx, images, platforms)
    t = enc.query_text(ctx, [str(q) for q in batch["query"]]).float()
    v = torch.cat([enc.image(ctx, x[s : s + chunk]).float() for s in range(0, len(x), chunk)])
    loss = _triplets_contrastive(ctx, batch, t, v)
    loss.backward()
    _accuracy(t, v)
    return float(loss.detach()), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def test_dropout_in_the_re_encoded_layers_sees_the_first_pass_masks(model, monkeypatch):
    import contextlib

    from geoloc_ray.train import grad_cache

    noisy = _with_image_dropout(model)
    reference = _chunk_by_chunk_reference(noisy, 4)
    _assert_same(_step(noisy, 4), reference)
    # without replaying the random state, pass 2 draws new masks: the gradients are no longer the loss's
    monkeypatch.setattr(grad_cache.RandState, "replay", lambda self: contextlib.nullcontext())
    loss, grads = _step(noisy, 4)
    assert abs(loss - reference[0]) < 1e-5  # pass 1 is untouched
    assert any(not torch.allclose(grads[n], g, atol=1e-4) for n, g in reference[1].items())


def test_the_chunked_step_leaves_the_global_generator_where_pass_one_left_it(model):
    _step(model, 4)
    after_chunked = torch.get_rng_state()
    _step(model, 0)
    assert torch.equal(after_chunked, torch.get_rng_state())  # no dropout in this model: same draws either way


def test_stage2_keys_are_stage2s_alone_and_its_batch_size_reaches_the_job(tmp_path):
    from pydantic import ValidationError

    from geoloc_ray.train.data import Source
    from geoloc_ray.train.run import scheduled, stage_fit

    cfg = config_from_dict({"train": {"batch_size": 32, "stage2": {"batch_size": 8, "grad_cache_chunk": 4}}})
    assert (cfg.train.stage2.batch_size, cfg.train.stage2.grad_cache_chunk) == (8, 4)
    default = config_from_dict({})
    assert (default.train.stage2.batch_size, default.train.stage2.grad_cache_chunk) == (None, 0)
    for stage in ("stage0", "stage1", "gate", "gate_fused"):
        with pytest.raises((ValidationError, ValueError), match="grad_cache_chunk"):
            config_from_dict({"train": {stage: {"grad_cache_chunk": 4}}})
    s2 = cfg.train.stage2
    fit = stage_fit(cfg, "drone-stage2", "triplets", s2, Source(str(tmp_path)), str(tmp_path), head="drone",
                    batch_size=s2.batch_size, grad_cache_chunk=s2.grad_cache_chunk)
    assert (fit.job.batch_size, fit.job.grad_cache_chunk) == (8, 4)
    assert scheduled(fit.job, rows=80, batch_size=fit.job.batch_size, min_steps=0).steps_per_epoch == 10


def test_a_chunked_epoch_reads_batches_of_the_stage2_size(model):
    from geoloc_ray.train.loop import make_optimizer, run_epoch
    from geoloc_ray.train.steps import make_context

    class Shard:
        def iter_batches(self, batch_size: int = 256, **_):
            rows = _triplets(10)
            for i in range(0, 10, batch_size):
                yield {k: v[i : i + batch_size] for k, v in rows.items()}

    job = JobSpec(name="s2", kind="triplets", head="drone", batch_size=5, grad_cache_chunk=4, steps_per_epoch=2)
    m = copy.deepcopy(model)
    optimizer, scheduler = make_optimizer(m, job, _cfg())
    ctx = make_context(m, job, _cfg(), np.random.default_rng(0), "cpu", Shard())
    before = copy.deepcopy(m.heads["drone"].state_dict())
    steps, totals = run_epoch(ctx, 0, optimizer, scheduler)
    assert steps == 2 and np.isfinite(totals["loss"])
    assert any(not torch.equal(before[k], v) for k, v in m.heads["drone"].state_dict().items())
