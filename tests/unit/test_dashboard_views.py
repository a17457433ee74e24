"""The dashboard's pure parts: the chart's geometry, which signals an entity's page offers, the
dashboard path's checks and dev mode's banner (no services needed)."""

from __future__ import annotations

import pytest

from pullwake.config import Settings
from pullwake.dev.devmode import _print_usage
from pullwake.errors import ConfigError
from pullwake.http.dashboard import dashboard_router
from pullwake.http.dashboard.views import BUCKETS, _nice, actions_for, chart_svg
from pullwake.store.ui import UiOverview


def _overview(sends: list[int]) -> UiOverview:
    zeros = [0] * BUCKETS
    return UiOverview(
        runners_online=0,
        runners_expired=0,
        runners_offline=0,
        outstanding_wakes=0,
        oldest_wake_age_s=None,
        active_claims=0,
        parked_entities=0,
        dead_letters=0,
        sends=sends,
        claims=zeros,
        dones=zeros,
    )


@pytest.mark.parametrize(
    ("peak", "top"), [(0, 1), (0.3, 1), (1.5, 2), (2, 2), (3, 5), (7, 10), (12, 20), (4000, 5000)]
)
def test_the_axis_top_is_a_round_number_at_or_above_the_peak(peak: float, top: float) -> None:
    assert _nice(peak) == top


def test_the_chart_draws_per_second_rates_oldest_first() -> None:
    sends = [0] * BUCKETS
    sends[-1] = 50  # 50 sends in the last 10 s bucket: 5 per second, the axis top
    chart = chart_svg(_overview(sends))
    assert chart["ceiling"] == 5
    lines = {line["name"]: line for line in chart["lines"]}
    assert sorted(lines) == ["claims", "dones", "sends"]
    points = [tuple(map(float, p.split(","))) for p in lines["sends"]["points"].split()]
    assert len(points) == BUCKETS
    assert points[0] == (chart["left"], chart["bottom_y"])  # oldest, zero: bottom left
    assert points[-1][0] == pytest.approx(chart["left"] + chart["plot_w"])
    assert points[-1][1] == pytest.approx(chart["top"])  # the peak touches the top
    assert lines["sends"]["latest"] == 5
    assert lines["sends"]["total"] == 50


@pytest.mark.parametrize(
    ("status", "parked", "actions"),
    [
        ("idle", False, ["pause", "stop", "kill"]),
        ("running", False, ["pause", "stop", "kill"]),
        ("idle", True, ["resume", "pause", "stop", "kill"]),
        ("paused", False, ["resume", "stop", "kill"]),
        ("stopping", False, ["stop", "kill"]),
        ("stopped", False, ["kill"]),
        ("killed", False, []),
    ],
)
def test_an_entity_page_offers_the_signals_that_change_something(
    status: str, parked: bool, actions: list[str]
) -> None:
    assert actions_for(status, parked) == actions


@pytest.mark.parametrize("path", ["ui", "/ui/../x", "/u i", "//ui", "/ui?x=1"])
def test_a_dashboard_path_must_be_a_plain_path(path: str) -> None:
    with pytest.raises(ConfigError, match="dashboard_path"):
        dashboard_router(path)
    with pytest.raises(ConfigError, match="PULLWAKE_DASHBOARD_PATH"):
        Settings.from_env({"PULLWAKE_DASHBOARD_PATH": path})


def test_dev_mode_prints_the_dashboard_url(capsys: pytest.CaptureFixture[str]) -> None:
    _print_usage("http://127.0.0.1:8000", "pwk_x", "/ui")
    out = capsys.readouterr().out
    assert "dashboard     http://127.0.0.1:8000/ui/" in out
    _print_usage("http://127.0.0.1:8000", "pwk_x", None)
    assert "dashboard" not in capsys.readouterr().out
