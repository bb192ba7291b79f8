from __future__ import annotations

import pytest

from corolla.protocol.uids import UID_DELIMITER, make_uid, make_uids, parse_uid


def test_make_uid() -> None:
    assert make_uid("smollm2-135m-hf", 12) == f"smollm2-135m-hf{UID_DELIMITER}12"


def test_make_uids_covers_start_to_end_exclusive() -> None:
    assert make_uids("m", 2, 5) == ["m.2", "m.3", "m.4"]
    assert make_uids("m", 3, 3) == []


@pytest.mark.parametrize(
    ("prefix", "index"),
    [("m", 0), ("llama-3.1-8b", 31), ("org/model.v2", 7), ("x", 12345)],
)
def test_parse_inverts_make(prefix: str, index: int) -> None:
    assert parse_uid(make_uid(prefix, index)) == (prefix, index)


def test_parse_uses_the_last_delimiter() -> None:
    assert parse_uid("a.b.c.3") == ("a.b.c", 3)


@pytest.mark.parametrize(
    "uid",
    ["", "model", "model.", ".3", "model.-1", "model.3a", "model.1.5x", "model. 3", "model.+3", "3"],
)
def test_bad_uids_raise_value_error(uid: str) -> None:
    with pytest.raises(ValueError, match=r"not a block uid") as info:
        parse_uid(uid)
    assert repr(uid) in str(info.value)
