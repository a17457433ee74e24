"""Errors raised before a handler runs (routing, content type, JSON decoding) are problem+json
with a stable ``code`` too, never a bare Litestar body and never a 500. The basic 404/405/
malformed-JSON cases are in test_bad_input; these are the rest."""

from __future__ import annotations

import pytest

from pullwake.wire import MAX_JSON_DEPTH

from .helpers import assert_problem, send


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
        "application/xml",
        "text/json",
    ],
)
async def test_non_json_content_type_is_415(http, alice, world, db, content_type) -> None:
    """A JSON body under another content type is refused: browsers may send text/plain and form
    bodies cross-origin without a preflight, which matters in dev mode (no credentials needed)."""
    headers = {**alice, "Content-Type": content_type} if content_type else alice
    for method, path in (
        ("POST", f"{world.entity.path}/messages"),
        ("POST", "/v1/runners"),
        ("PUT", world.entity.path),
    ):
        resp = await http.request(method, path, content=b'{"payload": 1}', headers=headers)
        body = assert_problem(resp, 415, "UNSUPPORTED_MEDIA_TYPE")
        assert "application/json" in body["detail"]
    assert await db.fetchval("SELECT count(*) FROM inbox_messages") == 0


async def test_json_content_type_variants_are_accepted(http, alice, world) -> None:
    for content_type in (
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/merge-patch+json",
    ):
        resp = await http.post(
            f"{world.entity.path}/messages",
            content=b'{"payload": 1}',
            headers={**alice, "Content-Type": content_type},
        )
        assert resp.status_code == 202, (content_type, resp.text)


async def test_405_lists_the_allowed_methods(http, alice, world) -> None:
    resp = await http.delete(f"{world.entity.path}/messages", headers=alice)
    assert_problem(resp, 405, "METHOD_NOT_ALLOWED")
    assert set(resp.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


async def test_options_lists_every_method_of_the_path(http, world) -> None:
    """Litestar's own OPTIONS handler listed only the first handler's methods."""
    for path, methods in (
        ("/v1/runners", {"GET", "POST", "OPTIONS"}),
        (f"/v1/runners/{world.runner_id}", {"GET", "DELETE", "OPTIONS"}),
        (world.entity.path, {"GET", "PUT", "OPTIONS"}),
        (f"{world.entity.path}/messages", {"GET", "POST", "OPTIONS"}),
    ):
        resp = await http.options(path)
        assert resp.status_code == 204, resp.text
        assert set(resp.headers["Allow"].replace(" ", "").split(",")) == methods


@pytest.mark.parametrize(
    "body",
    [
        b'{"payload": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}",
        b'{"payload": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"payload": ' + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"}",
        b'{"payload": ' + b"[" * 100_000,
    ],
    ids=["just-too-deep", "5000-deep", "2000-deep-objects", "100000-unclosed"],
)
async def test_deeply_nested_json_is_400_not_500(http, alice, world, db, body) -> None:
    resp = await http.post(
        f"{world.entity.path}/messages",
        content=body,
        headers={**alice, "Content-Type": "application/json"},
    )
    assert "nests deeper" in assert_problem(resp, 400, "INVALID_REQUEST")["detail"]
    assert await db.fetchval("SELECT count(*) FROM inbox_messages") == 0


async def test_nesting_up_to_the_limit_round_trips(http, alice, world) -> None:
    payload: object = "deep"
    for _ in range(MAX_JSON_DEPTH - 2):  # the body's object and "payload" take two levels
        payload = [payload]
    await send(http, alice, world.entity, payload)
    page = (await http.get(f"{world.entity.path}/messages", headers=alice)).json()
    assert page["messages"][0]["payload"] == payload


@pytest.mark.parametrize(
    ("content", "word"),
    [
        (b'{"payload": 1', "JSON"),
        (b'{"payload": 1}}', "JSON"),
        (b"\xff\xfe{}", ""),
        (b'{"payload": NaN}', ""),
        (b'{"payload": "\\ud800"}', ""),
        (b"[]", "object"),
        (b"null", ""),
        (b'"text"', ""),
        (b'{"payload": 1, "payload": 2}', ""),
    ],
)
async def test_malformed_bodies_are_400(http, alice, world, content, word) -> None:
    resp = await http.post(
        f"{world.entity.path}/messages",
        content=content,
        headers={**alice, "Content-Type": "application/json"},
    )
    if resp.status_code == 202:  # duplicate keys: the last one wins, as in most parsers
        assert content.count(b'"payload"') == 2
        return
    body = assert_problem(resp, 400, "INVALID_REQUEST")
    assert word in body["detail"], body


@pytest.mark.parametrize(
    "query", ["limit=abc", "limit=0", "limit=1001", "after=-1", "after=x1", "after=%00"]
)
async def test_bad_query_parameters_are_400(http, alice, world, query) -> None:
    resp = await http.get(f"{world.entity.path}/messages?{query}", headers=alice)
    assert_problem(resp, 400, "INVALID_REQUEST")
