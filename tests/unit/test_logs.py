"""pullwake.logs: the text and JSON formatters, and the settings that choose them."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from pullwake.config import Settings
from pullwake.errors import ConfigError
from pullwake.logs import JsonFormatter, TextFormatter, from_env, logging_config


def _record(msg: str = "claim %s done", *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("pullwake.core.claims", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_lines_have_the_core_keys_and_the_extra_fields() -> None:
    line = JsonFormatter().format(
        _record("claim %s done", "wk_1", entity="/job/a", wake="wk_1", claim="wk_1", epoch=3)
    )
    assert "\n" not in line
    record = json.loads(line)
    assert record["level"] == "INFO"
    assert record["logger"] == "pullwake.core.claims"
    assert record["message"] == "claim wk_1 done"
    assert record["ts"].endswith("Z")
    assert (record["entity"], record["wake"], record["claim"], record["epoch"]) == (
        "/job/a",
        "wk_1",
        "wk_1",
        3,
    )


def test_json_lines_carry_the_traceback_on_one_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert "RuntimeError: boom" in json.loads(line)["exc_info"]


def test_text_lines_show_the_fields_as_key_value() -> None:
    line = TextFormatter().format(
        _record("claim %s done", "wk_1", entity="/job/a", runner="box", note="two words")
    )
    assert line.endswith(
        ' INFO  pullwake.core.claims: claim wk_1 done entity=/job/a runner=box note="two words"'
    )
    assert TextFormatter().format(_record("plain")).endswith("pullwake.core.claims: plain")


def test_the_settings_are_validated() -> None:
    assert from_env({}) == ("text", "INFO")
    assert from_env({"PULLWAKE_LOG_FORMAT": "JSON", "PULLWAKE_LOG_LEVEL": "warning"}) == (
        "json",
        "WARNING",
    )
    assert from_env({"PULLWAKE_LOG_LEVEL": "error"}, verbose=True) == ("text", "DEBUG")
    with pytest.raises(ConfigError, match="PULLWAKE_LOG_FORMAT"):
        from_env({"PULLWAKE_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="PULLWAKE_LOG_LEVEL"):
        from_env({"PULLWAKE_LOG_LEVEL": "loud"})
    with pytest.raises(ConfigError, match="PULLWAKE_LOG_FORMAT"):
        Settings(log_format="yaml").validate()
    with pytest.raises(ConfigError, match="PULLWAKE_LOG_LEVEL"):
        Settings(log_level="verbose").validate()


def test_the_config_quiets_http_clients_unless_debugging() -> None:
    assert logging_config("text", "INFO")["loggers"]["httpx"] == {"level": "WARNING"}
    assert logging_config("json", "DEBUG")["loggers"]["arq.worker"] == {"level": "DEBUG"}
