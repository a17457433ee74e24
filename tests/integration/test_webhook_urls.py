"""Webhook target URLs: http(s) only, and no private, loopback or link-local address in any
spelling unless PULLWAKE_WEBHOOK_ALLOW_PRIVATE is set; refused both on entities and on entity
types' default policies. (Redirects not followed, private names refused at delivery and the
secret never echoed are in test_webhooks.)"""

from __future__ import annotations

import pytest

from pullwake.config import Settings

from .helpers import ALICE, assert_problem, uid
from .servers import serve

REFUSED = [
    "ftp://hooks.example.com/x",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "gopher://hooks.example.com/",
    "http:///no-host",
    "http://user:pw@hooks.example.com/x",
    "http://hooks.example.com:99999/x",
    "http://127.0.0.1/x",
    "http://127.1/x",
    "http://2130706433/x",
    "http://0x7f000001/x",
    "http://0177.0.0.1/x",
    "http://localhost./x",
    "http://LOCALHOST/x",
    "http://api.localhost/x",
    "http://[::1]/x",
    "http://[::ffff:127.0.0.1]/x",
    "http://[fe80::1]/x",
    "http://[fd00::1]/x",
    "http://169.254.169.254/latest/meta-data",
    "http://10.0.0.8/x",
    "http://172.16.0.1/x",
    "http://192.168.0.1/x",
    "http://100.64.0.1/x",
    "http://0.0.0.0/x",
    "http://224.0.0.1/x",
]
PRIVATE_BUT_ALLOWABLE = ["http://127.0.0.1:9/x", "http://[::1]:9/x", "http://localhost:9/x"]


def _policy(url: str) -> dict[str, object]:
    return {"targets": [{"type": "webhook", "url": url}]}


@pytest.mark.parametrize("url", REFUSED)
async def test_webhook_url_is_refused(http, alice, url: str) -> None:
    resp = await http.put(
        f"/v1/entities/hook/{uid('e')}", json={"dispatch_policy": _policy(url)}, headers=alice
    )
    assert_problem(resp, 400, "INVALID_REQUEST")
    resp = await http.put(
        f"/v1/entity-types/{uid('t')}",
        json={"default_dispatch_policy": _policy(url)},
        headers=alice,
    )
    assert_problem(resp, 400, "INVALID_REQUEST")


async def test_public_webhook_url_is_accepted(http, alice) -> None:
    for url in ("https://hooks.example.com/x", "http://8.8.8.8:8080/hook", "http://cafe1.example/"):
        resp = await http.put(
            f"/v1/entities/hook/{uid('e')}", json={"dispatch_policy": _policy(url)}, headers=alice
        )
        assert resp.status_code == 201, (url, resp.text)


async def test_private_webhook_urls_need_the_setting(settings: Settings) -> None:
    async with serve(settings.with_(webhook_allow_private=True)) as server:
        alice = await server.headers(ALICE)
        for url in PRIVATE_BUT_ALLOWABLE:
            resp = await server.http.put(
                f"/v1/entities/hook/{uid('e')}",
                json={"dispatch_policy": _policy(url)},
                headers=alice,
            )
            assert resp.status_code == 201, (url, resp.text)
        for url in ("ftp://127.0.0.1/x", "http://user:pw@127.0.0.1/x"):  # never allowed
            resp = await server.http.put(
                f"/v1/entities/hook/{uid('e')}",
                json={"dispatch_policy": _policy(url)},
                headers=alice,
            )
            assert_problem(resp, 400, "INVALID_REQUEST")
