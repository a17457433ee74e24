"""core.runners.sanitize_diagnostics: what a runner may report about itself."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from pullwake.core.runners import sanitize_diagnostics


@pytest.mark.parametrize("raw", [None, {}])
def test_nothing_in_nothing_out(raw: dict[str, Any] | None) -> None:
    assert sanitize_diagnostics(raw) is None


def test_scalars_are_kept() -> None:
    raw = {
        "version": "1.2.3",
        "stream_connected": True,
        "reconnect_count": 3,
        "load": 0.5,
        "last_error": None,
        "host.name": "box-1",
        "_private": "ok",
    }
    assert sanitize_diagnostics(raw) == raw


@pytest.mark.parametrize(
    "key",
    ["", "1abc", "-x", ".x", "has space", "a/b", "a:b", "é", "x" * 65, "k{v}", "$where"],
)
def test_badly_named_keys_are_dropped(key: str) -> None:
    assert sanitize_diagnostics({key: 1, "ok": 2}) == {"ok": 2}


def test_longest_key_is_kept() -> None:
    key = "k" * 64
    assert sanitize_diagnostics({key: 1}) == {key: 1}


def test_long_strings_are_truncated() -> None:
    clean = sanitize_diagnostics({"msg": "x" * 5_000})
    assert clean == {"msg": "x" * 500}


def test_non_scalar_lists_and_other_shapes_are_dropped() -> None:
    raw: dict[str, Any] = {
        "nested_list": [{"a": 1}],
        "long_list": list(range(21)),
        "blob": b"bytes",
        "obj": object(),
        "ok": 1,
    }
    assert sanitize_diagnostics(raw) == {"ok": 1}


def test_only_well_named_numeric_members_of_nested_objects_survive() -> None:
    raw = {
        "queue": {"depth": 4, "busy": True, "ratio": 0.25, "name": "q1", "bad key": 1, "n": None},
        "empty": {"name": "only strings"},
        "deep": {"inner": {"x": 1}},
    }
    assert sanitize_diagnostics(raw) == {"queue": {"depth": 4, "busy": True, "ratio": 0.25}}


def test_everything_dropped_means_none() -> None:
    assert sanitize_diagnostics({"bad key": 1, "list": [{"x": 1}]}) is None


def test_total_size_is_capped() -> None:
    raw = {f"k{i:02d}": "v" * 500 for i in range(64)}
    clean = sanitize_diagnostics(raw)
    assert clean is not None
    assert len(msgspec.json.encode(clean)) <= 8_192
    assert 0 < len(clean) < 64
    # the survivors are the first keys, untouched apart from truncation
    assert list(clean) == list(raw)[: len(clean)]
    assert all(v == "v" * 500 for v in clean.values())


def test_result_is_json_encodable() -> None:
    clean = sanitize_diagnostics({"nan": float("nan"), "big": 10**30, "s": "é"})
    assert clean is not None
    msgspec.json.encode(clean)


def test_input_is_not_modified() -> None:
    raw = {"msg": "x" * 600, "bad key": 1}
    copy = dict(raw)
    sanitize_diagnostics(raw)
    assert raw == copy


def test_key_with_trailing_newline_is_dropped() -> None:
    assert sanitize_diagnostics({"key\n": 1, "ok": 2}) == {"ok": 2}


def test_short_scalar_lists_are_kept_as_documented() -> None:
    assert sanitize_diagnostics({"features": ["sse", "exec"]}) == {"features": ["sse", "exec"]}
