"""``pullwake.client``: problem codes to exceptions, Retry-After, and the retry policy."""

from __future__ import annotations

import email.utils
from typing import Any

import httpx
import pytest

from pullwake import errors as server_errors
from pullwake.client import Client, RetryPolicy, errors

SERVER_CLASSES = sorted(server_errors.ERRORS, key=lambda cls: cls.__name__)


def _answer(status: int, body: Any = None, **headers: str) -> Client:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, bytes):
            return httpx.Response(status, content=body, headers=headers)
        return httpx.Response(
            status, json=body, headers={"Content-Type": "application/problem+json", **headers}
        )

    return Client("http://pw", transport=httpx.MockTransport(handler), retry=RetryPolicy(1))


@pytest.mark.parametrize("server_class", SERVER_CLASSES, ids=lambda c: c.code)
def test_every_server_code_raises_the_client_class_of_the_same_name(
    server_class: type[server_errors.PullwakeError],
) -> None:
    problem = {
        "type": f"https://pullwake.dev/problems/{server_class.code.lower()}",
        "title": server_class.title,
        "status": server_class.status,
        "detail": "what went wrong",
        "code": server_class.code,
        "errors": [{"key": "payload", "message": "bad", "source": "body"}],
        "extra": {"retry_after_s": 7},
    }
    with (
        _answer(server_class.status, problem) as client,
        pytest.raises(errors.PullwakeClientError) as caught,
    ):
        client.list_runners()
    error = caught.value
    expected = (
        "InternalError" if server_class is server_errors.PullwakeError else server_class.__name__
    )
    assert type(error).__name__ == expected
    assert type(error) is not errors.PullwakeClientError
    assert (error.status, error.code, error.detail) == (
        server_class.status,
        server_class.code,
        "what went wrong",
    )
    assert (error.title, error.errors) == (server_class.title, problem["errors"])
    assert error.retry_after == 7.0  # from the body when there is no header
    assert error.response is not None
    assert str(error) == f"{server_class.code} ({server_class.status}): what went wrong"


def test_every_code_by_status_has_a_class_and_the_same_fallback() -> None:
    for code in errors._CODE_BY_STATUS.values():
        assert errors.error_for(code) is not errors.PullwakeClientError, code
    for status, code in errors._CODE_BY_STATUS.items():
        server_class = server_errors.error_for_status(status)
        assert server_class is not None
        assert server_class.code == code


def test_an_unknown_code_is_the_base_class() -> None:
    problem = {"type": "t", "title": "New", "status": 418, "detail": "d", "code": "TEAPOT"}
    with _answer(418, problem) as client, pytest.raises(errors.PullwakeClientError) as caught:
        client.list_runners()
    assert type(caught.value) is errors.PullwakeClientError
    assert (caught.value.code, caught.value.status) == ("TEAPOT", 418)


@pytest.mark.parametrize(
    ("status", "cls", "code"),
    [
        (502, errors.PullwakeClientError, "HTTP_ERROR"),
        (503, errors.Unavailable, "UNAVAILABLE"),
        (429, errors.RateLimited, "RATE_LIMITED"),
        (404, errors.NotFound, "NOT_FOUND"),
    ],
)
def test_an_answer_without_problem_details_maps_by_status(
    status: int, cls: type[errors.PullwakeClientError], code: str
) -> None:
    page = b"<html><body>\n  <h1>Bad   gateway</h1></body></html>"
    with _answer(status, page, **{"Retry-After": "3"}) as client, pytest.raises(cls) as caught:
        client.get_runner("r")
    error = caught.value
    assert type(error) is cls
    assert (error.status, error.code, error.retry_after) == (status, code, 3.0)
    assert error.detail.startswith(f"HTTP {status} ")
    assert "<h1>Bad gateway</h1>" in error.detail  # whitespace folded: one line


def test_a_success_with_an_unexpected_body_is_invalid_response() -> None:
    with (
        _answer(200, {"something": "else"}) as client,
        pytest.raises(errors.InvalidResponse) as caught,
    ):
        client.get_runner("r")
    assert caught.value.status == 200
    assert "GET /runners/r" in caught.value.detail


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("2", 2.0),
        (" 0.5 ", 0.5),
        ("-3", 0.0),
        ("soon", None),
        ("nan", None),
        (email.utils.formatdate(1_000_030, usegmt=True), 30.0),
        ("Thu, 01 Jan 1970 00:00:00 -0000", 0.0),
    ],
)
def test_retry_after(header: str | None, seconds: float | None) -> None:
    assert errors.parse_retry_after(header, now=1_000_000) == seconds


def test_backoff_doubles_to_its_cap_with_added_jitter() -> None:
    policy = RetryPolicy(attempts=6, initial_s=0.5, max_s=3, jitter=0.5, random=lambda: 1.0)
    assert [policy.backoff_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert [policy.delay_s(n) for n in range(1, 7)] == [0.75, 1.5, 3.0, 4.5, 4.5, None]
    calm = RetryPolicy(attempts=3, initial_s=0.5, jitter=0.5, random=lambda: 0.0)
    assert [calm.delay_s(n) for n in (1, 2, 3)] == [0.5, 1.0, None]


def test_retry_after_is_a_floor_and_has_a_ceiling() -> None:
    policy = RetryPolicy(initial_s=0.5, jitter=0.2, max_retry_after_s=10, random=lambda: 0.5)
    assert policy.delay_s(1, retry_after=2) == pytest.approx(2.2)  # never sooner than asked
    assert policy.delay_s(2, retry_after=0) == pytest.approx(1.1)  # back-off when it is longer
    assert policy.delay_s(1, retry_after=11) is None  # too long to wait: raise instead
    assert RetryPolicy(attempts=1).delay_s(1, retry_after=0) is None


def test_which_failures_are_retried() -> None:
    policy = RetryPolicy()
    assert [s for s in (400, 404, 409, 429, 500, 502, 503, 504) if policy.retries_status(s)] == [
        429,
        502,
        503,
        504,
    ]
    request = httpx.Request("GET", "http://pw")
    assert policy.retries_error(httpx.ConnectError("x", request=request))
    assert policy.retries_error(httpx.ReadTimeout("x", request=request))
    assert policy.retries_error(httpx.RemoteProtocolError("x", request=request))
    assert not policy.retries_error(httpx.UnsupportedProtocol("x", request=request))


@pytest.mark.parametrize(
    "kwargs", [{"attempts": 0}, {"initial_s": 0}, {"initial_s": 2, "max_s": 1}, {"jitter": 2}]
)
def test_a_policy_that_makes_no_sense_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        RetryPolicy(**kwargs)


def test_a_long_retry_after_is_raised_not_waited_for() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(429, headers={"Retry-After": "120"})

    with (
        Client("http://pw", transport=httpx.MockTransport(handler)) as client,
        pytest.raises(errors.RateLimited) as caught,
    ):
        client.list_runners()
    assert (len(calls), caught.value.retry_after) == (1, 120.0)
