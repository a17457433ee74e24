"""problem+json bodies: type, title, status, detail and the stable code (in-process ASGI)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Literal

import msgspec
import pytest
from litestar import get, post
from litestar.params import FromPath, JSONBody
from litestar.testing import TestClient, create_test_client

from pullwake import errors
from pullwake.http.plugin import _choices
from pullwake.http.problems import PROBLEM_MEDIA_TYPE, exception_handlers, problem_response
from pullwake.wire import RunnerRegister


@get("/raise/{name:str}")
async def raise_named(name: FromPath[str]) -> None:
    cls = getattr(errors, name)
    if cls is errors.AlreadyClaimed:
        raise cls("entity /t/1 is already claimed", claim_id="wk_0123456789ab")
    raise cls(f"detail of {name}")


@get("/boom")
async def boom() -> None:
    raise RuntimeError("internal secret: password=hunter2")


@post("/runners")
async def register(data: JSONBody[RunnerRegister]) -> dict[str, str]:
    return {"id": data.id}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:  # type: ignore[type-arg]
    with create_test_client(
        [raise_named, boom, register], exception_handlers=exception_handlers
    ) as c:
        yield c


def _problem(response: object) -> dict[str, object]:
    assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    for member in ("type", "title", "status", "detail", "code"):
        assert member in body, member
    assert body["status"] == response.status_code  # type: ignore[attr-defined]
    assert body["type"].startswith("https://")
    return body  # type: ignore[no-any-return]


def test_problem_response_shape() -> None:
    response = problem_response(409, "INVALID_OFFSET", "Invalid offset", "past the tail")
    assert response.status_code == 409
    assert response.media_type == PROBLEM_MEDIA_TYPE
    body = json.loads(msgspec.json.encode(response.content))
    assert body == {
        "type": "https://pullwake.dev/problems/invalid-offset",
        "title": "Invalid offset",
        "status": 409,
        "detail": "past the tail",
        "code": "INVALID_OFFSET",
    }


ERROR_CLASSES = [
    ("InvalidRequest", 400, "INVALID_REQUEST"),
    ("Unauthorized", 401, "UNAUTHORIZED"),
    ("Forbidden", 403, "FORBIDDEN"),
    ("NotFound", 404, "NOT_FOUND"),
    ("MethodNotAllowed", 405, "METHOD_NOT_ALLOWED"),
    ("NotAcceptable", 406, "NOT_ACCEPTABLE"),
    ("Conflict", 409, "CONFLICT"),
    ("AlreadyClaimed", 409, "ALREADY_CLAIMED"),
    ("RunnerDisabled", 409, "RUNNER_DISABLED"),
    ("Fenced", 409, "FENCED"),
    ("LeaseExpired", 409, "LEASE_EXPIRED"),
    ("InvalidOffset", 409, "INVALID_OFFSET"),
    ("EntityNotRunnable", 409, "ENTITY_NOT_RUNNABLE"),
    ("IdempotencyMismatch", 409, "IDEMPOTENCY_MISMATCH"),
    ("PayloadTooLarge", 413, "PAYLOAD_TOO_LARGE"),
    ("UnsupportedMediaType", 415, "UNSUPPORTED_MEDIA_TYPE"),
    ("RateLimited", 429, "RATE_LIMITED"),
    ("Unavailable", 503, "UNAVAILABLE"),
]


@pytest.mark.parametrize(("name", "status", "code"), ERROR_CLASSES)
def test_error_classes_carry_documented_codes(name: str, status: int, code: str) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, errors.PullwakeError)
    assert (cls.status, cls.code) == (status, code)


def test_every_error_class_is_covered() -> None:
    exported = {
        n
        for n in errors.__all__
        if n not in {"PullwakeError", "ConfigError"}
        and isinstance(getattr(errors, n), type)
        and issubclass(getattr(errors, n), errors.PullwakeError)
        and getattr(errors, n).__name__ == n  # not an old name kept as an alias
    }
    assert exported == {name for name, _, _ in ERROR_CLASSES}


def test_owner_mismatch_is_forbidden_now() -> None:
    """One code for every refusal on ownership: the old name catches the same errors."""
    assert errors.OwnerMismatch is errors.Forbidden
    assert errors.OwnerMismatch.code == "FORBIDDEN"


@pytest.mark.parametrize(("name", "status", "code"), ERROR_CLASSES)
def test_pullwake_errors_become_problems(
    client: TestClient,  # type: ignore[type-arg]
    name: str,
    status: int,
    code: str,
) -> None:
    response = client.get(f"/raise/{name}")
    assert response.status_code == status
    body = _problem(response)
    assert body["code"] == code
    assert body["title"] == getattr(errors, name).title
    assert body["type"] == f"https://pullwake.dev/problems/{code.lower().replace('_', '-')}"
    if name == "AlreadyClaimed":
        assert body["detail"] == "entity /t/1 is already claimed"
        assert body["extra"] == {"claim_id": "wk_0123456789ab"}
    else:
        assert body["detail"] == f"detail of {name}"
    if status == 503:
        assert response.headers["retry-after"] == "1"


def test_unknown_route_is_not_found_problem(client: TestClient) -> None:  # type: ignore[type-arg]
    response = client.get("/nope")
    assert response.status_code == 404
    assert _problem(response)["code"] == "NOT_FOUND"


def test_wrong_method_is_a_problem(client: TestClient) -> None:  # type: ignore[type-arg]
    response = client.delete("/boom")
    assert response.status_code == 405
    assert _problem(response)["code"] == "METHOD_NOT_ALLOWED"


def test_validation_failure_names_the_field(client: TestClient) -> None:  # type: ignore[type-arg]
    response = client.post("/runners", json={"id": "-bad id", "label": "x"})
    assert response.status_code == 400
    body = _problem(response)
    assert body["code"] == "INVALID_REQUEST"
    assert "(at id)" in str(body["detail"])
    errors_ = body["errors"]
    assert isinstance(errors_, list)
    assert [(e["key"], e["source"]) for e in errors_] == [("id", "body")]


def test_unknown_field_is_rejected(client: TestClient) -> None:  # type: ignore[type-arg]
    response = client.post("/runners", json={"id": "ok", "colour": "red"})
    assert response.status_code == 400
    body = _problem(response)
    assert body["code"] == "INVALID_REQUEST"
    assert "colour" in json.dumps(body)


def test_invalid_json_is_a_400_problem(client: TestClient) -> None:  # type: ignore[type-arg]
    response = client.post(
        "/runners", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert _problem(response)["code"] == "INVALID_REQUEST"


def test_unexpected_error_is_a_generic_500_without_details(
    client: TestClient,  # type: ignore[type-arg]
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="pullwake.http.problems"):
        response = client.get("/boom")
    assert response.status_code == 500
    body = _problem(response)
    assert body["code"] == "INTERNAL"
    text = response.text
    assert "hunter2" not in text
    assert "Traceback" not in text
    assert "RuntimeError" not in text
    # ...but it is logged for the operator
    assert "hunter2" in caplog.text


class _Leaf(msgspec.Struct):
    mode: Literal["a", "b"] | None = None


class _Tree(msgspec.Struct):
    leaves: list[_Leaf]
    top: Literal["x", "y", "z"]
    name: str = ""


@pytest.mark.parametrize(
    ("key", "choices"),
    [
        ("top", ("x", "y", "z")),
        ("leaves[3].mode", ("a", "b")),
        ("name", ()),
        ("leaves", ()),
        ("nothing.here", ()),
        ("", ()),
    ],
)
def test_the_choices_of_a_body_field(key: str, choices: tuple[str, ...]) -> None:
    """What a bad enum value's detail lists: the Literal's values at that body path."""
    assert _choices(_Tree, key) == choices
