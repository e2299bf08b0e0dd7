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
