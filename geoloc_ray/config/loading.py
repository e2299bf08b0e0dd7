"""Loading a run config: YAML + `--set dotted.key=value` overrides, validated into one `Config` tree."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from geoloc_ray import io
from geoloc_ray.config.base import MOVED_KEYS, ConfigModel
from geoloc_ray.config.sections import (
    DataConfig,
    EvalConfig,
    IndexConfig,
    LadderConfig,
    ModelConfig,
    PreprocessConfig,
    RayConfig,
    RefineConfig,
    ServeConfig,
    SubmitConfig,
    SynthConfig,
    TrainConfig,
)

# auto: CUDA where torch sees one (a Ray worker only on the GPU Ray gave it), else the CPU; cuda: the GPU or fail;
# cpu: compute on the CPU while every resource request stays as configured (geoloc_ray.devices).
DeviceChoice = Literal["auto", "cuda", "cpu"]


class Config(ConfigModel):
    profile: str = "demo"
    artifacts: str = "artifacts/demo"
    seed: int = 0
    device: DeviceChoice = "auto"  # where GPU-requesting stages compute (cpu: rehearsal)
    data: DataConfig = Field(default_factory=DataConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ladder: LadderConfig = Field(default_factory=LadderConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    submit: SubmitConfig = Field(default_factory=SubmitConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    _absolute_artifacts = field_validator("artifacts")(io.absolute_if_local)

    @model_validator(mode="after")
    def _check_platforms(self) -> Config:
        if sorted(self.model.platforms) != sorted(set(self.model.platforms)):
            raise ValueError("model.platforms must not repeat a platform")
        return self


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted}': '{'.'.join(keys[: i + 1])}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split `dotted.key=value`; the value is parsed as YAML so numbers, lists and null work."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{key}': value {raw!r} is not valid YAML: {exc}") from exc
    return key, value


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden" and key in MOVED_KEYS:
            lines.append(f"  {key}: unknown key: it moved to {MOVED_KEYS[key]}")
        elif err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None, source: str = "<dict>") -> Config:
    tree = dict(raw or {})
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (None: the embedded demo default) and apply `--set` overrides."""
    if path is None and not default_config_path().exists():
        return config_from_dict({}, overrides, source="<built-in defaults>")
    path = Path(path) if path is not None else default_config_path()
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return config_from_dict(raw, overrides, source=str(path))


def default_config_path() -> Path:
    """configs/demo.yaml of the checkout (an installed package without it uses the built-in defaults,
    which are the same demo profile)."""
    return Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def config_hash(cfg: Config, sections: list[str], exclude: tuple[str, ...] = ()) -> str:
    """A stable hash of the named config sections: a stage is up to date when its inputs' hash matches.
    `exclude`: dotted keys left out (settings a part of the stage does not read, e.g. train.gate_fused)."""
    import hashlib
    import json

    dump = cfg.model_dump(mode="json")
    picked = {s: dump[s] for s in sections}
    for key in exclude:
        *parents, leaf = key.split(".")
        node = picked
        for part in parents:
            node = node.get(part, {})
        if not isinstance(node, dict) or leaf not in node:
            raise KeyError(f"config_hash: no key {key!r} in sections {sections}")
        node.pop(leaf)
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]
