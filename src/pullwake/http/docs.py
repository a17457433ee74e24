"""OpenAPI declarations shared by the routes, and the docs site.

- :func:`problems` / :func:`success`: the responses each route can give.
- :class:`PullwakeOperation`: every pullwake operation's post-processing (``Retry-After`` on
  429 and 503, an optional body where the route takes one).
- :class:`StrictStructSchema`: request structs that forbid unknown fields say so in their schema.
- :func:`openapi_config`: ``info``, the Bearer security schemes and Swagger UI served from the
  package's own files (no CDN).

Only Litestar's public API is used here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar import Router
from litestar.datastructures import CacheControlHeader
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import (
    Components,
    OpenAPIHeader,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
    SecurityRequirement,
    SecurityScheme,
)
from litestar.plugins import OpenAPISchemaPlugin, OpenAPISchemaPluginProtocol
from litestar.static_files import create_static_files_router
from litestar.typing import FieldDefinition

from pullwake.errors import ERRORS, summary
from pullwake.wire import Base, Problem

__all__ = [
    "API_TOKEN",
    "CLAIM_TOKEN",
    "EITHER_TOKEN",
    "PROBLEM_MEDIA_TYPE",
    "SWAGGER_UI_VERSION",
    "OfflineSwagger",
    "OptionalBody",
    "PullwakeOperation",
    "StrictStructSchema",
    "add_security_components",
    "openapi_config",
    "problems",
    "security_components",
    "success",
    "unavailable",
]

PROBLEM_MEDIA_TYPE = "application/problem+json"
SWAGGER_UI_VERSION = "5.35.0"
STATIC_DIR = Path(__file__).parent / "static" / "swagger-ui"

API_TOKEN: list[SecurityRequirement] = [{"apiToken": []}]
"""The security of a route that takes an API token (``pwk_``) or the host's own credentials."""
CLAIM_TOKEN: list[SecurityRequirement] = [{"claimToken": []}]
"""The security of a claim callback: the claim's own token (``pwc_``)."""
EITHER_TOKEN: list[SecurityRequirement] = [*API_TOKEN, *CLAIM_TOKEN]
"""Paging an entity's inbox or events: a member's API token, or that entity's live claim token."""


def _meaning(status: int) -> str:
    """A problem response's description, from the error classes of ``status`` (their codes
    and docstrings)."""
    classes = [cls for cls in ERRORS if cls.status == status]
    if len(classes) == 1:
        return f"{classes[0].code}: {summary(classes[0])}"
    return "one of: " + "; ".join(f"{cls.code}: {summary(cls)}" for cls in classes)


RETRY_AFTER = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.INTEGER, minimum=0),
    description="seconds to wait before retrying",
    required=True,
)


def problems(*statuses: int, body: bool = False) -> dict[int, ResponseSpec]:
    """Problem+json responses of a ``/v1`` route: 400, 401 and 503 always, 413 and 415 when it
    takes a body, plus ``statuses``."""
    codes = {400, 401, 503, *statuses} | ({413, 415} if body else set())
    return {status: _problem(status) for status in sorted(codes)}


def _problem(status: int) -> ResponseSpec:
    return ResponseSpec(
        data_container=Problem,
        media_type=PROBLEM_MEDIA_TYPE,
        description=_meaning(status),
        generate_examples=False,
    )


def unavailable() -> dict[int, ResponseSpec]:
    """The 503 alone (``/readyz``)."""
    return {503: _problem(503)}


def success(status: int, container: Any, description: str) -> dict[int, ResponseSpec]:
    """A second success response (e.g. 200 beside 201, or 204 with no body)."""
    return {
        status: ResponseSpec(
            data_container=container, description=description, generate_examples=False
        )
    }


@dataclass
class PullwakeOperation(Operation):
    """A pullwake operation: 429 and 503 answers declare their ``Retry-After`` header."""

    def __post_init__(self) -> None:
        for status, response in (self.responses or {}).items():
            if status in ("429", "503") and isinstance(response, OpenAPIResponse):
                response.headers = {**(response.headers or {}), "Retry-After": RETRY_AFTER}


@dataclass
class OptionalBody(PullwakeOperation):
    """An operation whose JSON body may be left out (Litestar marks every body required)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.request_body, RequestBody):
            self.request_body.required = False


def _forbids_unknown_fields(field_definition: FieldDefinition) -> bool:
    kind = field_definition.type_
    return (
        not field_definition.is_union
        and isinstance(kind, type)
        and issubclass(kind, Base)
        and kind.__struct_config__.forbid_unknown_fields
    )


class StrictStructSchema(OpenAPISchemaPlugin):
    """pullwake's request structs (``forbid_unknown_fields``) get ``additionalProperties:
    false``: the schema Litestar's own struct plugin (``inner``) makes, plus that."""

    def __init__(self, inner: OpenAPISchemaPluginProtocol) -> None:
        self.inner = inner

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        """Only pullwake's request structs."""
        return _forbids_unknown_fields(field_definition)

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: Any) -> Schema:
        """The inner plugin's schema with ``additionalProperties: false``."""
        schema = self.inner.to_openapi_schema(field_definition, schema_creator)
        schema.additional_properties = False
        return schema

    @classmethod
    def install(cls, plugins: list[Any]) -> None:
        """Put one ahead of the plugin that makes msgspec Struct schemas (found by what it
        supports, not by its private type); nothing when there is none."""
        probe = FieldDefinition.from_annotation(Problem)
        if any(isinstance(p, cls) for p in plugins):
            return
        for at, plugin in enumerate(plugins):
            if isinstance(plugin, OpenAPISchemaPlugin):
                supported = plugin.is_plugin_supported_field(probe)
            elif isinstance(plugin, OpenAPISchemaPluginProtocol):
                supported = plugin.is_plugin_supported_type(Problem)
            else:
                continue
            if supported:
                plugins.insert(at, cls(plugin))
                return


def security_components() -> Components:
    """The two Bearer schemes pullwake's operations name."""
    return Components(
        security_schemes={
            "apiToken": SecurityScheme(
                type="http",
                scheme="bearer",
                bearer_format="pwk_…",
                description="An API token from `pullwake tokens create` (or the host app's own "
                "credentials, when it passes an `authenticate` hook).",
            ),
            "claimToken": SecurityScheme(
                type="http",
                scheme="bearer",
                bearer_format="pwc_…",
                description="A claim's token, from the claim answer or the webhook body: valid "
                "for that claim only.",
            ),
        }
    )


class OfflineSwagger(SwaggerRenderPlugin):
    """Swagger UI from the package's own files, served beside it at ``<docs path>/assets``."""

    def __init__(self, docs_path: str, **kwargs: Any) -> None:
        assets = f"{docs_path.rstrip('/')}/assets"
        super().__init__(
            version=SWAGGER_UI_VERSION,
            js_url=f"{assets}/swagger-ui-bundle.js",
            css_url=f"{assets}/swagger-ui.css",
            standalone_preset_js_url=f"{assets}/swagger-ui-standalone-preset.js",
            favicon=f'<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">',
            **kwargs,
        )

    def receive_router(self, router: Router) -> None:
        """Serve the assets (and Swagger UI's OAuth2 redirect page) on the docs router."""
        super().receive_router(router)
        router.register(
            create_static_files_router(
                path="/assets",
                directories=[STATIC_DIR],
                name="pullwake-docs-assets",
                include_in_schema=False,
                cache_control=CacheControlHeader(max_age=86_400, public=True),
            )
        )


def openapi_config(version: str, docs_path: str = "/schema") -> OpenAPIConfig:
    """The standalone app's OpenAPI: pullwake's ``info``, the security schemes, and Swagger UI
    (at ``docs_path`` and ``docs_path/swagger``) and the JSON spec (``docs_path/openapi.json``)
    without any CDN."""
    return OpenAPIConfig(
        title="pullwake",
        version=version,
        summary="Pull-based wake broker for workers that cannot be reached from outside",
        description="Send messages to entities; runners behind NAT pull wakes over Server-Sent "
        "Events, claim them and report back. Errors are RFC 9457 problem+json with a stable "
        "`code`.",
        path=docs_path,
        components=[security_components()],
        render_plugins=[
            OfflineSwagger(docs_path, path=["/", "/swagger"]),
            JsonRenderPlugin(),
        ],
    )


def add_security_components(config: OpenAPIConfig) -> None:
    """Add the security schemes to a host app's own OpenAPI config (its components kept)."""
    components = config.components
    listed = components if isinstance(components, list) else [components]
    if not any(
        "apiToken" in (c.security_schemes or {}) for c in listed if isinstance(c, Components)
    ):
        config.components = [*listed, security_components()]
