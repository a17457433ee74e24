"""``pullwake.errors`` is the one source of the API's error codes: one class per code, each with
a docstring saying when it happens, and everything that lists codes derived from it."""

from __future__ import annotations

from collections import Counter

import pytest

from pullwake import errors
from pullwake.client import errors as client_errors
from pullwake.http import docs


def test_each_code_maps_to_one_class() -> None:
    codes = Counter(cls.code for cls in errors.ERRORS)
    assert [code for code, n in codes.items() if n > 1] == []
    for cls in errors.ERRORS:
        assert errors.error_for_code(cls.code) is cls
    assert errors.error_for_code("TEAPOT") is None


def test_the_registry_holds_every_class_answered_over_http() -> None:
    """Every class of the module is in :data:`errors.ERRORS` but the start-up only one."""
    defined = {
        value
        for value in vars(errors).values()
        if isinstance(value, type)
        and issubclass(value, errors.PullwakeError)
        and value.__module__ == errors.__name__
    }
    assert defined - set(errors.ERRORS) == {errors.ConfigError}


@pytest.mark.parametrize("cls", [*errors.ERRORS, errors.ConfigError], ids=lambda c: c.code)
def test_every_error_class_says_when_it_happens(cls: type[errors.PullwakeError]) -> None:
    assert "__doc__" in vars(cls), "the docstring is the class's own, not inherited"
    assert len(errors.summary(cls)) >= 20


def test_each_status_has_at_most_one_default_class() -> None:
    defaults = [cls for cls in errors.ERRORS if vars(cls).get("status_default", False)]
    statuses = Counter(cls.status for cls in defaults)
    assert [status for status, n in statuses.items() if n > 1] == []
    for cls in defaults:
        assert errors.error_for_status(cls.status) is cls
    assert errors.error_for_status(409) is errors.Conflict  # not AlreadyClaimed etc.
    assert errors.error_for_status(418) is None


def test_every_status_the_api_answers_has_a_default_class() -> None:
    """A framework answer of any status a pullwake error has gets a code of that status."""
    for cls in errors.ERRORS:
        default = errors.error_for_status(cls.status)
        assert default is not None, cls.status


def test_the_client_has_an_exception_for_every_server_code() -> None:
    for cls in errors.ERRORS:
        client_class = client_errors.error_for(cls.code)
        assert client_class is not client_errors.PullwakeClientError, cls.code
        assert client_class.code_name == cls.code


def test_the_client_knows_no_status_code_the_server_does_not_answer() -> None:
    answered = {cls.code for cls in errors.ERRORS}
    assert set(client_errors._CODE_BY_STATUS.values()) <= answered
    client_only = {"UNREACHABLE", "INVALID_RESPONSE"}  # no HTTP answer, or not a pullwake one
    client_codes = {
        cls.code_name
        for cls in client_errors.PullwakeClientError.__subclasses__()
        if cls.code_name is not None
    }
    assert client_codes - client_only == answered


def test_the_openapi_descriptions_name_every_code_of_their_status() -> None:
    for cls in errors.ERRORS:
        assert f"{cls.code}: {errors.summary(cls)}" in docs._meaning(cls.status)
