import torch
import torch.nn.functional as F

from geoloc_ray.train.batches import TextSampler, location_keys
from geoloc_ray.train.losses import gate_loss, info_nce


def _unit(x):
    return F.normalize(x, dim=-1)


def test_info_nce_is_low_for_matching_pairs_and_high_for_shuffled():
    torch.manual_seed(0)
    t = _unit(torch.randn(8, 16))
    locs = torch.arange(8)
    good = info_nce(t, t.clone(), locs, 0.05)
    bad = info_nce(t, t[torch.randperm(8)], locs, 0.05)
    assert good < 0.05 < bad


def test_same_location_pairs_are_not_negatives():
    # two images of one location with the same embedding: without masking they would compete
    t = _unit(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01]]))
    v = t.clone()
    masked = info_nce(t, v, torch.tensor([0, 1, 0]), 0.05)
    unmasked = info_nce(t, v, torch.tensor([0, 1, 2]), 0.05)
    assert masked < 0.01 < unmasked


def test_hard_negatives_raise_the_loss_only_when_they_are_close_and_of_another_location():
    torch.manual_seed(0)
    t = _unit(torch.randn(4, 8))
    v = t.clone()
    locs = torch.arange(4)
    base = info_nce(t, v, locs, 0.1)
    far = info_nce(t, v, locs, 0.1, hard_negatives=-t, hard_locations=torch.tensor([10, 11, 12, 13]))
    near_vectors = _unit(t + 0.05 * torch.randn(4, 8))
    near = info_nce(t, v, locs, 0.1, hard_negatives=near_vectors, hard_locations=torch.tensor([10, 11, 12, 13]))
    own = info_nce(t, v, locs, 0.1, hard_negatives=near_vectors, hard_locations=locs)
    assert torch.isclose(far, base, atol=1e-3)
    assert near > base + 0.2  # a near-duplicate of another location competes with the positive
    # hard negative i shares query i's location: masked for query i, so only the far pairs remain
    assert own < near - 0.2


def test_hard_negative_gradient_pushes_the_negative_away():
    t = _unit(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    hard = _unit(torch.tensor([[0.9, 0.1], [0.1, 0.9]])).requires_grad_()
    loss = info_nce(t, t.clone(), torch.tensor([0, 1]), 0.1, hard, torch.tensor([5, 6]))
    loss.backward()
    # descending the gradient lowers the similarity between query 0 and its hard negative
    step = hard - 0.1 * hard.grad
    assert (step[0] @ t[0]) < (hard[0] @ t[0])


def test_gate_loss_prefers_the_true_platform():
    y = torch.tensor([0, 1, 2])
    right = torch.eye(3) * 5
    assert gate_loss(right, y) < gate_loss(right[[1, 2, 0]], y)


def test_location_keys_are_shared_across_positives_nested_negatives_and_calls():
    import numpy as np

    pos = np.array(["0001", "0002"], dtype=object)
    neg = np.empty(2, dtype=object)
    neg[:] = [np.array(["0002", "0003"]), np.array(["0001", "0004"])]
    a, b = location_keys(pos, neg)
    (k1, k2), (n2, n3, n1, n4) = a.tolist(), b.tolist()
    assert a.dtype == torch.int64 and len({k1, k2, n3, n4}) == 4 and (n2, n1) == (k2, k1)
    (again,) = location_keys(np.array(["0004", "0001"]))  # another worker's batch: the same keys
    assert again.tolist() == [n4, k1]


def test_text_sampler_draws_one_to_n_statements_of_the_same_image():
    import numpy as np

    sampler = TextSampler(np.random.default_rng(0), max_statements=2)
    texts = [["a", "b", "c"], ["d"]]
    seen = {sampler.texts(texts)[0] for _ in range(200)}
    assert seen == {"a", "b", "c", "a, b", "a, c", "b, c"}  # kept in their original order
    assert sampler.texts(texts)[1] == "d"


def test_style_dropout_strips_the_refiner_phrasing_only_sometimes():
    import numpy as np

    from geoloc_ray.captions.rules import style_patterns, unstyle
    from geoloc_ray.captions.vocabulary import load_vocabulary

    patterns = style_patterns(load_vocabulary())
    sampler = TextSampler(np.random.default_rng(0), 1, lambda t: unstyle(t, patterns), style_dropout=0.5)
    seen = {sampler.texts([["Aerial view: a red roof"]])[0] for _ in range(100)}
    assert seen == {"Aerial view: a red roof", "a red roof"}
    never = TextSampler(np.random.default_rng(0), 1, lambda t: unstyle(t, patterns), style_dropout=0.0)
    assert {never.texts([["a red roof, seen from the street"]])[0] for _ in range(20)} == {
        "a red roof, seen from the street"}


def test_fused_loss_follows_the_gate_towards_the_expert_that_ranks_the_positive_first():
    from geoloc_ray.train.losses import fused_logits, multi_positive_nce

    # 1 query, 3 gallery images (0 and 1 show its location); expert 0 ranks them first, expert 1 ranks image 2 first
    per_expert = torch.tensor([[[0.9, 0.8, 0.1], [0.1, 0.2, 0.9]]])
    positives = torch.tensor([[True, True, False]])
    right = multi_positive_nce(fused_logits(torch.tensor([[1.0, 0.0]]), per_expert, 0.1), positives)
    wrong = multi_positive_nce(fused_logits(torch.tensor([[0.0, 1.0]]), per_expert, 0.1), positives)
    assert right < 0.05 < 2.0 < wrong
    weights = torch.tensor([[0.5, 0.5]], requires_grad=True)
    multi_positive_nce(fused_logits(weights, per_expert, 0.1), positives).backward()
    assert weights.grad[0, 0] < weights.grad[0, 1]  # descending moves weight onto expert 0


def test_the_gate_anchor_is_zero_at_the_platform_gate_and_pulls_back_towards_it():
    from geoloc_ray.train.losses import gate_anchor

    platform_gate = torch.tensor([[0.36, 0.64, 0.0], [0.05, 0.91, 0.04]])  # a zero weight is allowed
    same = gate_anchor(torch.log(platform_gate.clamp_min(1e-30)), platform_gate)
    assert abs(float(same)) < 1e-6
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]], requires_grad=True)  # a drifted gate
    loss = gate_anchor(logits, platform_gate)
    assert loss > 0.5
    loss.backward()
    # d KL / d logits = (softmax(logits) - anchor) / B: descending moves every weight towards the anchor
    torch.testing.assert_close(logits.grad, (logits.detach().softmax(1) - platform_gate) / 2)
    stepped = (logits.detach() - 1.0 * logits.grad).softmax(1)
    assert (stepped - platform_gate).abs().sum() < (logits.detach().softmax(1) - platform_gate).abs().sum()
    assert gate_anchor(logits.detach() - logits.grad, platform_gate) < loss


def test_the_rows_of_two_workers_average_to_the_whole_batch_loss():
    """`local_loss` semantics: each worker's rows of the global loss; their mean is the one-worker loss."""
    from geoloc_ray.train.losses import GlobalBatch

    torch.manual_seed(0)
    t, v, hard = _unit(torch.randn(8, 16)), _unit(torch.randn(8, 16)), _unit(torch.randn(16, 16))
    locs, hard_locs = torch.tensor([0, 1, 2, 0, 3, 4, 5, 3]), torch.arange(16) % 7
    whole = info_nce(t, v, locs, 0.1, hard, hard_locs)
    halves = [info_nce(t[s], v[s], locs[s], 0.1, everyone=GlobalBatch(t, v, locs, s.start, hard, hard_locs))
              for s in (slice(0, 4), slice(4, 8))]
    assert torch.isclose(whole, sum(halves) / 2, atol=1e-6)


def test_row_weights_make_a_weighted_mean_and_a_zero_weight_row_stays_a_negative():
    from geoloc_ray.train.losses import GlobalBatch

    torch.manual_seed(0)
    t, v, locs = _unit(torch.randn(6, 8)), _unit(torch.randn(6, 8)), torch.arange(6)
    plain = info_nce(t, v, locs, 0.1)
    assert torch.isclose(info_nce(t, v, locs, 0.1, weights=torch.ones(6)), plain, atol=1e-6)
    # each row's own term of the batch loss (its row of the global batch)
    each = [info_nce(t[i : i + 1], v[i : i + 1], locs[i : i + 1], 0.1, everyone=GlobalBatch(t, v, locs, i))
            for i in range(6)]
    # row 5 weighs 0: the loss is rows 0-4's mean, yet image 5 still competes with their positives
    zero = info_nce(t, v, locs, 0.1, weights=torch.tensor([1.0, 1, 1, 1, 1, 0]))
    assert torch.isclose(zero, sum(each[:5]) / 5, atol=1e-6)
    assert not torch.isclose(zero, info_nce(t[:5], v[:5], locs[:5], 0.1), atol=1e-4)
    # a row weighing 3 counts as three copies of itself in the mean
    w3 = torch.tensor([3.0, 1, 1, 1, 1, 1])
    assert torch.isclose(info_nce(t, v, locs, 0.1, weights=w3), (3 * each[0] + sum(each[1:])) / 8, atol=1e-6)
