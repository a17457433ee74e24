"""OpenAPI declarations shared by the routes: the problem responses each route can give."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

# Private in Litestar 2 (pinned <3): the plugin that turns msgspec Structs into schemas.
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Operation, RequestBody, Schema
from litestar.typing import FieldDefinition

from pullwake.wire import Problem

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator

__all__ = ["PROBLEM_MEDIA_TYPE", "OptionalBody", "problems", "success"]

PROBLEM_MEDIA_TYPE = "application/problem+json"

_MEANING = {
    400: "INVALID_REQUEST: a path, query or body value is malformed (named in detail/errors)",
    401: "UNAUTHORIZED: missing, unknown or revoked credentials, or the wrong kind of token",
    403: "FORBIDDEN or OWNER_MISMATCH: the caller may not act on this resource",
    404: "NOT_FOUND",
    409: "a state conflict: ALREADY_CLAIMED, RUNNER_DISABLED, FENCED, LEASE_EXPIRED, "
    "INVALID_OFFSET, ENTITY_NOT_RUNNABLE or IDEMPOTENCY_MISMATCH",
    413: "PAYLOAD_TOO_LARGE: the body or the message payload is over its limit",
    415: "the body is not JSON (Content-Type must be application/json)",
    429: "RATE_LIMITED: see the Retry-After header",
    503: "UNAVAILABLE: Postgres or Redis cannot be reached; see Retry-After",
}


def problems(*statuses: int, body: bool = False) -> dict[int, ResponseSpec]:
    """Problem+json responses of a ``/v1`` route: 400, 401 and 503 always, 413 and 415 when it
    takes a body, plus ``statuses``."""
    codes = {400, 401, 503, *statuses} | ({413, 415} if body else set())
    return {
        status: ResponseSpec(
            data_container=Problem,
            media_type=PROBLEM_MEDIA_TYPE,
            description=_MEANING[status],
            generate_examples=False,
        )
        for status in sorted(codes)
    }


def success(status: int, container: Any, description: str) -> dict[int, ResponseSpec]:
    """A second success response (e.g. 200 beside 201, or 204 with no body)."""
    return {
        status: ResponseSpec(
            data_container=container, description=description, generate_examples=False
        )
    }


@dataclass
class OptionalBody(Operation):
    """An operation whose JSON body may be left out (Litestar marks every body required)."""

    def __post_init__(self) -> None:
        if isinstance(self.request_body, RequestBody):
            self.request_body.required = False


class StrictStructSchema(StructSchemaPlugin):
    """Request structs that forbid unknown fields say so: ``additionalProperties: false``."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        """Only pullwake's request structs (``forbid_unknown_fields``)."""
        return (
            super().is_plugin_supported_field(field_definition)
            and field_definition.is_subclass_of(msgspec.Struct)
            and bool(getattr(field_definition.type_, "__struct_config__", None))
            and field_definition.type_.__struct_config__.forbid_unknown_fields
        )

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        """Litestar's struct schema plus ``additionalProperties: false``."""
        schema = super().to_openapi_schema(field_definition, schema_creator)
        schema.additional_properties = False
        return schema


def install_strict_struct_schema(plugins: list[Any]) -> None:
    """Put :class:`StrictStructSchema` ahead of Litestar's own struct schema plugin."""
    at = next((i for i, p in enumerate(plugins) if type(p) is StructSchemaPlugin), len(plugins))
    plugins.insert(at, StrictStructSchema())
