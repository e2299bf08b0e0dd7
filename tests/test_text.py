from geoloc_ray.preprocess.text import (
    clean_query,
    clean_text,
    default_directional_phrases,
    is_directional,
    split_sentences,
    split_statement,
    training_statements,
)

DIRS = default_directional_phrases()


def test_directional_sentences_are_detected():
    for s in ["To the north of the building there is a lake.", "A road runs on the left side.",
              "Trees stand to its right.", "The southern part is a field.", "In the upper-left corner is a pool."]:
        assert is_directional(s, DIRS), s
    for s in ["The roof is red.", "A tall building with many windows.", "Northumberland-style brick facade."]:
        assert not is_directional(s, DIRS), s


def test_training_statements_drop_whole_directional_sentences_and_keep_the_rest():
    caption = ("The building has a red gabled roof. To the north of the building there is a lake. "
               "Its facade is cream with many small windows. A road runs on the left side.")
    out = training_statements(caption, DIRS, max_words=24, min_words=2)
    assert out == ["The building has a red gabled roof", "Its facade is cream with many small windows"]
    assert not any("lake" in s or "road" in s for s in out)


def test_long_sentences_are_split_into_short_statements_without_losing_words():
    sentence = ("The building has a red gabled roof and a cream facade with many windows, while a small parking "
                "lot with several cars sits beside the entrance near a grey road")
    parts = split_statement(sentence, max_words=12)
    assert all(len(p.split()) <= 12 for p in parts)
    assert len(parts) > 1
    content = {"red", "gabled", "roof", "cream", "facade", "windows", "parking", "cars", "grey", "road"}
    assert content <= set(" ".join(parts).split())


def test_statements_are_deduplicated_and_short_fragments_dropped():
    out = training_statements("It is tall. It is tall. Ok.", DIRS, max_words=24, min_words=2)
    assert out == ["It is tall"]


def test_cleaning_normalises_unicode_and_whitespace():
    assert clean_text("  a\u00a0red\troof\u200b \n ") == "a red roof"
    assert clean_query("ｔａｌｌ  building") == "tall building"
    assert split_sentences("One. Two!  Three?\nFour") == ["One.", "Two!", "Three?", "Four"]


def test_custom_phrase_list_is_honoured():
    assert is_directional("next to the lake", [r"\bnext to\b"])
    assert not is_directional("to the north of it", [])
