"""The model library on the embedded default: real MiniLM text tower + the registered tiny ViT, on the CPU."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from geoloc_ray.config import AugmentConfig, ModelConfig, TextTowerConfig  # noqa: E402
from tests.helpers import assert_close_scaled  # noqa: E402

PLATFORMS = ["satellite", "drone", "ground"]
TEXTS = ["a tall white office tower with a flat roof", "red brick house", "a stadium next to a river and a park"]


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    torch.set_num_threads(2)
    return ModelConfig()


@pytest.fixture(scope="module")
def moe(cfg):
    from geoloc_ray.model import build_model

    return build_model(cfg, heads=PLATFORMS, gate=True, seed=0).eval()


@pytest.fixture(scope="module")
def pixels(cfg):
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, cfg.image.image_size, cfg.image.image_size, generator=g)


def test_import_is_light():
    code = "import sys, geoloc_ray.model as m; m.__all__; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_tokenizer_has_vocabulary(moe):
    assert len(moe.tokenizer) > 30000
    batch = moe.tokenize(TEXTS)
    assert batch["input_ids"].shape[0] == 3 and int(batch["input_ids"].max()) < len(moe.tokenizer)


def test_folder_without_tokenizer_files_is_refused(tmp_path):
    from geoloc_ray.model.text_tower import load_text_encoder, resolve_text_path

    src = resolve_text_path("minilm")
    (tmp_path / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    os.symlink(os.path.join(src, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no vocabulary"):
        load_text_encoder(TextTowerConfig(path=str(tmp_path)))


def test_text_split_reproduces_the_encoder(cfg):
    from geoloc_ray.model.text_tower import load_text_encoder, split_text_encoder

    encoder, tokenizer = load_text_encoder(cfg.text)
    full = copy.deepcopy(encoder).eval()
    trunk, tail = split_text_encoder(encoder, cfg.text.expert_layers, cfg.text.pooling)
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))  # padded rows exercise the mask
    assert len(trunk.layers) == 4 and len(tail.layers) == 2
    with torch.no_grad():
        expected = full(**batch).last_hidden_state
        got = tail.eval().hidden(trunk.eval()(batch))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_image_split_reproduces_the_vit(cfg, pixels):
    from geoloc_ray.model.image_tower import build_visual, split_visual

    visual, _ = build_visual(cfg.image)
    full = copy.deepcopy(visual).eval()
    full.proj = None  # compare the pooled feature the head projects
    trunk, tail = split_visual(visual, cfg.image.expert_layers)
    assert len(tail.blocks) == cfg.image.expert_layers
    with torch.no_grad():
        torch.testing.assert_close(tail.eval()(trunk.eval()(pixels)), full(pixels), rtol=0, atol=1e-6)


def test_fused_inner_product_is_the_gated_sum_of_expert_cosines(moe, pixels):
    from geoloc_ray.model import fused_scores

    with torch.no_grad():
        trunk, image_trunk = moe.text_trunk_output(TEXTS), moe.image_trunk_output(pixels)
        t = [moe.text_head(k, trunk) for k in PLATFORMS]
        v = [moe.image_head(k, image_trunk) for k in PLATFORMS]
        gallery = moe.gallery_vectors(pixels)
        for weights in ("gate", "static", [0.5, 0.3, 0.2]):
            g = moe.expert_weights(trunk, weights)
            fused = moe.fused_query(TEXTS, weights=weights) @ gallery.T
            torch.testing.assert_close(fused, fused_scores(t, v, g), rtol=1e-5, atol=1e-6)
    assert gallery.shape == (4, 3 * moe.model_cfg.embed_dim)
    torch.testing.assert_close(moe.expert_weights(trunk, "static"), torch.full((3, 3), 1 / 3))


def test_gate_is_a_distribution_over_platforms(moe):
    with torch.no_grad():
        g = moe.gate(moe.text_trunk_output(TEXTS))
    assert g.shape == (3, 3) and moe.gate.platforms == PLATFORMS
    torch.testing.assert_close(g.sum(dim=1), torch.ones(3))
    assert bool((g > 0).all())


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_a_head_step_leaves_the_trunks_untouched(moe, pixels):
    import torch.nn.functional as F

    model = copy.deepcopy(moe)
    model.set_trainable(image_trunk=False, heads=["drone"], gate=False)
    model.train()
    assert not model.text_trunk.training and not model.image_trunk.training and model.heads["drone"].training
    before = {n: _snapshot(m) for n, m in model.components()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    t, v = model.encode_text(TEXTS + ["a bridge"], "drone"), model.encode_image(pixels, "drone")
    F.cross_entropy(t @ v.T / 0.05, torch.arange(4)).backward()
    opt.step()
    for name in ("text_trunk", "image_trunk", "heads.satellite", "heads.ground", "gate"):
        module = dict(model.components())[name]
        assert all(p.grad is None for p in module.parameters()), name
        assert not _changed(before[name], module), name
    assert _changed(before["heads.drone"], model.heads["drone"])


def test_stage0_trains_the_image_trunk_but_never_the_text_trunk(moe, pixels):
    model = copy.deepcopy(moe)
    model.set_trainable(image_trunk=True, heads=["satellite"])
    (model.encode_text(TEXTS[:1], "satellite") @ model.encode_image(pixels, "satellite").T).sum().backward()
    assert all(p.grad is not None for p in model.image_trunk.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.text_trunk.parameters())


def test_parameter_counts_add_up(moe):
    c = moe.parameter_counts()
    assert c["total"] == c["trunk"] + sum(h["total"] for h in c["heads"].values()) + c["gate"]
    assert c["trainable"] == c["total"] - c["trunk"]  # fresh build: trunks frozen, heads + gate train
    assert 0 < c["trainable_fraction"] < 1


def test_trunk_outputs_cross_process_boundaries(moe, pixels):
    with torch.no_grad():
        trunk, image_trunk = moe.text_trunk_output(TEXTS), moe.image_trunk_output(pixels)
        text2, image2 = pickle.loads(pickle.dumps(trunk)), pickle.loads(pickle.dumps(image_trunk))
        torch.testing.assert_close(moe.text_head("ground", text2), moe.text_head("ground", trunk))
        torch.testing.assert_close(moe.image_head("ground", image2), moe.image_head("ground", image_trunk))
    assert len(text2) == 3 and image2.rope is None
    from geoloc_ray.model import ImageTrunkOutput, TextTrunkOutput

    with torch.no_grad():  # a batched expert deployment: per-request outputs re-batched with other lengths
        rebatched = TextTrunkOutput.cat(list(reversed(trunk.split())))
        torch.testing.assert_close(moe.text_head("ground", rebatched),
                                   moe.text_head("ground", trunk).flip(0), rtol=1e-5, atol=1e-6)
        images = ImageTrunkOutput.cat(image_trunk.split())
        torch.testing.assert_close(moe.image_head("ground", images), moe.image_head("ground", image_trunk))


def test_copy_head_is_independent(moe):
    model = copy.deepcopy(moe)
    model.copy_head("satellite", "aligned")
    with torch.no_grad():
        next(model.heads["aligned"].parameters()).add_(1.0)
    assert not torch.equal(next(model.heads["aligned"].parameters()), next(model.heads["satellite"].parameters()))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_checkpoint_round_trip(moe, pixels, tmp_path, where):
    from geoloc_ray import io
    from geoloc_ray.model import load_model, read_manifest, save_model

    uri = str(tmp_path / "ckpt") if where == "local" else f"memory://ckpt-{os.getpid()}"
    manifest = save_model(moe, uri, extra={"stage": "test"})
    loaded = load_model(uri).eval()
    with torch.no_grad():
        assert_close_scaled(loaded.fused_query(TEXTS), moe.fused_query(TEXTS))
        assert_close_scaled(loaded.gallery_vectors(pixels), moe.gallery_vectors(pixels))
    assert read_manifest(uri)["model_version"] == manifest["model_version"] == loaded.manifest["model_version"]
    assert manifest["heads"] == PLATFORMS and manifest["gate"] and manifest["extra"] == {"stage": "test"}
    assert not manifest["text_trunk"]["stored"] and len(manifest["text_trunk"]["sha256"]) == 64
    from safetensors.torch import load

    assert not any(k.startswith("text_trunk.") for k in load(io.read_bytes(io.join(uri, "model.safetensors"))))


def test_serve_style_partial_loads(moe, pixels, tmp_path):
    from geoloc_ray.model import load_head, load_model, save_model

    save_model(moe, str(tmp_path / "ckpt"))
    encoder = load_model(str(tmp_path / "ckpt"), heads=[])  # query encoder deployment: trunk + gate
    head = load_head(str(tmp_path / "ckpt"), "drone")  # expert deployment: its head only, no trunk
    assert encoder.head_names == [] and encoder.gate is not None
    with torch.no_grad():
        trunk = encoder.text_trunk_output(TEXTS)
        assert_close_scaled(encoder.gate(trunk), moe.gate(moe.text_trunk_output(TEXTS)))
        assert_close_scaled(head.text(trunk), moe.encode_text(TEXTS, "drone"))
        assert_close_scaled(head.image(moe.image_trunk_output(pixels)), moe.encode_image(pixels, "drone"))
    with pytest.raises(KeyError, match="no head"):
        load_head(str(tmp_path / "ckpt"), "unified")


def test_checkpoint_checksums_are_enforced(moe, tmp_path):
    from geoloc_ray.model import load_model, save_model
    from geoloc_ray.model.checkpoint import ChecksumError

    save_model(moe, str(tmp_path / "a"))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["weights"]["sha256"] = "0" * 64
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ChecksumError, match="weights sha256"):
        load_model(str(tmp_path / "a"))

    drifted = copy.deepcopy(moe)  # a trunk that no longer matches its pretrained source
    with torch.no_grad():
        next(drifted.text_trunk.parameters()).add_(0.01)
    save_model(drifted, str(tmp_path / "b"))
    with pytest.raises(ChecksumError, match="text trunk"):
        load_model(str(tmp_path / "b"))


def test_satellite_augmentation_keeps_shape_and_changes_pixels():
    from geoloc_ray.model import SatelliteAugment

    x = torch.rand(8, 3, 32, 32)
    out = SatelliteAugment(AugmentConfig(), seed=1)(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x) and float(out.min()) >= 0 and float(out.max()) <= 1
    torch.testing.assert_close(SatelliteAugment(AugmentConfig(), seed=1)(x), out)  # seeded: reproducible
    assert torch.equal(SatelliteAugment(AugmentConfig(enabled=False))(x), x)
    single = SatelliteAugment(AugmentConfig(brightness=0, contrast=0), seed=3)(x[0])
    assert single.shape == x[0].shape and torch.allclose(single.sum(), x[0].sum(), rtol=1e-4)  # pure geometry


def test_preprocess_resizes_and_normalises(moe):
    import numpy as np

    from geoloc_ray.model import SatelliteAugment, image_preprocess

    pre = image_preprocess(moe)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 96, 96, 3), dtype=np.uint8)
    x = pre(images, augment=SatelliteAugment(seed=0), augment_mask=[True, False])
    assert x.shape == (2, 3, pre.size, pre.size) == (2, 3, 64, 64)
    flat = np.full((1, 64, 64, 3), 255, dtype=np.uint8)
    torch.testing.assert_close(pre(flat)[0, :, 0, 0], (1 - torch.tensor(pre.mean)) / torch.tensor(pre.std))
