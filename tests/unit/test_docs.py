"""The docs site: it builds with ``mkdocs build --strict``, its generated pages cover the code,
and the example alert rules and Grafana dashboard name only metrics pullwake exports."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import prometheus_client
import pytest
import yaml

from pullwake.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
ALERTS = DOCS / "operating" / "alerts.yml"
DASHBOARD = DOCS / "operating" / "grafana-dashboard.json"


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts/docs_hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed (the dev dependency group has it)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert not warnings, "\n".join(warnings)
    reference = (tmp_path / "http-api-reference" / "index.html").read_text()
    assert "sendMessage" in reference
    assert json.loads((tmp_path / "openapi.json").read_text())["info"]["title"] == "pullwake"
    assert "PULLWAKE_DATABASE_URL" in (tmp_path / "configuration" / "index.html").read_text()
    assert (tmp_path / "benchmark" / "results.png").stat().st_size > 10_000


def test_every_setting_is_documented_in_the_code() -> None:
    docs = _hooks().settings_docs()
    undocumented = [name for name in Settings.__struct_fields__ if len(docs.get(name, "")) < 20]
    assert not undocumented, f"Settings fields without a docstring: {undocumented}"
    table = _hooks().configuration_table()
    for name in Settings.__struct_fields__:
        assert f"`PULLWAKE_{name.upper()}`" in table


def test_the_errors_table_is_generated_from_the_error_classes() -> None:
    """The HTTP API page's error table comes from ``pullwake.errors.ERRORS``: every code once,
    with its status and its class's docstring, and no hand-kept copy beside it."""
    from pullwake.errors import ERRORS, summary

    table = _hooks().errors_table()
    for cls in ERRORS:
        row = f"| `{cls.code}` | {cls.status} |"
        assert table.count(row) == 1, cls.code
    assert summary(ERRORS[1]).split()[0] in table
    page = (DOCS / "http-api.md").read_text()
    assert page.count("<!-- errors-table -->") == 1
    assert "| `NOT_FOUND` | 404 |" not in page  # no hand-kept rows


def test_the_api_reference_has_every_operation() -> None:
    hooks = _hooks()
    schema = hooks.openapi_document()
    page = hooks.openapi_markdown(schema)
    for item in schema["paths"].values():
        for method, op in item.items():
            if method in {"get", "put", "post", "delete"}:
                assert f"{{ #{op['operationId']} }}" in page
    for name in schema["components"]["schemas"]:
        assert f"### {name} " in page


def test_no_page_names_a_path_of_a_machine_or_an_unshipped_document() -> None:
    shipped = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "SECURITY.md"]
    pages = [*shipped, *DOCS.rglob("*.md")]
    forbidden = re.compile(r"/work/|/tmp/|/home/|/Users/|ARCHITECTURE|seed-behavior|§")
    for page in pages:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            assert not forbidden.search(line), f"{page.relative_to(ROOT)}:{number}: {line}"


# --- metric names -------------------------------------------------------------------------

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def exported_metrics() -> set[str]:
    """Every series name pullwake's API and worker can expose."""
    import pullwake.authcache
    import pullwake.metrics
    from pullwake.http.plugin import http_metrics

    assert pullwake.authcache  # registers the auth cache's metrics
    families = [(f.name, f.type) for f in pullwake.metrics.REGISTRY.collect()]
    prefix = http_metrics().prefix  # Litestar's Prometheus middleware, created lazily
    families += [
        (f"{prefix}_requests", "counter"),
        (f"{prefix}_requests_error", "counter"),
        (f"{prefix}_request_duration_seconds", "histogram"),
        (f"{prefix}_requests_in_progress", "gauge"),
    ]
    families += [(f.name, f.type) for f in prometheus_client.REGISTRY.collect()]
    return {name + suffix for name, kind in families for suffix in SUFFIXES.get(kind, ("",))}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, strings, grouping labels,
    ranges and Grafana variables left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    return set(re.findall(r"\b(?:pullwake|process|python)_[a-zA-Z0-9_]+\b", expr))


def test_metric_names_of_the_tests_are_real() -> None:
    names = exported_metrics()
    for name in (
        "pullwake_sends_total",
        "pullwake_wake_to_claim_seconds_bucket",
        "pullwake_workers",
        "pullwake_http_requests_total",
    ):
        assert name in names
    assert metric_names('sum by (outcome) (rate(pullwake_sends_total{x="a_b"}[5m]))') == {
        "pullwake_sends_total"
    }


def test_the_alert_rules_name_real_metrics() -> None:
    if shutil.which("promtool"):
        check = subprocess.run(
            ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
    rules: list[dict[str, Any]] = [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]
    assert len(rules) >= 6
    exported = exported_metrics()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"Pullwake[A-Za-z]+", rule["alert"]), rule
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule
        assert rule["annotations"]["summary"], rule
        used = metric_names(rule["expr"])
        assert used, f"{rule['alert']} reads no pullwake metric"
        assert used <= exported, f"{rule['alert']}: unknown {used - exported}"
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule


def test_the_grafana_dashboard_names_real_metrics(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_metrics()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource"}
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = metric_names(target["expr"])
            assert used, f"{panel['title']}: {target['expr']}"
            assert used <= exported, f"{panel['title']}: unknown {used - exported}"
    if shutil.which("promtool"):  # the queries as recording rules: promtool parses them
        rules = [
            {"record": f"pullwake_dashboard:q{n}", "expr": expr.replace("$__rate_interval", "5m")}
            for n, expr in enumerate(t["expr"] for panel in panels for t in panel["targets"])
        ]
        path = tmp_path / "dashboard-rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr
