"""The `train` section: data-parallel fits, their schedules and the recipe's stages (kept apart from the other
sections so each module stays readable)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from geoloc_ray.config.base import ConfigModel


class HardNegativeConfig(ConfigModel):
    top_k: int = Field(30, ge=1)
    per_query: int = Field(4, ge=1)
    skip_top: int = Field(0, ge=0)  # skip the very top ranks (likely false negatives)
    gallery: Literal["mixed", "platform"] = "mixed"


class StageConfig(ConfigModel):
    epochs: int = Field(1, ge=0)
    lr: float = Field(2e-5, gt=0)
    # Small subsets (satellite: one image per location) get at least this many optimizer steps (per worker).
    min_steps: int = Field(0, ge=0)
    # False locks the pretrained text layers (LiT-style: only the projection learns): the text side is then a
    # fixed function of each statement, computed once, so a step costs about the image tower alone.
    train_text_layers: bool = True


class Stage2Config(StageConfig):
    """Stage 2's own keys: a mined row brings its positive and `hard_negatives.per_query` negatives (5 images at
    the default), so its batch is sized apart. A subclass rather than keys on every stage: the other stages
    refuse these keys (extra=forbid) instead of silently ignoring them."""

    batch_size: int | None = Field(None, ge=2)  # rows per worker and step; None: train.batch_size
    # GradCache: images (positives + negatives) through the trainable image layers at a time, with exact
    # gradients; activations then grow with the chunk, not the batch. 0: the whole batch at once.
    grad_cache_chunk: int = Field(0, ge=0)


class TrainConfig(ConfigModel):
    num_workers: int = Field(1, ge=1)  # data-parallel workers per fit (stage 0, each head, each expert, the gate)
    # Asked of Ray per worker, as written: an autoscaler brings nodes for it. A request no node type could ever
    # hold fails at once, naming this key.
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False  # one GPU per worker
    # Memory of one GPU of the node type train workers land on (GiB): `geoloc-ray plan` and the start of `train`
    # check every fit's measured peak against it less 10% headroom. A run-config key, not a field of the node type:
    # Ray's cluster schema allows no extra keys on a node type, and the plan runs before any cluster exists.
    gpu_memory_gib: float | None = Field(None, gt=0)  # None: nothing to check against
    # A fixed instance only (a local `ray.init()` or `ray start` nodes, no autoscaler): lower cpus_per_worker so
    # the fits that run at once fit on the CPUs that exist (the demo). Ignored on an autoscaling cluster.
    fit_cpus_to_instance: bool = True
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # Train's workers
    # Contrastive losses see the global batch: embeddings (and location ids, hard negatives) gathered from every
    # worker with their gradients (open_clip's gather_with_grad + local_loss). Off: each worker's own batch.
    global_negatives: bool = True
    torch_threads: int | None = None
    batch_size: int = Field(128, ge=2)  # per worker: the global batch is batch_size * num_workers
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
    # Linear warmup, then cosine decay to 10% of lr; both count the steps each worker takes.
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    bf16: bool = True  # autocast matmuls to bfloat16 (CPUs with AVX512-BF16/AMX, and GPUs)
    stage0: StageConfig = Field(default_factory=lambda: StageConfig(epochs=10, lr=1e-3, train_text_layers=False))
    stage1: StageConfig = Field(default_factory=lambda: StageConfig(epochs=4, lr=2e-4))
    stage2: Stage2Config = Field(default_factory=lambda: Stage2Config(epochs=2, lr=1e-4))
    gate: StageConfig = Field(default_factory=lambda: StageConfig(epochs=20, lr=1e-3))
    # Then the gate is tuned on the fused retrieval loss over held-out training locations (0 epochs: skip):
    # experts fit their own training images too well to tell the gate how they do on new places.
    gate_fused: StageConfig = Field(default_factory=lambda: StageConfig(epochs=30, lr=3e-4))
    # Weight of KL(platform gate || tuned gate) added to the fused loss (0: off). The held-out set is ~10% of the
    # training locations while the platform gate learnt from the other 90% and routes about as well as the
    # oracle: unanchored, the tuning overfits the few held-out places and has collapsed onto one expert.
    gate_fused_anchor: float = Field(1.0, ge=0)
    # What the anchor pulls toward: the platform gate the tuning starts from, or equal weights 1/K (the static
    # ensemble, which beat the platform gate and its one-hot oracle on the ladder's worlds).
    gate_fused_prior: Literal["platform_gate", "equal"] = "platform_gate"
    val_fraction: float = Field(0.12, ge=0, lt=0.5)  # training locations held out from every head
    # An expert's stage 1 also sees the other platforms' rows, weighing together this share of its own platform's
    # rows (0: its own platform alone). It is ranked against every platform's images at query time; trained on
    # its own alone, the images it never saw can crowd its top ranks (measured: docs/BENCHMARKS.md, issue 15).
    expert_replay: float = Field(0.0, ge=0)
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
