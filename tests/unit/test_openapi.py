"""The OpenAPI document and the docs site (in-process: neither needs Postgres or Redis)."""

from __future__ import annotations

import ast
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar, get
from litestar.openapi import OpenAPIConfig
from litestar.testing import TestClient

import pullwake
from pullwake import PullWakePlugin, Settings, create_app

SETTINGS = Settings(database_url="postgresql://unused/db", redis_url="redis://unused:6379")
SRC = Path(pullwake.__file__).parent


@pytest.fixture(scope="module")
def app() -> Litestar:
    return create_app(SETTINGS)


@pytest.fixture(scope="module")
def schema(app: Litestar) -> dict[str, Any]:
    return app.openapi_schema.to_schema()


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if method in {"get", "put", "post", "delete", "patch"}
    ]


def test_info_is_pullwake_and_its_version(schema: dict[str, Any]) -> None:
    assert schema["info"]["title"] == "pullwake"
    assert schema["info"]["version"] == pullwake.__version__
    assert schema["info"]["description"]


def test_every_operation_has_a_summary_a_description_and_a_readable_id(
    schema: dict[str, Any],
) -> None:
    operations = _operations(schema)
    assert len(operations) >= 28
    ids = [op["operationId"] for _, _, op in operations]
    assert len(ids) == len(set(ids)), sorted(ids)
    for method, path, op in operations:
        where = f"{method} {path}"
        assert op.get("summary", "").strip(), where
        assert len(op.get("description", "").strip()) >= 20, where
        # lowerCamelCase, a verb first: createEntity, sendMessage, claimWake
        assert re.fullmatch(r"[a-z]+(?:[A-Z][a-z]+)+", op["operationId"]), (where, op)
    by_id = {op["operationId"]: (method, path) for method, path, op in operations}
    assert by_id["createEntity"] == ("PUT", "/v1/entities/{type_name}/{entity_id}")
    assert by_id["sendMessage"] == ("POST", "/v1/entities/{type_name}/{entity_id}/messages")
    assert by_id["claimWake"] == ("POST", "/v1/runners/{runner_id}/claim")


def test_bearer_schemes_are_declared_and_used(schema: dict[str, Any]) -> None:
    schemes = schema["components"]["securitySchemes"]
    for name in ("apiToken", "claimToken"):
        assert (schemes[name]["type"], schemes[name]["scheme"]) == ("http", "bearer")
    for method, path, op in _operations(schema):
        names = {name for requirement in op.get("security", []) for name in requirement}
        if path.startswith("/v1/"):
            assert names, f"{method} {path} declares no security"
            assert names <= set(schemes)
        else:
            assert not names, f"{method} {path}: the probes and metrics take no credentials"
    claim_done = schema["paths"]["/v1/claims/{claim_id}/done"]["post"]
    assert claim_done["security"] == [{"claimToken": []}]
    inbox = schema["paths"]["/v1/entities/{type_name}/{entity_id}/messages"]["get"]
    assert inbox["security"] == [{"apiToken": []}, {"claimToken": []}]


def test_retry_after_is_declared_on_every_429_and_503(schema: dict[str, Any]) -> None:
    seen = 0
    for method, path, op in _operations(schema):
        for status in ("429", "503"):
            if status in op["responses"]:
                seen += 1
                headers = op["responses"][status].get("headers", {})
                assert "Retry-After" in headers, f"{method} {path} {status}"
                assert headers["Retry-After"]["schema"]["type"] == "integer"
    assert seen >= 28


def test_the_wake_stream_is_text_event_stream(schema: dict[str, Any]) -> None:
    ok = schema["paths"]["/v1/runners/{runner_id}/wakes"]["get"]["responses"]["200"]
    assert list(ok["content"]) == ["text/event-stream"]


def test_request_structs_forbid_unknown_fields_and_responses_do_not(
    schema: dict[str, Any],
) -> None:
    components = schema["components"]["schemas"]
    for name in ("SendRequest", "RunnerRegister", "EntityCreate", "BatchSendRequest"):
        assert components[name]["additionalProperties"] is False, name
    for name in ("Problem", "EntityView", "SendResponse"):
        assert "additionalProperties" not in components[name], name


def test_errors_items_have_one_documented_shape(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    errors = components["Problem"]["properties"]["errors"]
    refs = [s["items"]["$ref"] for s in errors["oneOf"] if s.get("type") == "array"]
    assert refs == ["#/components/schemas/FieldError"]
    item = components["FieldError"]
    assert sorted(item["required"]) == ["key", "message", "source"]
    assert item["properties"]["source"]["enum"] == ["body", "query", "path", "header", "cookie"]
    assert all(p.get("description") for p in item["properties"].values())


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in {"src", "href"} and v]


@pytest.mark.parametrize("page", ["/schema", "/schema/swagger"])
def test_the_docs_page_works_offline(app: Litestar, page: str) -> None:
    client = TestClient(app)  # no lifespan: the docs need neither Postgres nor Redis
    resp = client.get(page)
    assert resp.status_code == 200
    html = resp.text
    assert "SwaggerUIBundle" in html
    links = _Links()
    links.feed(html)
    assert len(links.urls) == 4, links.urls  # favicon, css, bundle, preset
    for url in links.urls:
        assert url.startswith("/schema/assets/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 500, url
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)
    assert "cdn" not in html.lower()
    bundle = client.get("/schema/assets/swagger-ui-bundle.js")
    assert "javascript" in bundle.headers["content-type"]
    assert bundle.content == (SRC / "http/static/swagger-ui/swagger-ui-bundle.js").read_bytes()
    assert client.get("/schema/openapi.json").json()["info"]["title"] == "pullwake"


def test_the_assets_ship_with_their_license() -> None:
    static = SRC / "http" / "static" / "swagger-ui"
    for name in ("LICENSE", "NOTICE", "swagger-ui-bundle.js", "swagger-ui.css"):
        assert (static / name).is_file(), name
    assert "Apache License" in (static / "LICENSE").read_text()


@get("/hello", sync_to_thread=False)
def hello() -> str:
    return "hi"


def test_a_host_openapi_config_is_kept_and_gets_the_schemes() -> None:
    own = OpenAPIConfig(title="host", version="9")
    app = Litestar(route_handlers=[hello], openapi_config=own, plugins=[PullWakePlugin(SETTINGS)])
    schema = app.openapi_schema.to_schema()
    assert (schema["info"]["title"], schema["info"]["version"]) == ("host", "9")
    assert set(schema["components"]["securitySchemes"]) == {"apiToken", "claimToken"}
    assert own.components is not app.openapi_config.components  # the host's object untouched
    assert "/hello" in schema["paths"]


def test_no_module_imports_a_private_litestar_module() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(SRC)}: {name}"
                for name in names
                if name.startswith("litestar") and any(p.startswith("_") for p in name.split("."))
            ]
    assert not offenders, offenders
