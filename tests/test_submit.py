import numpy as np
import pytest

from geoloc_ray.submit import SubmissionError, format_lines, validate_submission

GALLERY = {f"image_{i:08x}" for i in range(12)}


def _ids(start: int = 0) -> list[str]:
    return [f"image_{i:08x}" for i in range(start, start + 10)]


def test_valid_submission_has_eleven_fields_per_query():
    lines = format_lines(["q_00001", "q_00002"], [_ids(), _ids(2)])
    validate_submission(lines, ["q_00001", "q_00002"], GALLERY)
    assert all(len(line.split()) == 11 for line in lines)


@pytest.mark.parametrize("mutate,message", [
    (lambda ls: ls[:1], "1 lines for 2 queries"),
    (lambda ls: [ls[0], ls[1].rsplit(" ", 1)[0]], "line 2: 10 fields"),
    (lambda ls: [ls[0], ls[1].replace("q_00002", "q_00009")], "line 2: query id"),
    (lambda ls: [ls[0].replace("image_00000001", "image_00000000"), ls[1]], "line 1: repeated"),
    (lambda ls: [ls[0].replace("image_00000003", "image_00000003.jpeg"), ls[1]], "line 1: ids not in the gallery"),
])
def test_invalid_submissions_name_the_line(mutate, message):
    lines = mutate(format_lines(["q_00001", "q_00002"], [_ids(), _ids(2)]))
    with pytest.raises(SubmissionError, match=message):
        validate_submission(lines, ["q_00001", "q_00002"], GALLERY)


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_diverse_top_skips_near_duplicates_of_a_chosen_answer():
    from geoloc_ray.submit import diverse_top

    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(6, 16)))
    # rows 0-5: six places; rows 6-11: near-copies of places 0-5 (another view of the same place)
    vectors = np.concatenate([base, _unit(base + 0.05 * rng.normal(size=(6, 16)))]) * 3  # unnormalised, as fused
    ranked = np.array([[0, 6, 7, 1, 2, 8, 3, 9, 4, 5, 10, 11]])
    (top,) = diverse_top(ranked, vectors, 4, 0.85)
    assert top == [0, 7, 2, 3]  # 6 (copy of 0), 1 (7 stands for its place) and 8 (copy of 2) are skipped
    (plain,) = diverse_top(ranked, vectors, 4, 1.0)
    assert plain == [0, 6, 7, 1]  # threshold 1: nothing is "too close", the plain ranking
    (filled,) = diverse_top(ranked, vectors, 9, 0.85)  # only 6 places: the best skipped ones fill the rest
    assert filled == [0, 7, 2, 3, 4, 5, 6, 1, 8]
    unit = _unit(vectors)
    assert max(unit[i] @ unit[j] for i in top for j in top if i < j) <= 0.85


def test_rank_gallery_follows_the_submit_switch():
    from geoloc_ray.config import Config
    from geoloc_ray.submit import rank_gallery

    rng = np.random.default_rng(1)
    gallery = _unit(rng.normal(size=(30, 8)))
    gallery = np.concatenate([gallery, gallery + 1e-3])  # every image twice
    query = _unit(rng.normal(size=(2, 8)))
    plain = rank_gallery(Config.model_validate({"submit": {"diverse": False}}), query, gallery)
    np.testing.assert_array_equal(plain, np.argsort(-(query @ gallery.T), axis=1, kind="stable")[:, :10])
    assert all(len({i % 30 for i in row}) < 10 for row in plain)  # pairs of copies
    diverse = rank_gallery(Config(), query, gallery)
    assert Config().submit.diverse and all(len({i % 30 for i in row}) == 10 for row in diverse)
