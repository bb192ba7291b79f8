"""Stop strings and incremental decoding, as pure functions over text and token ids."""

from __future__ import annotations

import pytest

from corolla.api.text import IncrementalDecoder, StopScanner, find_stop, held_back, truncate_at_stop


def test_truncation_at_the_earliest_stop() -> None:
    assert truncate_at_stop("Hello world. Bye", ["world", "."]) == ("Hello ", True)
    assert truncate_at_stop("Hello", ["x"]) == ("Hello", False)
    assert truncate_at_stop("Hello", []) == ("Hello", False)
    assert truncate_at_stop("stop at once", ["stop"]) == ("", True)
    assert find_stop("abcabc", ["c"], start=3) == 5


def test_held_back_is_the_longest_suffix_that_begins_a_stop() -> None:
    assert held_back("Hello wor", ["world"]) == 3
    assert held_back("Hello", ["world"]) == 0
    assert held_back("ab", ["abc", "bx"]) == 2
    assert held_back("xx\n", ["\n\n"]) == 1
    assert held_back("anything", []) == 0


def run_scanner(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    scanner = StopScanner(stops)
    out = [scanner.feed(piece) for piece in pieces] + [scanner.feed("", final=True)]
    return out, scanner.stopped


def test_a_stop_split_across_increments_never_reaches_the_client() -> None:
    out, stopped = run_scanner(["Hello wo", "rld", " and more"], ["world"])
    assert out == ["Hello ", "", "", ""] and stopped


def test_held_back_text_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    out, stopped = run_scanner(["Hello wo", "rk", "s"], ["world"])
    assert "".join(out) == "Hello works" and out[0] == "Hello " and not stopped


def test_final_releases_what_was_held_back() -> None:
    out, stopped = run_scanner(["Hello wor"], ["world"])
    assert out == ["Hello ", "wor"] and not stopped


def test_without_stops_everything_passes_at_once() -> None:
    out, _ = run_scanner(["a", "b"], [])
    assert out == ["a", "b", ""]


# A byte-level "tokenizer": each token is some bytes; decoding replaces incomplete UTF-8 with U+FFFD.
VOCAB = {1: "Hé".encode(), 2: "€".encode()[:2], 3: "€".encode()[2:], 4: b" ok", 5: "日".encode()[:1], 0: b""}


def decode(ids: list[int]) -> str:
    return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def test_incremental_decoding_never_emits_half_a_character() -> None:
    decoder = IncrementalDecoder(decode)
    pieces = [decoder.push(token) for token in [1, 2, 3, 0, 4]]
    assert pieces == ["Hé", "", "€", "", " ok"]
    assert decoder.flush() == ""
    assert "".join(pieces) == decode([1, 2, 3, 0, 4])


def test_an_unfinished_character_at_the_end_is_flushed_as_decoding_gives_it() -> None:
    decoder = IncrementalDecoder(decode)
    pieces = [decoder.push(token) for token in [4, 5]]
    assert pieces == [" ok", ""]
    assert decoder.flush() == "\ufffd"


@pytest.mark.parametrize("ids", [[1, 2, 3, 4, 1], [2, 3, 2, 3, 4], [4, 4, 4, 1, 0, 1]])
def test_increments_add_up_to_the_whole_decoding(ids: list[int]) -> None:
    decoder = IncrementalDecoder(decode)
    text = "".join(decoder.push(token) for token in ids) + decoder.flush()
    assert text == decode(ids)
