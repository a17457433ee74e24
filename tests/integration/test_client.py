"""``pullwake.client`` against the live app: every call, typed answers, errors by code, retries."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest

from pullwake import client as pw
from pullwake.client import AsyncClient, Client, RetryPolicy
from pullwake.config import Settings

from .helpers import ALICE, BOB, bearer, claim_ok, uid
from .servers import serve

FAST = RetryPolicy(initial_s=0.01, max_s=0.05)


@pytest.fixture
async def alice_token(api) -> str:
    return str(await api.make_token(ALICE))


@pytest.fixture
async def client(api, alice_token: str) -> Any:
    async with AsyncClient(api.base_url, alice_token, retry=FAST) as c:
        yield c


async def _runner_entity(client: AsyncClient, **create: Any) -> tuple[str, str]:
    runner_id = uid("runner")
    await client.register_runner(runner_id)
    entity = f"/job/{uid('e')}"
    policy = pw.DispatchPolicy([pw.RunnerTarget(runner_id)])
    await client.create_entity(entity, dispatch_policy=policy, **create)
    return runner_id, entity


# --- every call once ---------------------------------------------------------------------------


async def test_runner_calls(client: AsyncClient) -> None:
    runner_id = uid("runner")
    registered = await client.register_runner(runner_id, label="laptop", kind="ci")
    assert isinstance(registered, pw.RunnerView)
    assert (registered.id, registered.label, registered.kind) == (runner_id, "laptop", "ci")
    assert registered.owner_principal == ALICE
    assert isinstance(registered.created_at, datetime)

    assert [r.id for r in await client.list_runners()] == [runner_id]
    assert (await client.get_runner(runner_id)).admin_status == "enabled"

    health = await client.runner_health(runner_id)
    assert isinstance(health, pw.RunnerHealthView)
    assert (health.runner_id, health.liveness, health.active_claims) == (runner_id, "offline", 0)
    assert health.health.status == "degraded"
    assert [i["code"] for i in health.health.issues] == ["never_seen"]

    assert (await client.disable_runner(runner_id)).admin_status == "disabled"
    assert (await client.enable_runner(runner_id)).admin_status == "enabled"
    assert await client.delete_runner(runner_id) is None
    assert await client.list_runners() == []


async def test_entity_type_calls(client: AsyncClient) -> None:
    runner_id = uid("runner")
    await client.register_runner(runner_id)
    name = uid("type")
    policy = {"targets": [{"type": "runner", "runner_id": runner_id}]}  # a mapping works too
    put = await client.put_entity_type(name, policy)
    assert isinstance(put, pw.EntityTypeView)
    assert (put.name, put.owner_principal, put.default_dispatch_policy) == (name, ALICE, policy)
    assert (await client.get_entity_type(name)).default_dispatch_policy == policy

    # an entity of the type takes its default policy
    made = await client.create_entity(f"/{name}/one")
    assert made.dispatch_policy == policy


async def test_entity_calls(client: AsyncClient) -> None:
    runner_id = uid("runner")
    await client.register_runner(runner_id)
    entity = f"/job/{uid('e')}"
    made = await client.create_entity(
        entity,
        dispatch_policy=pw.DispatchPolicy([pw.RunnerTarget(runner_id)]),
        tags={"team": "a"},
        members=[BOB],
        initial_message=pw.InitialMessage({"n": 0}, idempotency_key="first"),
    )
    assert isinstance(made, pw.EntityView)
    assert (made.url, made.status, made.tags, made.members) == (
        entity,
        "idle",
        {"team": "a"},
        [BOB],
    )
    assert made.send_result is not None
    assert (made.send_result.offset, made.send_result.wake.status) == (1, "queued")

    again = await client.create_entity(
        entity,
        dispatch_policy=pw.DispatchPolicy([pw.RunnerTarget(runner_id)]),
        initial_message=pw.InitialMessage({"n": 0}),
    )
    assert again.send_result is None  # it existed: unchanged, nothing sent
    assert again.dispatch.tail_offset == 1

    sent = await client.send(entity, {"n": 1}, idempotency_key="k1")
    assert isinstance(sent, pw.SendResponse)
    assert (sent.offset, sent.wake.status, sent.duplicate) == (2, "coalesced", False)
    repeat = await client.send(entity, {"n": 1}, idempotency_key="k1")
    assert (repeat.offset, repeat.duplicate) == (2, True)

    view = await client.get_entity(entity)
    assert view.dispatch.tail_offset == 2
    assert view.dispatch.outstanding_wake_id == made.send_result.wake.id

    wake = await client.get_wake(made.send_result.wake.id or "")
    assert isinstance(wake, pw.WakeView)
    assert (wake.entity_url, wake.epoch, wake.runner_id) == (entity, 1, runner_id)

    assert (await client.set_members(entity, ["*"])).members == ["*"]
    assert (await client.signal(entity, "pause")).status == "paused"
    assert (await client.signal(entity, "resume")).status != "paused"


async def test_batch_send_answers_one_result_per_item(client: AsyncClient) -> None:
    _, entity = await _runner_entity(client)
    results = await client.send_batch(
        [
            {"entity": entity, "payload": 1},
            pw.BatchItem(entity, {"two": 2}, idempotency_key="b2"),
            {"entity": "/job/missing", "payload": 3},
        ]
    )
    assert all(isinstance(r, pw.BatchResult) for r in results)
    assert [(r.entity, r.offset) for r in results] == [
        (entity, 1),
        (entity, 2),
        ("/job/missing", None),
    ]
    assert results[0].wake is not None
    assert results[0].wake.status == "queued"
    assert results[2].problem is not None
    assert (results[2].problem.status, results[2].problem.code) == (404, "NOT_FOUND")
    assert await client.send_batch([]) == []


async def test_paging_follows_next_after(api, client: AsyncClient, alice_token: str) -> None:
    runner_id, entity = await _runner_entity(client)
    sent = [await client.send(entity, {"n": n}) for n in range(5)]

    page = await client.message_page(entity, after=1, limit=2)
    assert isinstance(page, pw.MessagePage)
    assert ([m.offset for m in page.messages], page.next_after, page.more) == ([2, 3], 3, True)
    assert page.tail_offset == 5

    messages = [m async for m in client.messages(entity, limit=2)]
    assert all(isinstance(m, pw.MessageView) for m in messages)
    assert [(m.offset, m.payload, m.sender) for m in messages] == [
        (n + 1, {"n": n}, ALICE) for n in range(5)
    ]
    assert [m.offset async for m in client.messages(entity, after=3, limit=1)] == [4, 5]

    # events are written by the claim holder
    headers = {"Authorization": f"Bearer {alice_token}"}
    note = await claim_ok(api.http, headers, runner_id, sent[0].wake.id or "")
    for n in range(3):
        resp = await api.http.post(
            f"/v1/entities{entity}/events",
            json={"payload": {"e": n}},
            headers=bearer(note["claim_token"]),
        )
        assert resp.status_code == 201, resp.text
    events = [e async for e in client.events(entity, limit=2)]
    assert all(isinstance(e, pw.EventView) for e in events)
    assert [(e.offset, e.payload, e.claim_id) for e in events] == [
        (n + 1, {"e": n}, note["claim_id"]) for n in range(3)
    ]
    page2 = await client.event_page(entity, after=2)
    assert ([e.offset for e in page2.events], page2.more) == ([3], False)


async def test_the_blocking_client_makes_the_same_calls(api, alice_token: str) -> None:
    def flow() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with Client(api.base_url, alice_token, retry=FAST) as c:
            runner_id = uid("runner")
            seen["register"] = c.register_runner(runner_id, label="sync").label
            seen["runners"] = [r.id == runner_id for r in c.list_runners()]
            seen["health"] = c.runner_health(runner_id).health.status
            seen["toggle"] = [
                c.disable_runner(runner_id).admin_status,
                c.enable_runner(runner_id).admin_status,
                c.get_runner(runner_id).admin_status,
            ]
            policy = pw.DispatchPolicy([pw.RunnerTarget(runner_id)])
            name = uid("type")
            seen["type"] = [c.put_entity_type(name, policy).name == name]
            seen["type"].append(c.get_entity_type(name).default_dispatch_policy is not None)
            entity = f"/{name}/{uid('e')}"
            c.create_entity(entity)  # the type's default policy
            sent = c.send(entity, {"n": 1})
            seen["sent"] = (sent.offset, sent.wake.status)
            seen["wake"] = c.get_wake(sent.wake.id or "").entity_url == entity
            results = c.send_batch([{"entity": entity, "payload": n} for n in (2, 3)])
            seen["batch"] = [r.offset for r in results] + c.send_batch([])
            seen["offsets"] = [m.offset for m in c.messages(entity, limit=1)]
            seen["page"] = c.message_page(entity, after=2).next_after
            seen["events"] = list(c.events(entity)) + c.event_page(entity).events
            seen["members"] = c.set_members(entity, [BOB]).members
            seen["signal"] = c.signal(entity, "pause").status
            seen["entity"] = c.get_entity(entity).status
            with pytest.raises(pw.NotFound) as caught:
                c.get_entity("/job/nope")
            seen["missing"] = caught.value.code
            c.delete_runner(runner_id)
            seen["deleted"] = c.list_runners()
        return seen

    assert await asyncio.to_thread(flow) == {
        "register": "sync",
        "runners": [True],
        "health": "degraded",
        "toggle": ["disabled", "enabled", "enabled"],
        "type": [True, True],
        "sent": (1, "queued"),
        "wake": True,
        "batch": [2, 3],
        "offsets": [1, 2, 3],
        "page": 3,
        "events": [],
        "members": [BOB],
        "signal": "paused",
        "entity": "paused",
        "missing": "NOT_FOUND",
        "deleted": [],
    }


def test_the_blocking_client_retries_too() -> None:
    answers: list[Any] = [503, httpx.ConnectError("refused"), 200]
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer, json={"runners": []})

    with Client("http://pw", transport=httpx.MockTransport(handler), retry=FAST) as client:
        assert client.retry is FAST
        assert client.list_runners() == []
        assert seen == ["GET"] * 3
        answers[:] = [httpx.ConnectError("")]
        with pytest.raises(pw.Unreachable) as caught:  # a send without a key: tried once
            client.send("/t/e", 1)
        assert seen == ["GET"] * 3 + ["POST"]
        assert caught.value.detail == "POST /v1/entities/t/e/messages: ConnectError: no answer"


def test_sync_and_async_clients_have_the_same_calls() -> None:
    import inspect

    def calls(cls: type) -> dict[str, list[str]]:
        return {
            name: list(inspect.signature(fn).parameters)
            for name, fn in vars(cls).items()
            if callable(fn) and not name.startswith("_")
        }

    async_calls = calls(AsyncClient)
    async_calls["close"] = async_calls.pop("aclose")
    assert calls(Client) == async_calls


# --- errors, from real answers -----------------------------------------------------------------


async def _raises(cls: type[pw.PullwakeClientError], call: Any) -> pw.PullwakeClientError:
    with pytest.raises(cls) as caught:
        await call
    error = caught.value
    assert type(error) is cls
    assert error.code == (cls.code_name or error.code)
    assert error.detail
    assert error.title
    assert error.status >= 400
    return error


async def test_each_problem_raises_its_class(api, client: AsyncClient, settings: Settings) -> None:
    runner_id, entity = await _runner_entity(client)
    bob_token = await api.make_token(BOB)
    async with AsyncClient(api.base_url, bob_token) as bob:
        forbidden = await _raises(pw.Forbidden, bob.get_entity(entity))
        assert forbidden.status == 403
        owned = await _raises(pw.Forbidden, bob.get_runner(runner_id))
        assert (owned.status, owned.code) == (403, "FORBIDDEN")
        name = uid("type")
        await client.put_entity_type(name)
        await _raises(pw.OwnerMismatch, bob.put_entity_type(name))  # the old name still catches

    async with AsyncClient(api.base_url, "pwk_unknown") as nobody:
        assert (await _raises(pw.Unauthorized, nobody.list_runners())).status == 401

    missing = await _raises(pw.NotFound, client.get_entity("/job/none"))
    assert (missing.status, missing.type) == (404, "https://pullwake.dev/problems/not-found")

    await client.send(entity, 1, idempotency_key="k")
    mismatch = await _raises(pw.IdempotencyMismatch, client.send(entity, 2, idempotency_key="k"))
    assert mismatch.status == 409

    too_big = {"x": "y" * (settings.max_payload_bytes + 10)}
    assert (await _raises(pw.PayloadTooLarge, client.send(entity, too_big))).status == 413

    invalid = await _raises(pw.InvalidRequest, client.message_page(entity, limit=10**6))
    assert invalid.errors
    assert invalid.errors[0]["key"] == "limit"

    await client.disable_runner(runner_id)
    policy = pw.DispatchPolicy([pw.RunnerTarget(runner_id)])
    await _raises(pw.RunnerDisabled, client.create_entity("/job/x", dispatch_policy=policy))

    await client.signal(entity, "stop")
    await _raises(pw.EntityNotRunnable, client.send(entity, 3))


async def test_rate_limited_sends(settings: Settings) -> None:
    async with serve(settings.with_(send_rate_per_s=1, send_burst=1)) as server:
        token = (await server.headers(ALICE))["Authorization"].removeprefix("Bearer ")
        base_url = str(server.http.base_url).rstrip("/")
        async with AsyncClient(base_url, token, retry=FAST) as client:
            _, entity = await _runner_entity(client)
            await client.send(entity, 0)
            # without an idempotency key the 429 is raised at once: sends are not repeated
            limited = await _raises(pw.RateLimited, client.send(entity, 1))
            assert (limited.status, limited.retry_after) == (429, 1.0)
            # with one it is tried again, no sooner than Retry-After says
            started = time.monotonic()
            sent = await client.send(entity, 2, idempotency_key="after-429")
            assert time.monotonic() - started >= 0.9
            assert (sent.offset, sent.duplicate) == (2, False)


# --- retries, over a transport that fails first ------------------------------------------------


class Flaky(httpx.AsyncBaseTransport):
    """Answers (or raises) the scripted failures first, then passes requests on."""

    def __init__(
        self, failures: list[int | Exception], inner: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.failures = failures
        self.inner = inner or httpx.AsyncHTTPTransport()
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            problem = {
                "type": "https://pullwake.dev/problems/unavailable",
                "title": "Service unavailable",
                "status": failure,
                "detail": "try later",
                "code": "UNAVAILABLE" if failure == 503 else "HTTP_ERROR",
            }
            headers = {"Retry-After": "0"}
            return httpx.Response(failure, json=problem, headers=headers, request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _flaky_client(api, token: str, failures: list[int | Exception]) -> tuple[AsyncClient, Flaky]:
    transport = Flaky(failures)
    return AsyncClient(api.base_url, token, retry=FAST, transport=transport), transport


async def test_a_get_is_retried_after_503_and_connection_errors(api, alice_token: str) -> None:
    failures: list[int | Exception] = [503, httpx.ConnectError("refused"), 502, 504]
    client, transport = _flaky_client(api, alice_token, failures[:2])
    async with client:
        assert await client.list_runners() == []
    assert transport.requests == ["GET /v1/runners"] * 3

    client, transport = _flaky_client(api, alice_token, failures)
    async with client:  # four failures: the fourth try's answer is raised
        error = await _raises(pw.PullwakeClientError, client.list_runners())
    assert (error.status, error.code) == (504, "HTTP_ERROR")
    assert len(transport.requests) == FAST.attempts


async def test_a_send_without_a_key_is_not_retried(api, alice_token: str) -> None:
    async with AsyncClient(api.base_url, alice_token) as setup:
        _, entity = await _runner_entity(setup)
    client, transport = _flaky_client(api, alice_token, [503])
    async with client:
        await _raises(pw.Unavailable, client.send(entity, {"n": 1}))
        assert len(transport.requests) == 1
        transport.failures = [httpx.ConnectError("refused")]
        with pytest.raises(pw.Unreachable) as caught:
            await client.send_batch([{"entity": entity, "payload": 1}])
        assert caught.value.status == 0
        assert isinstance(caught.value.__cause__, httpx.ConnectError)
        assert len(transport.requests) == 2
        # a batch with a key on only some messages is not repeatable either
        transport.failures = [503]
        items = [{"entity": entity, "payload": 1, "idempotency_key": "a"}, {"entity": entity}]
        await _raises(pw.Unavailable, client.send_batch(items))
        assert len(transport.requests) == 3
        assert (await client.get_entity(entity)).dispatch.tail_offset == 0


async def test_keyed_sends_are_retried(api, alice_token: str) -> None:
    async with AsyncClient(api.base_url, alice_token) as setup:
        _, entity = await _runner_entity(setup)
    client, transport = _flaky_client(api, alice_token, [503, 429])
    async with client:
        sent = await client.send(entity, {"n": 1}, idempotency_key="one")
        assert (sent.offset, len(transport.requests)) == (1, 3)
        transport.failures = [502]
        items = [{"entity": entity, "payload": n, "idempotency_key": f"b{n}"} for n in (2, 3)]
        results = await client.send_batch(items)
        assert [r.offset for r in results] == [2, 3]
        assert len(transport.requests) == 5


async def test_a_response_lost_after_a_keyed_send_is_a_duplicate(api, alice_token: str) -> None:
    """The send went in but its answer never came: the retry answers the same offset."""
    async with AsyncClient(api.base_url, alice_token) as setup:
        _, entity = await _runner_entity(setup)

    class LoseFirstAnswer(httpx.AsyncHTTPTransport):
        lost = False

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await super().handle_async_request(request)
            if not self.lost:
                self.lost = True
                await response.aclose()
                raise httpx.ReadTimeout("the answer was lost", request=request)
            return response

    async with AsyncClient(
        api.base_url, alice_token, retry=FAST, transport=LoseFirstAnswer()
    ) as client:
        sent = await client.send(entity, {"n": 1}, idempotency_key="lost")
    assert (sent.offset, sent.duplicate) == (1, True)


async def test_an_injected_http_client_is_used_and_left_open(api, alice_token: str) -> None:
    seen: list[str] = []

    async def log(request: httpx.Request) -> None:
        seen.append(request.url.path)

    async with httpx.AsyncClient(base_url=api.base_url, event_hooks={"request": [log]}) as http:
        async with AsyncClient(token=alice_token, http=http) as client:
            assert client.base_url == ""  # the injected client's own base URL applies
            assert await client.list_runners() == []
        assert not http.is_closed
        assert (await http.get("/healthz")).status_code == 200
    assert seen == ["/v1/runners", "/healthz"]


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PULLWAKE_SERVER_URL", "http://pullwake.internal:9000/")
    monkeypatch.setenv("PULLWAKE_TOKEN", "pwk_fromenv")
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"runners": []})

    with Client(transport=httpx.MockTransport(answer), timeout=3) as client:
        assert client.base_url == "http://pullwake.internal:9000"
        assert client.list_runners() == []
    assert str(seen[0].url) == "http://pullwake.internal:9000/v1/runners"
    assert seen[0].headers["authorization"] == "Bearer pwk_fromenv"
    assert seen[0].extensions["timeout"]["read"] == 3

    monkeypatch.delenv("PULLWAKE_SERVER_URL")
    monkeypatch.delenv("PULLWAKE_TOKEN")
    with Client(transport=httpx.MockTransport(answer)) as client:
        assert client.base_url == "http://127.0.0.1:8000"
        client.list_runners()
    assert "authorization" not in seen[1].headers


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.get_entity("job/1"), "with the leading '/': /job/1"),
        (lambda c: c.send("/job/1/../x", 1), "an entity is written /type/id"),
        (lambda c: c.send_batch([{"entity": "job/1", "payload": 1}]), "leading '/'"),
        (lambda c: c.get_runner("a/b"), "a runner id must match"),
        (lambda c: c.get_wake("nope"), "a wake id looks like"),
    ],
)
def test_bad_addresses_are_refused_before_any_request(
    call: Callable[[Client], Any], message: str
) -> None:
    def never(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no request expected: {request.url}")

    with (
        Client("http://x", transport=httpx.MockTransport(never)) as client,
        pytest.raises(ValueError, match=re.escape(message)),
    ):
        call(client)
