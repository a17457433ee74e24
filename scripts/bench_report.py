"""The benchmark's results: one scenario's numbers, the targets, and the files written.

``write_results`` writes ``results.json`` (everything), ``results.md`` (the table and the
targets) and ``results.png`` (a chart, when matplotlib imports) into the results directory,
which ignores itself in git.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TARGETS", "Result", "Target", "check_targets", "markdown", "summarize", "write_results"]

# What each column compares with: the floor's latency at 1 in flight, its throughput at 32.
FLOOR_LATENCY, FLOOR_THROUGHPUT, ARQ = "floor", "floor_32", "arq_10ms"


@dataclass
class Result:
    """One scenario: latency in ms, throughput per second, costs per operation."""

    key: str
    name: str  # short, for the table
    title: str
    unit: str
    latency: dict[str, float]
    throughput: float | None
    server_cpu_us: float | None = None
    runner_cpu_us: float | None = None
    bench_cpu_us: float | None = None
    pg_cpu_us: float | None = None
    redis_cpu_us: float | None = None
    pg_xacts: float | None = None
    pg_rollbacks: float | None = None
    stats_settled: bool = False
    window_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Target:
    """A goal of the issue: ``metric`` of scenario ``key`` compared with ``value``."""

    key: str
    metric: str  # a Result field, or "p50" / "p50_vs_floor"
    op: str  # "<=" or ">="
    value: float
    label: str


TARGETS = (
    Target("coalesced", "server_cpu_us", "<=", 150, "coalesced send: server CPU µs/send"),
    Target("coalesced", "throughput", ">=", 4000, "coalesced sends/s"),
    Target("batch", "throughput", ">=", 25_000, "batched messages/s"),
    Target("cycle", "server_cpu_us", "<=", 600, "full cycle: server CPU µs/cycle"),
    Target("cycle", "runner_cpu_us", "<=", 1200, "full cycle: runner CPU µs/cycle"),
    Target("cycle", "throughput", ">=", 1500, "full cycles/s with 3 runners"),
    Target("wake", "p50_vs_floor", "<=", 3, "send → wake p50 ÷ floor p50"),
    Target("fleet", "redis_connections_max", "<=", 16, "idle fleet: Redis connections"),
    Target("fleet", "rss_per_session_kb", "<=", 20, "idle fleet: server memory KB/stream"),
    Target("fleet", "idle_cpu_pct", "<=", 5, "idle fleet: server CPU % of a core"),
    Target("fleet", "p99", "<=", 10, "idle fleet: send → wake p99 ms"),
)


def metric(results: dict[str, dict[str, Any]], key: str, name: str) -> float | None:
    """A number of one scenario (``results`` as in the JSON); None when not measured."""
    result = results.get(key)
    if result is None:
        return None
    if name in ("p50", "p99"):
        value = result["latency"].get(name)
    elif name == "p50_vs_floor":
        value = result.get("ratios", {}).get("p50_vs_floor")
    else:
        value = result.get(name, result.get("extra", {}).get(name))
    return None if value is None else float(value)


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    """p50 and throughput of every scenario relative to the floor and to arq (10 ms)."""
    floor_p50 = metric(results, FLOOR_LATENCY, "p50")
    floor_rate = metric(results, FLOOR_THROUGHPUT, "throughput")
    arq_p50 = metric(results, ARQ, "p50")
    arq_rate = metric(results, ARQ, "throughput")
    arq_slow_p50 = metric(results, "arq_default", "p50")
    for key, result in results.items():
        p50 = metric(results, key, "p50")
        rate = metric(results, key, "throughput")
        result["ratios"] = {
            "p50_vs_floor": _ratio(p50, floor_p50),
            "p50_vs_arq_10ms": _ratio(p50, arq_p50),
            "p50_vs_arq_default": _ratio(p50, arq_slow_p50),
            "throughput_vs_floor": _ratio(rate, floor_rate),
            "throughput_vs_arq_10ms": _ratio(rate, arq_rate),
        }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def check_targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target with what was measured and whether it is met (None: not measured)."""
    rows = []
    for target in TARGETS:
        measured = metric(results, target.key, target.metric)
        met = None
        if measured is not None:
            met = measured <= target.value if target.op == "<=" else measured >= target.value
        rows.append(
            {
                "target": target.label,
                "goal": f"{'≤' if target.op == '<=' else '≥'} {_num(target.value)}",
                "measured": measured,
                "met": met,
            }
        )
    return rows


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if digits == 0 and abs(value) >= 10:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ms(value: float | None) -> str:
    return "–" if value is None else (f"{value:,.0f}" if value >= 100 else f"{value:.2f}")


def _x(value: float | None) -> str:
    return "–" if value is None else (f"{value:.2f}×" if value < 10 else f"{value:,.0f}×")


def summarize(result: Result) -> str:
    """A few lines about one scenario, as printed while the bench runs."""
    lat = result.latency
    lines = [result.title]
    if lat:
        lines.append(
            f"  latency  n={lat['n']:.0f}  p50 {_ms(lat['p50'])} ms  p95 {_ms(lat['p95'])} ms  "
            f"p99 {_ms(lat['p99'])} ms  max {_ms(lat['max'])} ms"
        )
    costs = [
        f"throughput {_num(result.throughput)}/s" if result.throughput else "",
        f"server CPU {_num(result.server_cpu_us)} µs/{result.unit}",
        f"runner CPU {_num(result.runner_cpu_us)} µs" if result.runner_cpu_us is not None else "",
        f"Postgres CPU {_num(result.pg_cpu_us)} µs",
        f"{_num(result.pg_xacts, 2)} xacts/{result.unit}"
        + (f" ({_num(result.pg_rollbacks, 2)} rolled back)" if result.pg_rollbacks else "")
        + ("" if result.stats_settled else " (unsettled)"),
    ]
    lines.append("  " + "  ".join(c for c in costs if c))
    for name, value in result.extra.items():
        if isinstance(value, dict) and "p50" in value:
            lines.append(
                f"  {name}: p50 {_ms(value['p50'])}  p95 {_ms(value['p95'])}  "
                f"p99 {_ms(value['p99'])}"
            )
    lines += [f"  ({note})" for note in result.notes]
    return "\n".join(lines)


COLUMNS = (
    "scenario",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "throughput /s",
    "server CPU µs/op",
    "runner CPU µs/op",
    "Postgres CPU µs/op",
    "PG xacts/op",
    "p50 × floor",
    "p50 × arq 10 ms",
    "throughput × floor",
)


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for result in results.values():
        lat = result["latency"]
        ratios = result.get("ratios", {})
        cells = [
            f"{result['name']} (per {result['unit']})",
            _ms(lat.get("p50")),
            _ms(lat.get("p95")),
            _ms(lat.get("p99")),
            _num(result["throughput"]),
            _num(result["server_cpu_us"]),
            _num(result["runner_cpu_us"]),
            _num(result["pg_cpu_us"]),
            _num(result["pg_xacts"], 2)
            + (f" ({_num(result['pg_rollbacks'], 2)} rb)" if result.get("pg_rollbacks") else ""),
            _x(ratios.get("p50_vs_floor")),
            _x(ratios.get("p50_vs_arq_10ms")),
            _x(ratios.get("throughput_vs_floor")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def machine_line(report: dict[str, Any]) -> str:
    """One line about the machine and how busy it was."""
    m = report["machine"]
    before = " ".join(f"{v:.2f}" for v in m["load_average_before"])
    after = " ".join(f"{v:.2f}" for v in m.get("load_average_after", ()))
    calibration = (
        f"{m['cpu_calibration_ms_before']:.0f} / {m.get('cpu_calibration_ms_after', 0):.0f}"
    )
    return (
        f"pullwake bench ({report['profile']['name']}): {m['cpu']}, {m['cores']} cores, "
        f"{m['kernel']}, Python {m['python']}, PostgreSQL {m.get('postgres', '?')}, Redis "
        f"{m.get('redis', '?')}, arq {m['arq']}, wrk {m['wrk'] or 'not installed'}; load average "
        f"{before} before, {after} after; CPU calibration (a 5M-addition Python loop) "
        f"{calibration} ms before / after; {m.get('duration_s', 0):.0f} s."
    )


def markdown(report: dict[str, Any]) -> str:
    """The results as Markdown: the machine, the table, the targets and the notes."""
    lines = [
        machine_line(report),
        "",
        *table(report["results"]),
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
    ]
    for row in report["targets"]:
        met = {True: "yes", False: "no", None: "–"}[row["met"]]
        lines.append(f"| {row['target']} | {row['goal']} | {_num(row['measured'], 2)} | {met} |")
    if report["notes"]:
        lines += ["", *(f"- {note}" for note in report["notes"])]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> bool:
    """Latency, throughput and CPU per operation as one PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = list(report["results"].values())
    names = [r["key"] for r in results]
    y = list(range(len(results)))
    fig, (lat_ax, rate_ax, cpu_ax) = plt.subplots(1, 3, figsize=(15, 0.55 * len(y) + 2))
    p50 = [r["latency"].get("p50", 0) or 0 for r in results]
    p99 = [r["latency"].get("p99", 0) or 0 for r in results]
    lat_ax.barh(y, p99, color="#c6dbef", label="p99")
    lat_ax.barh(y, p50, color="#2171b5", label="p50")
    lat_ax.set_xscale("log")
    lat_ax.set_xlabel("latency, ms (log)")
    lat_ax.legend(loc="upper right", fontsize="small")
    rates = [r["throughput"] or 0 for r in results]
    rate_ax.barh(y, rates, color="#41ab5d")
    rate_ax.set_xscale("log")
    rate_ax.set_xlabel("throughput, operations/s (log)")
    height = 0.27
    for offset, (name, color, label) in enumerate(
        (
            ("server_cpu_us", "#fd8d3c", "server"),
            ("runner_cpu_us", "#fdd0a2", "runners"),
            ("pg_cpu_us", "#9e9ac8", "Postgres backends"),
        )
    ):
        values = [r[name] or 0 for r in results]
        cpu_ax.barh(
            [v + (offset - 1) * height for v in y], values, height, color=color, label=label
        )
    cpu_ax.set_xscale("log")
    cpu_ax.set_xlabel("CPU per operation, µs (log)")
    cpu_ax.legend(loc="upper right", fontsize="small")
    for ax in (lat_ax, rate_ax, cpu_ax):
        ax.set_yticks(y)
        ax.set_yticklabels(names if ax is lat_ax else [""] * len(y))
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    machine = report["machine"]
    fig.suptitle(
        f"pullwake bench ({report['profile']['name']}): {machine['cores']} cores, "
        f"PostgreSQL {machine.get('postgres', '?')}, Redis {machine.get('redis', '?')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(report: dict[str, Any], out: Path) -> None:
    """Ratios and targets into ``report``; then JSON, Markdown and PNG into ``out``."""
    add_ratios(report["results"])
    report["targets"] = check_targets(report["results"])
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("*\n")
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (out / "results.md").write_text(text)
    drawn = chart(report, out / "results.png")
    print("\n" + text)
    written = ["results.json", "results.md"] + (["results.png"] if drawn else [])
    print(f"written to {out}/: {', '.join(written)}" + ("" if drawn else " (no matplotlib)"))


def main(argv: list[str] | None = None) -> int:
    """``python scripts/bench_report.py chart RESULTS_JSON OUT_PNG``: the chart of a saved run
    (``bench-results/results.json``, or the docs' ``docs/benchmark/results.json``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="bench_report.py", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    draw = sub.add_parser("chart", help="draw the PNG chart of a results.json")
    draw.add_argument("results", type=Path)
    draw.add_argument("png", type=Path)
    args = parser.parse_args(argv)
    report = json.loads(args.results.read_text())
    if not chart(report, args.png):
        print("matplotlib is not installed", file=sys.stderr)
        return 1
    print(f"written {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
