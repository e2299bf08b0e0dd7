"""Checkpoints: `model.safetensors` + `manifest.json` under any fsspec URI (local or s3://).

The frozen pretrained text trunk is not duplicated in every checkpoint (BGE-M3's is ~2 GB): the manifest
references its source (the config's text tower) and a sha256 of its tensors, and loading rebuilds it from the
source through the factory and refuses a trunk whose tensors differ. Everything else (image trunk, heads, gate)
is stored. `model_version` is derived from the weights' sha256 (and the text trunk's, when referenced).

A training job's epoch checkpoints (`save_trained` / `load_trained`) hold less: only the components the job
trains, naming everything else (both trunks, the other heads) by one hash, so a resumed worker rebuilds those as
the job started and refuses a different trunk. The model a fit exports is complete (`save_model`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import torch

from geoloc_ray import io
from geoloc_ray.config import Config, ModelConfig
from geoloc_ray.model.geoloc_model import GeoLocModel
from geoloc_ray.model.heads import ExpertHead

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "geoloc_ray.model/v1"
_TEXT_TRUNK = "text_trunk."
_PACKAGES = ("torch", "transformers", "open_clip_torch", "timm", "safetensors", "FlagEmbedding", "geoloc_ray")


class ChecksumError(ValueError):
    """A checkpoint's bytes (or its referenced trunk) are not what its manifest says."""


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """Content hash of named tensors (names, dtypes, shapes and bytes), independent of file layout."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def non_persistent_buffers(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Buffers a state_dict leaves out (`persistent=False`, e.g. EVA attention's fixed zero `k_bias`)."""
    out = {}
    for path, mod in module.named_modules():
        for name in getattr(mod, "_non_persistent_buffers_set", ()):
            if mod._buffers.get(name) is not None:
                out[f"{prefix}{path}.{name}" if path else f"{prefix}{name}"] = mod._buffers[name]
    return out


def _split_state(model: GeoLocModel, reference_text_trunk: bool) -> tuple[dict, dict]:
    stored, trunk = {}, {}
    for name, t in model.state_dict().items():
        target = trunk if (reference_text_trunk and name.startswith(_TEXT_TRUNK)) else stored
        target[name] = t.detach().to("cpu").contiguous()
    # The heads' non-persistent buffers too: `load_head` builds a head on the meta device, where they would stay
    # uninitialised (load_model ignores them: its full build computes them).
    for name, t in non_persistent_buffers(model.heads, "heads.").items():
        stored[name] = t.detach().to("cpu").contiguous()
    return stored, trunk


def _model_version(weights_sha: str, trunk_sha: str | None) -> str:
    if trunk_sha is None:
        return weights_sha[:16]
    return hashlib.sha256(f"{weights_sha}:{trunk_sha}".encode()).hexdigest()[:16]


def save_model(model: GeoLocModel, uri: str, cfg: Config | ModelConfig | None = None,
               extra: dict[str, Any] | None = None, *, reference_text_trunk: bool = True) -> dict:
    """Write weights then manifest (the manifest is written last: its presence marks a complete checkpoint).

    The architecture recorded is the model's own `model_cfg` (the weights fit it); `cfg` is accepted for
    symmetry with the stage code (a mismatch is logged). `extra` is free-form provenance.
    """
    from safetensors.torch import save

    given = cfg.model if isinstance(cfg, Config) else cfg
    if given is not None and given.model_dump() != model.model_cfg.model_dump():
        # The weights fit model.model_cfg, which is what the manifest records; say so rather than fail a run.
        logger.warning("save_model(%s): cfg.model differs from the saved model's own config; recording the latter", uri)
    stored, trunk = _split_state(model, reference_text_trunk)
    data = save(stored, metadata={"format": "pt"})
    weights_sha = hashlib.sha256(data).hexdigest()
    trunk_sha = tensors_sha256(trunk) if trunk else None
    manifest = {
        "format": FORMAT,
        "model_version": _model_version(weights_sha, trunk_sha),
        "model_config": model.model_cfg.model_dump(mode="json"),
        "heads": model.head_names,
        "gate": model.gate is not None,
        "platforms": model.platforms,
        "embed_dim": model.model_cfg.embed_dim,
        "preprocess": model.preprocess_cfg,
        "weights": {"file": WEIGHTS_FILE, "sha256": weights_sha, "bytes": len(data), "tensors": len(stored)},
        "text_trunk": {"stored": trunk_sha is None, "source": model.model_cfg.text.model_dump(mode="json"),
                       "sha256": trunk_sha},
        "parameters": {k: v for k, v in model.parameter_counts().items() if k != "heads"},
        "versions": package_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "extra": extra or {},
    }
    io.makedirs(uri)
    io.write_bytes(io.join(uri, WEIGHTS_FILE), data)
    io.write_json(io.join(uri, MANIFEST_FILE), manifest)
    return manifest


def read_manifest(uri: str) -> dict:
    """The manifest alone (cheap: no weights read), e.g. to get `model_version` or the preprocessing."""
    manifest = io.read_json(io.join(uri, MANIFEST_FILE))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{uri}: not a geoloc_ray model checkpoint (format {manifest.get('format')!r})")
    return manifest


def _read_weights(uri: str, manifest: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    data = io.read_bytes(io.join(uri, manifest["weights"]["file"]))
    sha = hashlib.sha256(data).hexdigest()
    if sha != manifest["weights"]["sha256"]:
        raise ChecksumError(f"{uri}: weights sha256 {sha[:12]}.. != manifest {manifest['weights']['sha256'][:12]}..")
    return load(data)


def _check_text_trunk(model: GeoLocModel, manifest: dict, uri: str) -> None:
    expected = manifest["text_trunk"]["sha256"]
    if expected is None:
        return
    got = tensors_sha256({f"{_TEXT_TRUNK}{k}": v for k, v in model.text_trunk.state_dict().items()})
    if got != expected:
        raise ChecksumError(f"{uri}: the text trunk rebuilt from {manifest['text_trunk']['source']['path']!r} "
                            f"differs from the one this checkpoint was trained with")


def _select_heads(manifest: dict, heads: Sequence[str] | None, uri: str) -> list[str]:
    names = list(manifest["heads"]) if heads is None else list(heads)
    unknown = [n for n in names if n not in manifest["heads"]]
    if unknown:
        raise KeyError(f"{uri}: no head(s) {unknown}; the checkpoint has {manifest['heads']}")
    return names


def _drop_other_heads(state: dict, keep: list[str]) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("heads.") or k.split(".", 2)[1] in keep}


def load_model(uri: str, device: str | torch.device = "cpu", heads: Sequence[str] | None = None) -> GeoLocModel:
    """Rebuild through the factory, load the stored weights (sha256-verified) and check the text trunk.

    `heads` loads a subset (e.g. [] for a query encoder that runs only the trunk and the gate).
    """
    from geoloc_ray.model.factory import build_model

    manifest = read_manifest(uri)
    names = _select_heads(manifest, heads, uri)
    state = _drop_other_heads(_read_weights(uri, manifest), names)
    cfg = ModelConfig.model_validate(manifest["model_config"])
    model = build_model(cfg, heads=names, gate=manifest["gate"], image_pretrained=False)
    computed = non_persistent_buffers(model.heads, "heads.")  # built here; stored only for load_head
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in computed},
                                                strict=False)
    referenced = manifest["text_trunk"]["sha256"] is not None
    missing = [k for k in missing if not (referenced and k.startswith(_TEXT_TRUNK))]
    if missing or unexpected:
        raise ValueError(f"{uri}: weights do not match the architecture: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    _check_text_trunk(model, manifest, uri)
    model.preprocess_cfg = dict(manifest.get("preprocess") or model.preprocess_cfg)
    model.manifest = manifest
    return model.to(device)


def load_head(uri: str, name: str, device: str | torch.device = "cpu") -> ExpertHead:
    """One expert head alone (its text + image layers and projections), without loading any trunk.

    For a Serve expert deployment that only runs its head on trunk outputs computed elsewhere: the
    architecture is built on the meta device, then only this head is materialised and filled.
    """
    from geoloc_ray.model.factory import build_model

    manifest = read_manifest(uri)
    _select_heads(manifest, [name], uri)
    state = _read_weights(uri, manifest)
    prefix = f"heads.{name}."
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    arch = build_model(ModelConfig.model_validate(manifest["model_config"]), heads=[name], device="meta")
    head = arch.heads[name].to_empty(device=device)
    buffers = non_persistent_buffers(head)
    unfilled = [n for n in buffers if n not in own]
    if unfilled:  # a checkpoint written before these buffers were stored: they would stay uninitialised
        raise RuntimeError(f"load_head: buffers {unfilled[:3]} are not stored (an older checkpoint); use load_model")
    for path in buffers:
        module_path, _, buffer = path.rpartition(".")
        head.get_submodule(module_path)._buffers[buffer] = own.pop(path).to(device)
    head.load_state_dict(own, strict=True)
    return head.requires_grad_(False).eval()


def _same_image_trunk(a: GeoLocModel, b: GeoLocModel) -> bool:
    sa, sb = a.image_trunk.state_dict(), b.image_trunk.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


# ----- epoch checkpoints: the trained parts only ---------------------------------------------------------------
TRAINED_FILE = "trained.safetensors"


def trained_components(model: GeoLocModel) -> list[str]:
    """The components that learn in this job (a head, the gate, the image trunk in stage 0), by state-dict prefix."""
    return [name for name, module in model.components() if any(p.requires_grad for p in module.parameters())]


def _component_state(model: GeoLocModel, names: Sequence[str]) -> dict[str, torch.Tensor]:
    modules = dict(model.components())
    return {f"{name}.{k}": t for name in names for k, t in modules[name].state_dict().items()}


def frozen_sha256(model: GeoLocModel) -> str:
    """Content hash of everything that does not train (the trunks, the other heads): what an epoch checkpoint
    names instead of storing. Take it before a GPU worker casts its frozen trunks to bf16."""
    trained = set(trained_components(model))
    return tensors_sha256(_component_state(model, [n for n, _ in model.components() if n not in trained]))


def save_trained(model: GeoLocModel, folder: str, frozen_sha: str | None = None) -> dict[str, Any]:
    """Write the trained components' weights (fp32 as trained) to `folder`; the returned record (for the caller's
    state file) names them and the frozen rest by `frozen_sha` (computed here when not given)."""
    from safetensors.torch import save

    names = trained_components(model)
    state = {k: t.detach().to("cpu").contiguous() for k, t in _component_state(model, names).items()}
    data = save(state, metadata={"format": "pt"})
    io.makedirs(folder)
    io.write_bytes(io.join(folder, TRAINED_FILE), data)
    return {"trained": names, "sha256": hashlib.sha256(data).hexdigest(),
            "frozen_sha256": frozen_sha if frozen_sha is not None else frozen_sha256(model)}


def load_trained(model: GeoLocModel, folder: str, record: dict[str, Any], frozen_sha: str | None = None) -> None:
    """Fill the trained components of `model` (rebuilt as the job starts: from its init checkpoint, or fresh) from
    `save_trained`'s folder; refuses when the model's frozen parts are not the ones the checkpoint trained against
    (another trunk, another init, other pretrained weights), or the files are not the record's."""
    from safetensors.torch import load

    got = frozen_sha if frozen_sha is not None else frozen_sha256(model)
    if got != record["frozen_sha256"]:
        raise ChecksumError(f"{folder}: trained against frozen weights {record['frozen_sha256'][:12]}.., but this "
                            f"model's are {got[:12]}..: it cannot resume onto a different trunk")
    data = io.read_bytes(io.join(folder, TRAINED_FILE))
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ChecksumError(f"{folder}: {TRAINED_FILE} is not the one its state file names")
    state = load(data)
    expected = _component_state(model, record["trained"])
    if state.keys() != expected.keys():
        raise ValueError(f"{folder}: stored parts {sorted(state)[:5]} do not fit this model's {sorted(expected)[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)


def assemble_moe(expert_uris: Sequence[str], gate_uri: str, out_uri: str, cfg: Config | None = None,
                 extra: dict[str, Any] | None = None) -> dict:
    """Save one model = the shared trunk + every expert checkpoint's heads + the gate (what index and serve load).

    Heads only fit the trunk they were trained on, so the experts must share one image trunk (one stage 0).
    """
    moe = load_model(expert_uris[0])
    for uri in expert_uris[1:]:
        expert = load_model(uri)
        if not _same_image_trunk(moe, expert):
            raise ValueError(f"{uri} does not share the image trunk of {expert_uris[0]}: retrain from one stage 0")
        for name in expert.head_names:
            moe.heads[name] = expert.heads[name]
    moe.gate = load_model(gate_uri).gate
    if cfg is not None:  # the MoE routes at the configured temperature, whatever its parts were built with
        moe.gate.temperature = cfg.model.gate_temperature
        moe.model_cfg = moe.model_cfg.model_copy(update={"gate_temperature": cfg.model.gate_temperature})
    sources = {"experts": list(expert_uris), "gate": gate_uri}
    return save_model(moe, out_uri, cfg, extra={"experts": moe.head_names, "sources": sources, **(extra or {})})
