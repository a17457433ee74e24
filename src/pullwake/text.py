"""Text Postgres cannot store: NUL (refused in ``text`` and ``jsonb``) and lone UTF-16
surrogates (not encodable as UTF-8). Find it to refuse it, or clean it to keep the rest."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import msgspec

__all__ = [
    "REPLACEMENT",
    "clean_json",
    "clean_text",
    "find_unstorable",
    "loads_lenient",
    "may_hold_unstorable",
]

REPLACEMENT = "\ufffd"
"""What cleaning puts in place of each unstorable character."""

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# A JSON text can only carry these characters as \u escapes (a raw NUL byte or an encoded
# surrogate is malformed JSON). A false match (an escaped backslash before "u0000") only costs
# the slow path.
_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")


def may_hold_unstorable(body: bytes) -> bool:
    """Whether the JSON text ``body`` may decode to unstorable text (cheap, no decode)."""
    return _ESCAPE.search(body) is not None


def clean_text(text: str) -> str:
    """``text`` with each NUL and lone surrogate replaced by U+FFFD."""
    return _UNSTORABLE.sub(REPLACEMENT, text)


def clean_json(value: Any) -> Any:
    """``value`` (decoded JSON) with every string and object key cleaned."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_json(v) for v in value]
    return value


def _describe(text: str) -> str:
    char = _UNSTORABLE.search(text)
    assert char is not None
    if char.group() == "\x00":
        return "contains a NUL character (U+0000), which cannot be stored"
    return f"contains a lone UTF-16 surrogate (U+{ord(char.group()):04X}), which is not valid text"


def find_unstorable(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """``(path, message)`` for each string or key in ``value`` Postgres cannot store; paths
    read like ``payload.a[0].b`` (a bad key is reported at its object's path)."""
    if isinstance(value, str):
        if _UNSTORABLE.search(value):
            yield path, _describe(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if _UNSTORABLE.search(key):
                yield path, f"object key {key[:64]!a} {_describe(key)}"
            name = clean_text(key)  # a path echoed in a response must be encodable itself
            yield from find_unstorable(item, f"{path}.{name}" if path else name)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from find_unstorable(item, f"{path}[{index}]")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_lenient(body: bytes) -> Any:
    """Decode JSON, lone surrogates included (msgspec refuses them); ValueError if not JSON."""
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        pass
    return json.loads(body.decode("utf-8"), parse_constant=_no_constants)
