"""pullwake.text: finding and cleaning text Postgres cannot store."""

from __future__ import annotations

import json

import msgspec
import pytest

from pullwake.text import clean_json, find_unstorable, loads_lenient, may_hold_unstorable


def test_paths_name_values_keys_and_list_items() -> None:
    value = {"payload": {"a": {"b": "x\x00"}, "l": [1, "\udc00"], "k\x00": {"c": "\ud800"}}}
    found = dict(find_unstorable(value))
    assert set(found) == {"payload.a.b", "payload.l[1]", "payload", "payload.k\ufffd.c"}
    assert "NUL" in found["payload.a.b"]
    assert "U+DC00" in found["payload.l[1]"]
    assert "object key 'k\\x00'" in found["payload"]
    # every path and message can itself be sent back as JSON
    msgspec.json.encode(found)


def test_clean_json_keeps_everything_else() -> None:
    value = {"a\x00": ["x\ud800y", 1, None, True, 2.5], "b": {"c": "fine"}}
    assert clean_json(value) == {"a\ufffd": ["x\ufffdy", 1, None, True, 2.5], "b": {"c": "fine"}}
    assert not list(find_unstorable(clean_json(value)))


@pytest.mark.parametrize(
    ("body", "flagged"),
    [
        (rb'{"a": "\u0000"}', True),
        (rb'{"a": "\uD83D"}', True),
        (rb'{"a": "\udfff"}', True),
        (rb'{"a": "\u00e9 \u2028"}', False),
        (b'{"a": "plain"}', False),
    ],
)
def test_byte_scan_flags_only_escapes_that_may_decode_to_unstorable_text(
    body: bytes, flagged: bool
) -> None:
    assert may_hold_unstorable(body) is flagged


def test_lenient_decode_takes_lone_surrogates() -> None:
    assert loads_lenient(rb'{"a": "\ud800"}') == {"a": "\ud800"}


@pytest.mark.parametrize(
    ("bad", "error", "words"),
    [
        (b'{"a": NaN}', ValueError, "NaN is not JSON"),
        (b"\xff\xfe", UnicodeDecodeError, "can't decode"),
        (b'{"a": ', json.JSONDecodeError, "Expecting value"),
    ],
)
def test_lenient_decode_refuses_what_is_not_json(
    bad: bytes, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        loads_lenient(bad)
