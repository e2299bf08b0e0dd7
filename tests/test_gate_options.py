"""The gate's options for issue 22's arms: a temperature on the MoE's routing, the fused tuning's prior (platform
gate or equal weights), and the hash that lets a gate-only change reuse every model before the gate."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_gate_routes_with_softmax_of_logits_over_its_temperature():
    from geoloc_ray.model.heads import Gate

    torch.manual_seed(0)
    cold, warm = Gate(8, 16, ["a", "b", "c"]), Gate(8, 16, ["a", "b", "c"], temperature=4.0)
    warm.load_state_dict(cold.state_dict())
    x = torch.randn(5, 8)
    logits = cold.logits(x)
    torch.testing.assert_close(cold(x), logits.softmax(-1))
    torch.testing.assert_close(warm(x), (logits / 4.0).softmax(-1))
    torch.testing.assert_close(warm.scaled(logits), logits / 4.0)
    # softer: every row's weights lie closer to 1/K than at T = 1
    assert ((warm(x) - 1 / 3).abs().amax(1) < (cold(x) - 1 / 3).abs().amax(1)).all()
    with pytest.raises(ValueError, match="temperature"):
        Gate(8, 16, ["a"], temperature=0.0)


def test_gate_temperature_is_saved_and_the_moe_takes_the_configs(tmp_path):
    from geoloc_ray.config import Config, ModelConfig
    from geoloc_ray.model import assemble_moe, build_model, load_model, save_model

    model_cfg = ModelConfig(platforms=["satellite", "drone"])
    expert = build_model(model_cfg, heads=["satellite", "drone"], gate=False, seed=0)
    gate = build_model(model_cfg, heads=[], gate=True, seed=0)
    save_model(expert, str(tmp_path / "expert"))
    save_model(gate, str(tmp_path / "gate"))
    assert load_model(str(tmp_path / "gate")).gate.temperature == 1.0
    cfg = Config(model=model_cfg.model_copy(update={"gate_temperature": 2.5}))
    manifest = assemble_moe([str(tmp_path / "expert")], str(tmp_path / "gate"), str(tmp_path / "moe"), cfg)
    assert manifest["model_config"]["gate_temperature"] == 2.5
    moe = load_model(str(tmp_path / "moe"))
    assert moe.gate.temperature == 2.5
    trunk = torch.randn(3, moe.text_width)
    torch.testing.assert_close(moe.gate(trunk), (moe.gate.logits(trunk) / 2.5).softmax(-1))


def test_fused_tuning_prior_is_the_starting_gate_or_equal_weights():
    from geoloc_ray.model.heads import Gate
    from geoloc_ray.train.losses import gate_anchor
    from geoloc_ray.train.steps import anchor_weights

    torch.manual_seed(1)
    gate, x = Gate(8, 16, ["a", "b", "c"], temperature=2.0), torch.randn(4, 8)
    torch.testing.assert_close(anchor_weights("platform_gate", gate, x), gate(x))
    torch.testing.assert_close(anchor_weights("equal", gate, x), torch.full((4, 3), 1 / 3))
    # the KL term is zero exactly where the routed weights are the prior's
    assert gate_anchor(torch.zeros(4, 3), anchor_weights("equal", gate, x)).abs() < 1e-6
    assert gate_anchor(gate.scaled(gate.logits(x)), anchor_weights("platform_gate", gate, x)).abs() < 1e-6
    assert gate_anchor(gate.scaled(gate.logits(x)), anchor_weights("equal", gate, x)) > 0
    with pytest.raises(ValueError, match="gate_fused_prior"):
        anchor_weights("oracle", gate, x)


def test_config_accepts_the_gate_options_and_rejects_bad_values():
    from pydantic import ValidationError

    from geoloc_ray.config import config_from_dict

    cfg = config_from_dict({"train": {"gate_fused_prior": "equal"}, "model": {"gate_temperature": 3.0},
                            "eval": {"mix_divisions": 4}})
    assert (cfg.train.gate_fused_prior, cfg.model.gate_temperature, cfg.eval.mix_divisions) == ("equal", 3.0, 4)
    for bad in ({"train": {"gate_fused_prior": "oracle"}}, {"model": {"gate_temperature": 0}}):
        with pytest.raises((ValidationError, ValueError)):
            config_from_dict(bad)


def test_a_gate_only_change_keeps_the_upstream_models_hash():
    from geoloc_ray.config import Config, config_hash
    from geoloc_ray.train.run import GATE_ONLY_KEYS, TRAIN_SECTIONS

    base = Config()
    gate_only = [Config(train={"gate_fused_prior": "equal"}), Config(model={"gate_temperature": 2.0}),
                 Config(train={"gate_fused_anchor": 4.0}), Config(train={"gate_fused": {"epochs": 5, "lr": 1e-3}})]
    for cfg in gate_only:
        assert config_hash(cfg, TRAIN_SECTIONS, GATE_ONLY_KEYS) == config_hash(base, TRAIN_SECTIONS, GATE_ONLY_KEYS)
        assert config_hash(cfg, TRAIN_SECTIONS) != config_hash(base, TRAIN_SECTIONS)
    upstream = Config(train={"expert_replay": 0.5})
    assert config_hash(upstream, TRAIN_SECTIONS, GATE_ONLY_KEYS) != config_hash(base, TRAIN_SECTIONS, GATE_ONLY_KEYS)
    with pytest.raises(KeyError, match="no key"):
        config_hash(base, TRAIN_SECTIONS, ("train.no_such_key",))
    assert np.all([k.split(".")[0] in TRAIN_SECTIONS for k in GATE_ONLY_KEYS])
