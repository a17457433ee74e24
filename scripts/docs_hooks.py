"""MkDocs hooks (``mkdocs.yml`` names this file): the pages generated from the code.

- ``http-api-reference.md`` and ``openapi.json`` from the app's OpenAPI document, built in
  process with placeholder URLs (nothing connects: no database, no Redis, no network);
- ``configuration.md``: the hand-written introduction (``docs/configuration.md``) followed by
  one row per field of :class:`pullwake.config.Settings`, with its ``PULLWAKE_*`` variable,
  type, default and the field's docstring, so the table cannot drift from the code.

``tests/unit/test_docs.py`` imports the functions below and builds the site with ``--strict``.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GENERATED_API = "http-api-reference.md"
OPENAPI_JSON = "openapi.json"
CONFIG_MARK = "<!-- settings-table -->"
ERRORS_MARK = "<!-- errors-table -->"

__all__ = [
    "configuration_table",
    "openapi_document",
    "openapi_markdown",
    "settings_docs",
]


# --- configuration ------------------------------------------------------------------------


def settings_docs() -> dict[str, str]:
    """Each ``Settings`` field's docstring (the string literal under it in ``config.py``),
    keyed by field name; a field without one is absent."""
    from pullwake import config

    tree = ast.parse(inspect.getsource(config))
    cls = next(
        node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Settings"
    )
    docs: dict[str, str] = {}
    body = cls.body
    for node, after in zip(body, [*body[1:], None], strict=True):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if (
            isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    if isinstance(value, int):
        return f"`{value}`"
    return f"`{value}`"


def _type(annotation: str) -> str:
    kinds = {"int": "integer", "bool": "boolean", "str": "string"}
    parts = [part.strip() for part in annotation.split("|")]
    shown = [kinds.get(part, part) for part in parts if part != "None"]
    return " or ".join(shown) + (" (may be unset)" if "None" in parts else "")


def configuration_table() -> str:
    """The Markdown table of every ``Settings`` field."""
    import msgspec

    from pullwake.config import Settings

    docs = settings_docs()
    annotations = Settings.__annotations__
    rows = [
        "| Variable | Type | Default | What it does |",
        "|---|---|---|---|",
    ]
    for field in msgspec.structs.fields(Settings):
        description = _cell(docs.get(field.name, ""))
        rows.append(
            f"| `PULLWAKE_{field.name.upper()}` | {_type(str(annotations[field.name]))} | "
            f"{_default(field.default)} | {description} |"
        )
    return "\n".join(rows) + "\n"


# --- HTTP API -----------------------------------------------------------------------------


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of ``pullwake serve``'s app, built without connecting anywhere."""
    from pullwake import Settings, create_app

    placeholders = Settings(database_url="postgresql://unused/db", redis_url="redis://unused")
    schema: dict[str, Any] = create_app(placeholders).openapi_schema.to_schema()
    return schema


GROUPS = {
    "runners": "Runners",
    "entity-types": "Entity types",
    "entities": "Entities",
    "messages": "Entities",
    "claims": "Claims (the holder's callbacks)",
    "wakes": "Wakes",
}


def _group(path: str) -> str:
    parts = path.strip("/").split("/")
    if parts[0] != "v1":
        return "Probes and metrics"
    return GROUPS.get(parts[1], parts[1])


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _ref_name(schema: dict[str, Any]) -> str | None:
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None


def _schema_type(schema: dict[str, Any]) -> str:
    """A short, linked description of a JSON schema."""
    name = _ref_name(schema)
    if name:
        return f"[`{name}`](#schema-{_anchor(name)})"
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return " or ".join(_schema_type(option) for option in schema[key])
    kind = schema.get("type")
    if kind == "array":
        return f"array of {_schema_type(schema.get('items', {}))}"
    if isinstance(kind, list):
        return " or ".join(f"`{k}`" for k in kind)
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if kind is None:
        return "any JSON"
    return f"`{kind}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _constraints(schema: dict[str, Any]) -> str:
    shown = []
    for key in ("minimum", "maximum", "minLength", "maxLength", "maxItems", "pattern"):
        if key in schema:
            shown.append(f"{key} `{schema[key]}`")
    if "default" in schema:
        shown.append(f"default `{json.dumps(schema['default'])}`")
    return ", ".join(shown)


def _operation(method: str, path: str, op: dict[str, Any]) -> Iterator[str]:
    yield f"### {op['summary']} {{ #{op['operationId']} }}"
    yield ""
    yield f"`{method.upper()} {path}` · operation id `{op['operationId']}`"
    security = sorted({name for req in op.get("security", []) for name in req})
    yield ""
    yield "Credentials: " + (
        ", ".join(f"[`{name}`](#security-schemes)" for name in security) if security else "none"
    )
    yield ""
    yield op["description"]
    params = op.get("parameters", [])
    if params:
        yield ""
        yield "| Parameter | In | Type | Required | Constraints |"
        yield "|---|---|---|---|---|"
        for param in params:
            schema = param.get("schema", {})
            yield (
                f"| `{param['name']}` | {param['in']} | {_schema_type(schema)} | "
                f"{'yes' if param.get('required') else 'no'} | {_cell(_constraints(schema))} |"
            )
    body = op.get("requestBody")
    if body:
        for media, content in body.get("content", {}).items():
            required = "" if body.get("required") else " (optional)"
            yield ""
            yield f"Request body{required}: `{media}`, {_schema_type(content.get('schema', {}))}"
    yield ""
    yield "| Status | Means | Body |"
    yield "|---|---|---|"
    for status, response in op.get("responses", {}).items():
        contents = response.get("content") or {}
        bodies = ", ".join(
            f"`{media}` {_schema_type(content.get('schema', {}))}"
            for media, content in contents.items()
        )
        headers = ", ".join(f"`{name}`" for name in response.get("headers") or {})
        means = _cell(response.get("description", ""))
        if headers:
            means += f" (headers: {headers})"
        yield f"| {status} | {means} | {bodies or '–'} |"
    yield ""


def _schema_section(name: str, schema: dict[str, Any]) -> Iterator[str]:
    yield f"### {name} {{ #schema-{_anchor(name)} }}"
    yield ""
    if schema.get("description"):
        yield _cell(schema["description"])
        yield ""
    properties = schema.get("properties")
    if not properties:
        yield f"Type: {_schema_type({k: v for k, v in schema.items() if k != 'title'})}"
        yield ""
        return
    required = set(schema.get("required", ()))
    yield "| Field | Type | Required | Constraints |"
    yield "|---|---|---|---|"
    for field, sub in properties.items():
        yield (
            f"| `{field}` | {_schema_type(sub)} | {'yes' if field in required else 'no'} | "
            f"{_cell(_constraints(sub))} |"
        )
    yield ""


def openapi_markdown(schema: dict[str, Any]) -> str:
    """The reference page: every operation by group, the security schemes and every schema."""
    info = schema["info"]
    lines = [
        "# HTTP API reference",
        "",
        "<!-- Generated from the OpenAPI document by scripts/docs_hooks.py: edit the route "
        "declarations in src/pullwake/http/, not this page. -->",
        "",
        f"Generated from the OpenAPI {schema['openapi']} document of pullwake {info['version']} "
        f"(`/schema/openapi.json` of a running server; [download this one]({OPENAPI_JSON})). "
        "A running server also serves it as Swagger UI at `/schema`. What each route does, "
        "who may call it and the error codes are explained in [HTTP API](http-api.md).",
        "",
    ]
    by_group: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, item in schema["paths"].items():
        for method, op in item.items():
            if method in {"get", "put", "post", "delete", "patch"}:
                by_group.setdefault(_group(path), []).append((method, path, op))
    for group, operations in by_group.items():
        lines += [f"## {group}", ""]
        for method, path, op in operations:
            lines += list(_operation(method, path, op))
    lines += ["## Security schemes", ""]
    lines += ["| Name | Scheme | Means |", "|---|---|---|"]
    for name, scheme in schema["components"]["securitySchemes"].items():
        lines.append(
            f"| `{name}` | {scheme['type']} {scheme.get('scheme', '')} | "
            f"{_cell(scheme.get('description', ''))} |"
        )
    lines += ["", "## Schemas", ""]
    for name, sub in sorted(schema["components"]["schemas"].items()):
        lines += list(_schema_section(name, sub))
    return "\n".join(lines)


# --- MkDocs hooks -------------------------------------------------------------------------


def on_files(files: Any, config: Any) -> Any:
    """Add the generated reference page and the OpenAPI document to the site."""
    from mkdocs.structure.files import File

    schema = openapi_document()
    files.append(File.generated(config, GENERATED_API, content=openapi_markdown(schema)))
    files.append(File.generated(config, OPENAPI_JSON, content=json.dumps(schema, indent=2)))
    return files


def errors_table() -> str:
    """The API's error codes, statuses and when each happens, from ``pullwake.errors.ERRORS``
    (each class's docstring), so the page cannot drift from the code."""
    from pullwake.errors import ERRORS, PullwakeError, summary

    lines = ["| Code | Status | When |", "|---|---|---|"]
    for cls in sorted(ERRORS, key=lambda c: (c is PullwakeError, c.status, c.code)):
        when = (
            "an unexpected fault: logged, answered with a generic body and no stack trace"
            if cls is PullwakeError
            else summary(cls).replace("``", "`")
        )
        lines.append(f"| `{cls.code}` | {cls.status} | {_cell(when)} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill the generated tables into the pages that ask for them."""
    if CONFIG_MARK in markdown:
        markdown = markdown.replace(CONFIG_MARK, configuration_table())
    if ERRORS_MARK in markdown:
        markdown = markdown.replace(ERRORS_MARK, errors_table())
    return markdown
