"""Streamed text: UTF-8 reassembly at every split point, stop strings, syllable counts."""

from __future__ import annotations

import pytest

from tiblocal.text import StopMatcher, Utf8Stream, count_syllables, tibetan_share

TIBETAN = "བཀྲ་ཤིས་བདེ་ལེགས། ང་ཚོ་ལྷ་སར་འགྲོ་གི་ཡོད།"
MIXED = "Tibetan བོད་ཡིག and 中文 text, ཨོཾ་མ་ཎི་པདྨེ་ཧཱུྃ 😀 end"


@pytest.mark.parametrize("text", [TIBETAN, MIXED])
def test_utf8_stream_every_single_split(text: str) -> None:
    data = text.encode("utf-8")
    for cut in range(len(data) + 1):
        s = Utf8Stream()
        out = s.feed(data[:cut])
        assert "\ufffd" not in out
        out += s.feed(data[cut:]) + s.finish()
        assert out == text, cut


@pytest.mark.parametrize("text", [TIBETAN, MIXED])
def test_utf8_stream_byte_by_byte_never_shows_partial_characters(text: str) -> None:
    s = Utf8Stream()
    shown = []
    for b in text.encode("utf-8"):
        piece = s.feed(bytes([b]))
        assert "\ufffd" not in piece
        shown.append(piece)
    assert "".join(shown) + s.finish() == text


def test_utf8_stream_two_splits_in_one_character() -> None:
    data = "ཀྵ".encode("utf-8")  # two 3-byte characters
    s = Utf8Stream()
    assert s.feed(data[:1]) == ""
    assert s.pending == data[:1]
    assert s.feed(data[1:2]) == ""
    assert s.feed(data[2:4]) == "ཀ"
    assert s.feed(data[4:]) == "ྵ"


def test_utf8_stream_invalid_bytes_become_replacement_without_error() -> None:
    s = Utf8Stream()
    assert s.feed(b"a\xffb") == "a\ufffdb"
    # a lead byte followed by a byte that cannot continue it
    assert s.feed(b"\xe0") == ""
    assert s.feed(b"x") == "\ufffdx"


def test_utf8_stream_incomplete_at_end_becomes_one_replacement() -> None:
    s = Utf8Stream()
    assert s.feed("ཀ".encode()[:2]) == ""
    assert s.finish() == "\ufffd"


def test_stop_matcher_holds_back_a_possible_stop_prefix() -> None:
    m = StopMatcher(["### Instruction:"])
    assert m.feed("answer #") == "answer "
    assert m.feed("## Ins") == ""
    assert m.feed("truction: more") == ""
    assert m.stopped
    assert m.finish() == ""


def test_stop_matcher_releases_text_that_did_not_become_a_stop() -> None:
    m = StopMatcher(["### Instruction:"])
    assert m.feed("a ##") == "a "
    assert m.feed("# x") == "### x"
    assert not m.stopped
    assert m.feed("tail ###") == "tail "
    assert m.finish() == "###"


def test_stop_matcher_earliest_of_several() -> None:
    m = StopMatcher(["Human:", "[INST]"])
    assert m.feed("ok [INST] then Human:") == "ok "
    assert m.stopped


def test_stop_matcher_without_stops_passes_everything() -> None:
    m = StopMatcher([])
    assert m.feed("### Instruction:") == "### Instruction:"


def test_syllables() -> None:
    assert count_syllables("བཀྲ་ཤིས་བདེ་ལེགས།") == 4
    assert count_syllables("ང་ཚོ་ ལྷ་སར།") == 4
    assert count_syllables("no tibetan here") == 0
    assert count_syllables("") == 0
    assert tibetan_share("བོད abc") == pytest.approx(3 / 6)
    assert tibetan_share("   ") == 0.0


def test_longest_phrase_run_finds_loops_of_three_or_more_syllables() -> None:
    from tiblocal.text import longest_phrase_run

    assert longest_phrase_run("ཀ་ཁ་ག་ཀ་ཁ་ག་ཀ་ཁ་ག།") == (3, "ཀ་ཁ་ག")
    assert longest_phrase_run("ང་ཚོ་ལྷ་སར་འགྲོ། ང་ཚོ་ལྷ་སར་འགྲོ།")[0] == 2  # a phrase said twice is not a loop
    assert longest_phrase_run("ཀ་ཀ་ཀ་ཀ་ཀ་ཀ།") == (2, "ཀ་ཀ་ཀ")  # single syllables repeating: six make a 3-syllable phrase twice
    assert longest_phrase_run("བཀྲ་ཤིས་བདེ་ལེགས། ཞེས་ " * 5)[0] == 5  # the phrase across shad and spaces
    assert longest_phrase_run("Hello hello hello") == (1, "") and longest_phrase_run("") == (1, "")
