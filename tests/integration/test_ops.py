"""Operational endpoints: liveness, readiness and the OpenAPI schema."""

from __future__ import annotations


async def test_healthz(http):
    resp = await http.get("/healthz")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"status": "ok"}


async def test_readyz_reports_postgres_and_redis(http):
    resp = await http.get("/readyz")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body.pop("workers").keys() == {"working", "impaired", "silent"}
    assert body == {"status": "ready", "postgres": "ok", "redis": "ok"}


async def test_openapi_schema_lists_the_api(http):
    resp = await http.get("/schema/openapi.json")
    assert resp.status_code == 200, resp.text
    paths = resp.json()["paths"]
    for path in (
        "/v1/runners",
        "/v1/runners/{runner_id}/claim",
        "/v1/entities/{type_name}/{entity_id}/messages",
        "/v1/claims/{claim_id}/done",
    ):
        assert path in paths, sorted(paths)
