"""Epoch checkpoints hold only what the job trains and name the frozen rest by a hash; a resumed worker rebuilds
the rest as the job started and refuses another trunk; the model a fit exports from them is complete."""

from __future__ import annotations

import json
import os

import pytest
import torch

from geoloc_ray.config import config_from_dict
from geoloc_ray.model import build_model, load_head, load_model, save_model
from geoloc_ray.model.checkpoint import TRAINED_FILE, ChecksumError, frozen_sha256
from geoloc_ray.train.loop import STATE_FILE, _init_model, make_optimizer, read_checkpoint, restore
from geoloc_ray.train.loop import write_checkpoint as write
from geoloc_ray.train.worker_types import JobSpec

PLATFORMS = ["satellite", "drone", "ground"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A stage-1 style job (the drone head from the saved model's satellite head) after one optimizer step."""
    cfg = config_from_dict({"train": {"batch_size": 8}})
    root = tmp_path_factory.mktemp("ckpt")
    init = str(root / "init")
    save_model(build_model(cfg.model, heads=PLATFORMS, gate=True, seed=0), init, cfg)
    job = JobSpec(name="drone", kind="pairs", head="drone", init=init, init_head="satellite", epochs=2, lr=1e-2,
                  steps_per_epoch=1)
    model = _init_model(cfg, job)
    frozen = frozen_sha256(model)
    optimizer, scheduler = make_optimizer(model, job, cfg)
    for p in model.trainable_parameters():  # a step that changes every trained weight
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()
    folder = str(root / "epoch0")
    write(folder, model, optimizer, scheduler, cfg, job, 0, {"world_size": 1, "node_ids": ["n"]}, frozen)
    return cfg, job, model, frozen, folder, root


def test_the_epoch_checkpoint_holds_the_trained_head_only_and_restores_the_whole_model(run):
    from safetensors.torch import load_file

    cfg, job, trained, frozen, folder, root = run
    assert sorted(os.listdir(folder)) == sorted([TRAINED_FILE, STATE_FILE, "optimizer.pt"])
    stored = load_file(os.path.join(folder, TRAINED_FILE))
    assert stored and all(k.startswith("heads.drone.") for k in stored)
    state = json.loads(open(os.path.join(folder, STATE_FILE)).read())
    assert state["trained"] == ["heads.drone"] and state["frozen_sha256"] == frozen and state["epoch"] == 0
    full = sum(t.numel() for t in trained.state_dict().values())
    assert sum(t.numel() for t in stored.values()) < 0.5 * full  # the trunks are named, not copied

    fresh = _init_model(cfg, job)  # what a restarted worker builds
    before = zip(fresh.heads["drone"].state_dict().values(), trained.heads["drone"].state_dict().values(), strict=True)
    assert not all(torch.equal(a, b) for a, b in before)  # the step changed it: loading must bring it back
    opt_state, start, _ = read_checkpoint(folder, fresh)
    assert start == 1 and opt_state["scheduler"]["last_epoch"] == 1
    whole, state = restore(folder, cfg)
    assert state["training"] == {"world_size": 1, "node_ids": ["n"]}
    for model in (fresh, whole):
        mine, theirs = model.state_dict(), trained.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    exported = str(root / "exported")  # what a fit writes for Serve, index and eval: complete, loadable as before
    save_model(whole, exported, cfg)
    pixels = torch.rand(2, 3, whole.model_cfg.image.image_size, whole.model_cfg.image.image_size)
    with torch.no_grad():
        expected = trained.eval().encode_image(pixels, "drone")
        assert torch.allclose(load_model(exported).eval().encode_image(pixels, "drone"), expected, atol=1e-6)
        head = load_head(exported, "drone")
        assert torch.allclose(head.image(trained.image_trunk_output(pixels)), expected, atol=1e-6)


def test_a_checkpoint_refuses_another_trunk_and_stores_a_trunk_that_trains(run):
    cfg, job, _, _, folder, root = run
    other = str(root / "other-init")  # another stage 0: same architecture, other image trunk weights
    save_model(build_model(cfg.model, heads=PLATFORMS, gate=True, seed=1), other, cfg)
    with pytest.raises(ChecksumError, match="different trunk"):
        read_checkpoint(folder, _init_model(cfg, JobSpec(**{**job.to_dict(), "init": other})))

    stage0 = JobSpec(name="s0", kind="pairs", head="unified", image_trunk=True, seed=3)
    model = _init_model(cfg, stage0)
    optimizer, scheduler = make_optimizer(model, stage0, cfg)
    write(str(root / "s0"), model, optimizer, scheduler, cfg, stage0, 0)
    state = json.loads(open(os.path.join(root, "s0", STATE_FILE)).read())
    assert state["trained"] == ["image_trunk", "heads.unified"]
    restored, _ = restore(str(root / "s0"), cfg)
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
