"""The train worker's pieces: shard epochs, the trunk-output cache, the KINDS table, one step per kind."""

import numpy as np
import pytest
import torch

from geoloc_ray.config import config_from_dict
from geoloc_ray.model import build_model, save_model
from geoloc_ray.train.cache import TrunkCache
from geoloc_ray.train.kinds import KINDS, kind_of
from geoloc_ray.train.loop import _init_model, make_optimizer, run_epoch, setup_context
from geoloc_ray.train.run import scheduled
from geoloc_ray.train.shards import ShardEpochs
from geoloc_ray.train.worker_types import JobSpec


class _Shard:
    """Stands in for a Ray Data shard: counts how often it is streamed."""

    def __init__(self, rows: dict[str, np.ndarray]):
        self.rows = rows
        self.streams = 0

    def iter_batches(self, batch_size: int = 256, **_):
        self.streams += 1
        n = len(next(iter(self.rows.values())))
        for i in range(0, n, batch_size):
            yield {k: v[i : i + batch_size] for k, v in self.rows.items()}


def _ids(n: int) -> dict[str, np.ndarray]:
    return {"image_id": np.array([f"img-{i}" for i in range(n)]), "x": np.arange(n, dtype=np.float32)}


def _pairs(n: int = 24, size: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    texts = np.empty(n, dtype=object)
    texts[:] = [np.array([f"a roof of colour {i % 5}", f"place {i // 3}", f"near object {i % 4}"][: 1 + i % 3])
                for i in range(n)]
    return {"image_id": np.array([str(i) for i in range(n)]), "location_id": np.array([f"{i // 3:04d}" for i in range(n)]),
            "platform": np.array([["satellite", "drone", "ground"][i % 3] for i in range(n)]), "texts": texts,
            "pixels": rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)}


def test_small_shard_is_streamed_once_then_reshuffled_from_memory():
    shard = _Shard(_ids(30))
    reader = ShardEpochs(shard, batch_size=8, seed=0, keep_bytes=16 * 2**20)
    epochs = [[b["image_id"].tolist() for b in reader.batches(epoch)] for epoch in range(3)]
    assert shard.streams == 1
    for batches in epochs:
        seen = [i for b in batches for i in b]
        assert sorted(seen) == sorted(shard.rows["image_id"].tolist())  # every row once per epoch
        assert all(len(b) >= 2 for b in batches)
    assert epochs[1] != epochs[2]  # a new order every epoch


def test_cache_off_or_a_shard_too_big_streams_every_epoch():
    for keep_bytes in (0, 100):  # 30 rows of ~17 bytes each do not fit in 100 bytes
        shard = _Shard(_ids(30))
        reader = ShardEpochs(shard, batch_size=8, seed=0, keep_bytes=keep_bytes)
        for epoch in range(3):
            list(reader.batches(epoch))
        assert shard.streams == 3 and reader.kept is None


def test_rows_that_come_shuffled_stream_without_a_local_shuffle_buffer():
    """A local shuffle buffer held whole decoded blocks in the object store (issue 21); streamed decodes come
    shuffled (`TrainData.shuffled`), so their workers read them as they come."""
    asked = []

    class Recording(_Shard):
        def iter_batches(self, batch_size: int = 256, **kw):
            asked.append(kw)
            return super().iter_batches(batch_size)

    for local_shuffle in (True, False):
        list(ShardEpochs(Recording(_ids(20)), 8, seed=0, keep_bytes=0, local_shuffle=local_shuffle).batches(0))
    assert asked[0]["local_shuffle_buffer_size"] == 32 and "local_shuffle_buffer_size" not in asked[1]


def test_trunk_cache_computes_each_statement_once_and_stays_bounded():
    calls: list[list[str]] = []

    def compute(statements):
        calls.append(list(statements))
        return [s.upper() for s in statements]

    cache = TrunkCache(max_items=3)
    assert cache.get(["b", "a", "b"], compute) == ["B", "A", "B"]
    assert calls == [["a", "b"]]  # missing ones once each, sorted
    assert cache.get(["a", "c"], compute) == ["A", "C"] and calls[-1] == ["c"]
    cache.get(["d"], compute)  # over the bound: the least recently used ("b") goes
    assert len(cache) == 3
    cache.get(["a", "b"], compute)
    assert calls[-1] == ["b"]
    # more distinct statements in one call than the bound still all come back
    assert cache.get(list("wxyz"), compute) == list("WXYZ") and len(cache) == 3
    nothing = TrunkCache(max_items=0)
    nothing.get(["a"], compute)
    nothing.get(["a"], compute)
    assert calls[-2:] == [["a"], ["a"]] and len(nothing) == 0


def test_every_kind_names_its_parts_and_an_unknown_kind_is_refused():
    assert set(KINDS) == {"pairs", "triplets", "gate", "gate_fused"}
    assert [k for k, v in KINDS.items() if v.trains_gate] == ["gate", "gate_fused"]
    with pytest.raises(ValueError, match="unknown job kind"):
        kind_of("pair")


def test_the_schedule_is_computed_not_mutated():
    job = JobSpec(name="e", kind="pairs", epochs=2)
    small = scheduled(job, rows=10, batch_size=8, min_steps=20)
    assert (small.steps_per_epoch, small.epochs) == (2, 10)  # stretched to reach min_steps
    assert (job.steps_per_epoch, job.epochs) == (1, 2)
    big = scheduled(job, rows=800, batch_size=8, min_steps=20)
    assert (big.steps_per_epoch, big.epochs) == (100, 2)
    # two workers: each takes half the steps, so the schedule and min_steps count half as many per epoch
    two = scheduled(job, rows=800, batch_size=8, min_steps=120, workers=2)
    assert (two.steps_per_epoch, two.epochs) == (50, 3)
    assert scheduled(job, rows=21, batch_size=8, min_steps=0, workers=2).steps_per_epoch == 2  # 10 rows: 8 + 2


def test_a_worker_request_no_node_could_hold_fails_naming_the_config_key():
    from geoloc_ray.train.fit import unsatisfiable

    nodes = [{"CPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 32.0}]
    assert unsatisfiable({"CPU": 8.0, "GPU": 1.0}, nodes) is None
    assert "train.cpus_per_worker" in unsatisfiable({"CPU": 64.0}, nodes, "node type")
    assert "train.use_gpu" in unsatisfiable({"CPU": 1.0, "GPU": 1.0}, [{"CPU": 4.0}])
    assert "no single node" in unsatisfiable({"CPU": 16.0, "GPU": 1.0}, nodes)  # each fits somewhere, not both


@pytest.fixture(scope="module")
def demo():
    cfg = config_from_dict({"train": {"batch_size": 8}})
    return cfg, build_model(cfg.model, heads=["satellite", "drone", "ground"], gate=True, seed=0)


def _trained(cfg, job, shard, epochs=2):
    torch.manual_seed(0)
    model = _init_model(cfg, job)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer, scheduler = make_optimizer(model, job, cfg)
    ctx = setup_context(model, job, cfg, np.random.default_rng(0), "cpu", shard)
    losses = [run_epoch(ctx, e, optimizer, scheduler) for e in range(epochs)]
    changed = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("heads.") else "")
               for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    return model, losses, changed


@pytest.mark.parametrize("kind, head, parts", [
    ("pairs", "drone", {"heads.drone"}),
    ("gate", None, {"gate"}),
    ("gate_fused", None, {"gate"}),
])
def test_a_job_of_each_kind_trains_only_its_parts(demo, tmp_path, kind, head, parts):
    cfg, model = demo
    save_model(model, str(tmp_path / "init"), cfg)
    job = JobSpec(name=kind, kind=kind, head=head, init=str(tmp_path / "init"), epochs=2, lr=1e-3, steps_per_epoch=3)
    trained, losses, changed = _trained(cfg, job, _Shard(_pairs()))
    assert changed == parts
    assert all(steps == 3 and np.isfinite(totals["loss"]) for steps, totals in losses)
    kept = trained.head_names
    assert kept == (["satellite", "drone", "ground"] if kind == "gate_fused" else [head] if head else [])


@pytest.mark.parametrize("text_layers", [True, False])
def test_the_frozen_trunk_sees_each_statement_once_over_epochs(demo, text_layers):
    cfg, _ = demo
    job = JobSpec(name="s", kind="pairs", head="unified", text_layers=text_layers, epochs=2, steps_per_epoch=3)
    model = _init_model(cfg, job)
    seen: list[str] = []
    trunk = model.text_trunk_output
    model.text_trunk_output = lambda texts: (seen.extend(texts), trunk(texts))[1]
    optimizer, scheduler = make_optimizer(model, job, cfg)
    ctx = setup_context(model, job, cfg, np.random.default_rng(0), "cpu", _Shard(_pairs()))
    for epoch in range(2):
        run_epoch(ctx, epoch, optimizer, scheduler)
    statements = {str(s) for texts in _pairs()["texts"] for s in texts}
    assert sorted(seen) == sorted(set(seen)) and set(seen) <= statements
    assert len(ctx.cache) == len(seen)


def test_the_heads_text_layers_run_by_length_and_give_the_padded_batchs_outputs_in_order(monkeypatch):
    from geoloc_ray.model import TextTrunkOutput
    from geoloc_ray.train import encode

    cfg = config_from_dict({"train": {"batch_size": 8, "bf16": False}})
    job = JobSpec(name="s", kind="pairs", head="unified", epochs=1, steps_per_epoch=1)
    model = _init_model(cfg, job).eval()
    ctx = setup_context(model, job, cfg, np.random.default_rng(0), "cpu", _Shard(_pairs()))
    texts = ["red", "a tall cream building with a red roof beside a lake", "two trees", "a lake", "roof",
             "a small grey house next to a long straight road with cars", "park"]
    trunk = model.text_trunk_output(texts)
    head = model.heads["unified"].text
    monkeypatch.setattr(encode, "TAIL_CHUNK", 3)  # several chunks of different lengths
    with torch.no_grad():
        chunked = encode.tail(ctx, head, trunk.split())
        padded = head.tail(TextTrunkOutput.cat(trunk.split())).float()
        direct = model.text_head("unified", trunk)
        via_query_text = encode.query_text(ctx, texts)
    assert chunked.shape == padded.shape == (len(texts), padded.shape[1])
    assert torch.allclose(chunked, padded, atol=1e-5)
    assert torch.allclose(via_query_text, direct, atol=1e-5)


def _same_gate(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_fused_tuning_is_anchored_to_the_frozen_gate_it_started_from(demo, tmp_path):
    cfg, model = demo
    save_model(model, str(tmp_path / "init"), cfg)
    job = JobSpec(name="f", kind="gate_fused", init=str(tmp_path / "init"), epochs=2, lr=1e-2, steps_per_epoch=3)
    trained, _, changed = _trained(cfg, job, _Shard(_pairs()))
    assert changed == {"gate"}
    # the worker's setup, before the first step: a frozen copy of the model's own gate
    state = setup_context(model, job, cfg, np.random.default_rng(0), "cpu", _Shard(_pairs())).state
    assert _same_gate(state.anchor_gate, model.gate) and state.anchor_gate is not model.gate
    assert len(state.gallery) == 3 and len(state.gallery[0]) == len(state.gallery_keys) > 0
    # a worker resumed at epoch 1 holds a tuned gate: the anchor is still the starting model's
    state = setup_context(trained, job, cfg, np.random.default_rng(0), "cpu", _Shard(_pairs()), start_epoch=1).state
    assert _same_gate(state.anchor_gate, model.gate) and not _same_gate(state.anchor_gate, trained.gate)
    assert not any(p.requires_grad for p in state.anchor_gate.parameters())
    off = cfg.model_copy(update={"train": cfg.train.model_copy(update={"gate_fused_anchor": 0.0})})
    assert setup_context(trained, job, off, np.random.default_rng(0), "cpu", _Shard(_pairs())).state.anchor_gate is None
    equal = cfg.model_copy(update={"train": cfg.train.model_copy(update={"gate_fused_prior": "equal"})})
    state = setup_context(trained, job, equal, np.random.default_rng(0), "cpu", _Shard(_pairs()), start_epoch=1).state
    assert state.anchor_gate is None  # the equal prior copies and loads no gate


def test_an_experts_other_platform_rows_weigh_in_at_the_replay_share(tmp_path):
    import pandas as pd

    from geoloc_ray.train.data import Source
    from geoloc_ray.train.run import expert_fit
    from geoloc_ray.train.steps import _row_weights

    # 2 satellite, 6 drone, 3 ground rows outside the held-out location "h" (whose rows must not count)
    platforms = ["satellite"] * 2 + ["drone"] * 6 + ["ground"] * 3 + ["satellite", "drone"]
    locations = [f"l{i}" for i in range(11)] + ["h", "h"]
    pd.DataFrame({"platform": platforms, "location_id": locations}).to_parquet(tmp_path / "rows.parquet")
    rows = Source(str(tmp_path / "rows.parquet"), exclude=frozenset({"h"}))

    def fit(replay: float, platform: str):
        cfg = config_from_dict({"train": {"expert_replay": replay}})
        return expert_fit(cfg, platform, rows, str(tmp_path / "out"), str(tmp_path / "aligned"))

    alone = fit(0.0, "satellite")
    assert alone.source.platforms == ("satellite",) and alone.job.other_platform_weight is None
    replayed = fit(0.5, "satellite")
    assert replayed.source.platforms is None and replayed.source.exclude == frozenset({"h"})
    # the 9 other rows weigh together half of the 2 satellite rows
    assert replayed.job.other_platform_weight == pytest.approx(0.5 * 2 / 9)
    assert fit(0.5, "drone").job.other_platform_weight == pytest.approx(0.5 * 6 / 5)

    class Ctx:
        job, device = replayed.job, "cpu"

    weights = _row_weights(Ctx, np.array(["satellite", "drone", "ground", "satellite"]))
    assert weights.tolist() == pytest.approx([1.0, 1 / 9, 1 / 9, 1.0])


def test_a_worker_uses_the_cpus_it_was_given_rounded_not_truncated():
    from geoloc_ray.train.loop import worker_threads

    cfg = config_from_dict({})
    # the demo's lone fit gets 0.9 x 2 CPUs; three concurrent fits 0.6 each
    assert [worker_threads(cfg, c) for c in (1.8, 0.6, 0.3, 8.0)] == [2, 1, 1, 8]
    assert worker_threads(cfg, None) == round(cfg.train.cpus_per_worker)
    assert worker_threads(config_from_dict({"train": {"torch_threads": 3}}), 1.8) == 3


@pytest.mark.parametrize("composition", ["features", "tokens"])
def test_frozen_trunks_in_bf16_leave_the_trained_parts_in_fp32_and_train_them(demo, tmp_path, composition):
    """A GPU worker under `train.bf16` casts its frozen trunks to bf16 (here on the CPU, under CPU autocast): the
    head keeps fp32 weights and trains, the trunks stay as they were, and the epoch's metrics come back as floats."""
    from geoloc_ray.train.loop import frozen_trunks_in_bf16

    cfg, model = demo
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"bf16": True, "text_composition": composition})})
    save_model(model, str(tmp_path / "init"), cfg)
    job = JobSpec(name="pairs", kind="pairs", head="drone", init=str(tmp_path / "init"), epochs=1, lr=1e-3,
                  steps_per_epoch=3)
    model = _init_model(cfg, job)
    assert frozen_trunks_in_bf16(model) == ["text_trunk", "image_trunk"]
    assert {p.dtype for p in model.text_trunk.parameters()} | {p.dtype for p in model.image_trunk.parameters()} == {
        torch.bfloat16}
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer, scheduler = make_optimizer(model, job, cfg)
    ctx = setup_context(model, job, cfg, np.random.default_rng(0), "cpu", _Shard(_pairs()))
    steps, totals = run_epoch(ctx, 0, optimizer, scheduler)
    assert steps == 3 and isinstance(totals["loss"], float) and np.isfinite(totals["loss"]) and 0 <= totals["acc"] <= 3
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("heads.drone.") for n in changed)

    stage0 = JobSpec(name="s0", kind="pairs", head="unified", image_trunk=True)
    assert frozen_trunks_in_bf16(_init_model(cfg, stage0)) == ["text_trunk"]  # a trunk that trains stays fp32
