"""The production architecture (BGE-M3 + EVA02-L-14 @ 384 px): sizes and split on the meta device, and its code
paths (FlagEmbedding's BGE-M3 loader, open_clip's timm/EVA tower with RoPE) end to end with tiny random models."""

from __future__ import annotations

import copy
import os

import pytest

torch = pytest.importorskip("torch")

from geoloc_ray.config import ImageTowerConfig, ModelConfig, TextTowerConfig  # noqa: E402
from tests.helpers import assert_close_scaled  # noqa: E402

PLATFORMS = ["satellite", "drone", "ground"]
TEXTS = ["a glass tower beside a river", "a small church with a red roof and a square"]


def production_cfg() -> ModelConfig:
    return ModelConfig(
        text=TextTowerConfig(kind="bge_m3", path="BAAI/bge-m3", expert_layers=2, pooling="cls", max_length=64),
        image=ImageTowerConfig(model_name="EVA02-L-14", pretrained=None, image_size=384, expert_layers=4),
        embed_dim=1024, gate_hidden=512,
    )


@pytest.fixture(scope="module")
def meta_model():
    from geoloc_ray.model import build_model

    return build_model(production_cfg(), heads=PLATFORMS, gate=True, device="meta")


def test_production_sizes_on_meta(meta_model):
    m = meta_model
    assert m.device.type == "meta" and m.tokenizer is None
    c = m.parameter_counts()
    head = c["heads"]["satellite"]
    text_tail = sum(p.numel() for p in m.heads["satellite"].text.tail.parameters())
    image_tail = sum(p.numel() for p in m.heads["satellite"].image.tail.parameters())
    # One trunk + one expert's own layers = the whole pretrained tower.
    assert 540e6 < c["text_trunk"] + text_tail < 580e6  # XLM-R large (BGE-M3), no pooler
    assert 290e6 < c["image_trunk"] + image_tail < 310e6  # EVA02-L visual, no CLIP projection
    assert head["text"] == text_tail + 1024 * 1024 + 1024 and head["image"] == image_tail + 1024 * 1024 + 1024
    assert c["gate"] == 2 * 1024 + 1024 * 512 + 512 + 512 * 3 + 3
    fraction = c["trainable"] / c["total"]
    print(f"\nproduction: total {c['total'] / 1e6:.1f}M, trunk {c['trunk'] / 1e6:.1f}M, per expert "
          f"{head['total'] / 1e6:.1f}M, trainable with 3 experts + gate {c['trainable'] / 1e6:.1f}M = {fraction:.1%}")
    assert 0.15 < fraction < 0.30


def test_production_shares_text_l1_l22_and_image_l1_l20(meta_model):
    m = meta_model
    assert len(m.text_trunk.layers) == 22 and m.text_trunk.hf_config.num_hidden_layers == 24
    assert len(m.image_trunk.net.blocks) == 20
    for name in PLATFORMS:
        assert len(m.heads[name].text.tail.layers) == 2 and len(m.heads[name].image.tail.blocks) == 4
    assert m.image_trunk.net.patch_embed.grid_size == (27, 27)  # 384 px / patch 14
    assert m.text_trunk.pooling == "cls" and m.preprocess_cfg["size"] == (384, 384)


@pytest.fixture(scope="module")
def tiny_bge_m3(tmp_path_factory) -> str:
    """The rehearsal's text model: a random 4-layer XLM-R saved like BGE-M3, MiniLM's tokenizer + an eos token."""
    from geoloc_ray.model.tiny import make_tiny_bge_m3

    return make_tiny_bge_m3(str(tmp_path_factory.mktemp("tiny-bge-m3")))


def tiny_cfg(path: str) -> ModelConfig:
    return ModelConfig(
        text=TextTowerConfig(kind="bge_m3", path=path, expert_layers=2, pooling="cls", max_length=32),
        image=ImageTowerConfig(model_name="geoloc-eva-tiny", image_size=56, expert_layers=4),
        embed_dim=32, gate_hidden=16,
    )


def test_bge_m3_path_split_is_exact(tiny_bge_m3):
    from transformers import AutoModel

    from geoloc_ray.model.text_tower import load_text_encoder, split_text_encoder

    cfg = tiny_cfg(tiny_bge_m3)
    encoder, tokenizer = load_text_encoder(cfg.text)
    assert type(encoder).__name__ == "XLMRobertaModel" and tokenizer.eos_token_id is not None
    reference = AutoModel.from_pretrained(tiny_bge_m3).eval()
    trunk, tail = split_text_encoder(encoder, 2, "cls")
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
        torch.testing.assert_close(tail.eval().hidden(trunk.eval()(batch)), expected, rtol=0, atol=1e-6)


def test_eva_timm_split_carries_rope_and_is_exact():
    from geoloc_ray.model.image_tower import build_visual, split_visual

    visual, _ = build_visual(ImageTowerConfig(model_name="geoloc-eva-tiny", image_size=56, expert_layers=4))
    assert type(visual).__name__ == "TimmModel" and type(visual.trunk).__name__ == "Eva"
    net = copy.deepcopy(visual.trunk).eval()
    trunk, tail = split_visual(visual, 4)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = trunk.eval()(x)
        assert out.rope is not None and out.tokens.shape == (2, 1 + 16, 192)
        expected = net.forward_head(net.forward_features(x), pre_logits=True)
        torch.testing.assert_close(tail.eval()(out), expected, rtol=0, atol=1e-5)


def test_production_code_paths_end_to_end(tiny_bge_m3, tmp_path):
    from geoloc_ray.model import build_model, load_model, save_model

    model = build_model(tiny_cfg(tiny_bge_m3), heads=["aligned"], gate=False, seed=0).eval()
    for name in PLATFORMS:
        model.copy_head("aligned", name)
    model.add_gate()
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        query, gallery = model.fused_query(TEXTS), model.gallery_vectors(x)
        assert query.shape == (2, 96) and gallery.shape == (3, 96)
        trunk = model.text_trunk_output(TEXTS)
        expected = sum(model.gate(trunk)[:, k : k + 1] * (model.text_head(n, trunk) @ model.image_head(
            n, model.image_trunk_output(x)).T) for k, n in enumerate(PLATFORMS))
        torch.testing.assert_close(query @ gallery.T, expected, rtol=1e-5, atol=1e-6)
    save_model(model, str(tmp_path / "ckpt"))
    loaded = load_model(str(tmp_path / "ckpt")).eval()
    with torch.no_grad():
        assert_close_scaled(loaded.fused_query(TEXTS), query)
    assert os.path.getsize(tmp_path / "ckpt" / "model.safetensors") > 0


def test_expert_head_alone_from_an_eva02_checkpoint(tiny_bge_m3, tmp_path):
    """Serve's ExpertHead loads its head alone, built on the meta device: EVA02 attention's non-persistent k_bias
    must come from the checkpoint (found by the rehearsal: every expert replica failed to start)."""
    from geoloc_ray.model import build_model, load_head, save_model
    from geoloc_ray.model.checkpoint import non_persistent_buffers

    model = build_model(tiny_cfg(tiny_bge_m3), heads=["drone"], gate=False, seed=0).eval()
    assert any(k.endswith("k_bias") for k in non_persistent_buffers(model.heads["drone"]))
    save_model(model, str(tmp_path / "ckpt"))
    head = load_head(str(tmp_path / "ckpt"), "drone")
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trunk = model.image_trunk_output(x)
        torch.testing.assert_close(head.image(trunk), model.heads["drone"].image(trunk), rtol=1e-5, atol=1e-6)
        texts = model.text_trunk_output(TEXTS)
        torch.testing.assert_close(head.text(texts), model.heads["drone"].text(texts), rtol=1e-5, atol=1e-6)
