"""Typed run configuration: one pydantic tree loaded from YAML, checked at load time.

Every stage takes the same `Config`; `--set dotted.key=value` overrides are applied to the raw YAML before
validation, so a typo in a key or a bad value fails fast and names the key. `base` holds the one base class
(and the shared actor-pool sub-model), `sections` one model per stage, `loading` the root and the loader.
"""

from geoloc_ray.config.base import ActorPool, ConfigModel
from geoloc_ray.config.loading import (
    Config,
    ConfigError,
    config_from_dict,
    config_hash,
    default_config_path,
    load_config,
    parse_override,
)
from geoloc_ray.config.sections import (
    PLATFORMS,
    AugmentConfig,
    DataConfig,
    EvalConfig,
    HardNegativeConfig,
    ImageTowerConfig,
    IndexConfig,
    ModelConfig,
    Platform,
    PlatformRules,
    PreprocessConfig,
    RayConfig,
    RefineConfig,
    ServeConfig,
    StageConfig,
    SynthConfig,
    TextTowerConfig,
    TrainConfig,
    VLLMConfig,
)

__all__ = [
    "PLATFORMS", "ActorPool", "AugmentConfig", "ConfigModel", "Config", "ConfigError", "DataConfig", "EvalConfig", "HardNegativeConfig",
    "ImageTowerConfig", "IndexConfig", "ModelConfig", "Platform", "PlatformRules", "PreprocessConfig",
    "RayConfig", "RefineConfig", "ServeConfig", "StageConfig", "SynthConfig", "TextTowerConfig", "TrainConfig",
    "VLLMConfig", "config_from_dict", "config_hash", "default_config_path", "load_config", "parse_override",
]
