"""Turns the runs into medians with spread, RESULTS.md and a plot; reads nothing but the results.

Every figure is shown next to the direct connection and nginx from the same session, with the
core that limited it.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

Runs = list[dict[str, Any]]

# (label, where in a run: "result.latency_us.p50" / "derived.cpu_us_per_request", unit scale)
METRICS: dict[str, list[tuple[str, str, float]]] = {
    "W1": [
        ("p50 µs", "result.latency_us.p50", 1),
        ("p99 µs", "result.latency_us.p99", 1),
        ("CPU µs/req", "derived.cpu_us_per_request", 1),
    ],
    "W2": [
        ("req/s", "result.rps", 1),
        ("p99 µs", "result.latency_us.p99", 1),
        ("CPU µs/req", "derived.cpu_us_per_request", 1),
    ],
    "W4": [
        ("TTFT p50 µs", "result.ttfb_us.p50", 1),
        ("TTFT p99 µs", "result.ttfb_us.p99", 1),
        ("gap p99 ms", "result.gap_us.p99", 1e-3),
        ("gap max ms", "result.gap_us.max", 1e-3),
        ("errors %", "derived.error_rate", 100),
        ("CPU µs/chunk", "derived.cpu_us_per_chunk", 1),
    ],
    "W5": [
        ("gap p99 ms", "result.gap_us.p99", 1e-3),
        ("gap max ms", "result.gap_us.max", 1e-3),
        ("errors %", "derived.error_rate", 100),
        ("CPU µs/chunk", "derived.cpu_us_per_chunk", 1),
        ("RSS peak MB", "derived.rss_peak_mb", 1),
        ("open peak", "result.open_peak", 1),
    ],
    "W7": [
        ("rejections/s", "result.rps", 1),
        ("p99 µs", "result.latency_us.p99", 1),
        ("CPU µs/rej", "derived.cpu_us_per_request", 1),
    ],
}


OTHERS = ("others (cores)", "derived.other_tenants_cores", 1.0)


def pick(run: dict[str, Any], path: str) -> float | None:
    """A number out of a nested run dict, or None when it is absent."""
    node: Any = run
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, int | float) else None


def stat(runs: Runs, path: str, scale: float = 1.0) -> dict[str, float] | None:
    """Median, min and max of one metric over the runs."""
    xs = [v * scale for r in runs if (v := pick(r, path)) is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def limit(runs: Runs) -> str:
    """The most common limiting core over the runs."""
    counts = Counter(r["derived"]["limit"] for r in runs)
    return counts.most_common(1)[0][0] if counts else "-"


def summarise(results: dict[str, dict[str, Runs]]) -> dict[str, Any]:
    """{group: {target: {label: stat, "limit": str}}} for every group of runs."""
    out: dict[str, Any] = {}
    for group, by_target in results.items():
        metrics = [*METRICS[group.split("@")[0].split(":")[0]], OTHERS]
        out[group] = {}
        for target, runs in by_target.items():
            row: dict[str, Any] = {label: stat(runs, path, sc) for label, path, sc in metrics}
            row["limit"] = limit(runs)
            row["stall_free"] = all(r["derived"].get("stall_free", True) for r in runs)
            row["stall_free_strict"] = all(
                r["derived"].get("stall_free_strict", True) for r in runs
            )
            out[group][target] = row
    return out


def _fmt(s: dict[str, float] | None) -> str:
    if s is None:
        return "-"
    m, lo, hi = s["median"], s["min"], s["max"]
    digits = 0 if abs(m) >= 100 else 1 if abs(m) >= 10 else 2
    if s["n"] > 1:
        return f"{m:.{digits}f} ({lo:.{digits}f}..{hi:.{digits}f})"
    return f"{m:.{digits}f}"


def _med(summary: dict[str, Any], group: str, target: str, label: str) -> float | None:
    cell = summary.get(group, {}).get(target, {}).get(label)
    return None if cell is None else float(cell["median"])


def table(summary: dict[str, Any], group: str) -> str:
    """One markdown table: a row per target, a column per metric, plus the limiting core."""
    metrics = [*METRICS[group.split("@")[0].split(":")[0]], OTHERS]
    head = "| target | " + " | ".join(m[0] for m in metrics) + " | limit |"
    lines = [head, "|" + " --- |" * (len(metrics) + 2)]
    for target, row in summary[group].items():
        cells = [_fmt(row[m[0]]) for m in metrics]
        lines.append(f"| {target} | " + " | ".join(cells) + f" | {row['limit']} |")
    return "\n".join(lines)


def added(summary: dict[str, Any], group: str, label: str, target: str) -> float | None:
    """target's median minus the direct connection's median for one metric."""
    a, d = _med(summary, group, target, label), _med(summary, group, "direct", label)
    return None if a is None or d is None else a - d


def versus(summary: dict[str, Any], current: str, base: str) -> list[str]:
    """A table of the figures a request-path change is judged by: `current` against `base`.

    Latencies are added over the direct connection; CPU is the proxy's own per unit served.
    The change column is (current - base) / base; lower is better for every row.
    """
    w5 = sorted((g for g in summary if g.startswith("W5@")), key=lambda g: int(g[3:]))
    wanted: list[tuple[str, str, bool]] = [  # (group, label, added over direct)
        ("W1", "p50 µs", True),
        ("W1", "p99 µs", True),
        ("W2", "CPU µs/req", False),
        ("W4", "TTFT p99 µs", True),
        ("W4", "CPU µs/chunk", False),
        *[(g, label, False) for g in w5 for label in ("CPU µs/chunk", "RSS peak MB")],
        *[(f"W7:{k}", "CPU µs/rej", False) for k in ("invalid", "limited", "forbidden")],
    ]
    lines = [f"| figure | {current} | {base} | change |", "| --- | --- | --- | --- |"]
    for group, label, over_direct in wanted:
        if over_direct:
            now, then = added(summary, group, label, current), added(summary, group, label, base)
        else:
            now, then = _med(summary, group, current, label), _med(summary, group, base, label)
        if now is None and then is None:
            continue
        change = "-" if now is None or not then else f"{(now - then) / abs(then) * 100:+.1f} %"
        cells = ["-" if v is None else f"{v:.1f}" for v in (now, then)]
        name = f"{group} {'added ' if over_direct else ''}{label}"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {change} |")
    return lines


def targets_check(summary: dict[str, Any], w5_max: dict[str, int]) -> list[str]:
    """The issue's targets, each as a line saying met / missed with the numbers."""
    lines = []

    def line(name: str, value: float | None, goal: float | None, text: str) -> None:
        if value is None or goal is None:
            lines.append(f"- {name}: not measured in this session")
        else:
            mark = "met" if value <= goal else "MISSED"
            lines.append(f"- {name}: **{mark}** — {text.format(v=value, g=goal)}")

    p50, n50 = added(summary, "W1", "p50 µs", "proxyd"), added(summary, "W1", "p50 µs", "nginx")
    line(
        "W1 added p50 ≤ 1.5 x nginx's",
        p50,
        None if n50 is None else 1.5 * max(n50, 1.0),
        "added {v:.0f} µs vs limit {g:.0f} µs",
    )
    line(
        "W1 added p99 ≤ 1 ms", added(summary, "W1", "p99 µs", "proxyd"), 1000.0, "added {v:.0f} µs"
    )
    line(
        "W2 ≤ 150 CPU-µs per request",
        _med(summary, "W2", "proxyd", "CPU µs/req"),
        150.0,
        "{v:.0f} CPU-µs per request",
    )
    ttft = added(summary, "W4", "TTFT p99 µs", "proxyd")
    line("W4 added TTFT p99 ≤ 2 ms", ttft, 2000.0, "added {v:.0f} µs")
    gap = added(summary, "W4", "gap p99 ms", "proxyd")
    line("W4 added gap p99 ≤ 1 ms", gap, 1.0, "added {v:.2f} ms")
    per_chunk = [
        (g, _med(summary, g, "proxyd", "CPU µs/chunk"), _med(summary, g, "nginx", "CPU µs/chunk"))
        for g in summary
        if g.startswith("W5")
    ]
    ratios = [p / n for _, p, n in per_chunk if p is not None and n]
    line(
        "W5 CPU per chunk ≤ 2 x nginx's",
        max(ratios) if ratios else None,
        2.0,
        "worst ratio {v:.2f}x",
    )
    slope = rss_per_stream(summary, "proxyd")
    line(
        "W5 ≤ 30 KB RSS per open stream",
        slope,
        30.0,
        "{v:.1f} KB per stream (slope of peak RSS over peak open streams across W5 levels)",
    )
    got = w5_max.get("proxyd")
    lines.append(
        f"- W5 ≥ 600 stall-free streams: largest stall-free level observed: "
        f"proxyd {got}, nginx {w5_max.get('nginx')}, direct {w5_max.get('direct')} "
        "(stall-free: gap p99.9 <= 40 ms, errors < 0.1 %; see W5)"
    )
    for group, what, issue in (
        ("W7:invalid", "unknown key", ""),
        ("W7:limited", "key over its rate limit", " (429, issue 4)"),
        ("W7:forbidden", "model the key may not use", " (403, issue 4)"),
    ):
        line(
            f"W7{issue} ≤ 60 CPU-µs per rejection",
            _med(summary, group, "proxyd", "CPU µs/rej"),
            60.0,
            f"{{v:.0f}} CPU-µs per rejection ({what})",
        )
        line(
            f"W7{issue} p99 ≤ 1 ms",
            _med(summary, group, "proxyd", "p99 µs"),
            1000.0,
            "p99 {v:.0f} µs",
        )
    on, off = (
        _med(summary, "W2", "proxyd", "CPU µs/req"),
        _med(summary, "W2", "proxyd-nometrics", "CPU µs/req"),
    )
    if on is not None and off is not None:
        lines.append(f"- metrics cost, W2: {on:.0f} CPU-µs/request with metrics, {off:.0f} without")
    on, off = (
        _med(summary, "W4", "proxyd", "CPU µs/chunk"),
        _med(summary, "W4", "proxyd-nometrics", "CPU µs/chunk"),
    )
    if on is not None and off is not None:
        lines.append(f"- metrics cost, W4: {on:.1f} CPU-µs/chunk with metrics, {off:.1f} without")
    return lines


def rss_per_stream(summary: dict[str, Any], target: str) -> float | None:
    """KB of RSS per extra open stream: peak RSS growth from the lowest to the highest W5 level."""
    points = []
    for g in summary:
        if g.startswith("W5@") and target in summary[g]:
            mb = _med(summary, g, target, "RSS peak MB")
            peak = _med(summary, g, target, "open peak")
            if mb is not None and peak:
                points.append((peak, mb))
    if len(points) < 2:
        return None
    (n0, m0), (n1, m1) = min(points), max(points)
    return (m1 - m0) * 1024 / (n1 - n0) if n1 > n0 else None


def machine(versions: dict[str, str]) -> str:
    """The header lines: CPU, cores, kernel, software versions."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}"]
    parts += [f"{k} {v}" for k, v in versions.items()]
    return "; ".join(parts)


def plot(summary: dict[str, Any], path: Path) -> bool:
    """Gap p99 and CPU per chunk versus concurrent streams per target; False without matplotlib."""
    try:
        import matplotlib  # optional: only the full report draws

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = sorted((g for g in summary if g.startswith("W5@")), key=lambda g: int(g[3:]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target, style in (("direct", "k:o"), ("nginx", "g-s"), ("proxyd", "b-^")):
        xs, gaps, cpus, cx = [], [], [], []
        for g in groups:
            row = summary[g].get(target)
            if row is None:
                continue
            level = int(g[3:])
            if row["gap p99 ms"] is not None:
                xs.append(level)
                gaps.append(row["gap p99 ms"]["median"])
            if row["CPU µs/chunk"] is not None:
                cx.append(level)
                cpus.append(row["CPU µs/chunk"]["median"])
        if xs:
            ax1.plot(xs, gaps, style, label=target)
        if cx:
            ax2.plot(cx, cpus, style, label=target)
    ax1.axhline(40, color="r", lw=0.8, ls="--", label="stall (40 ms)")
    ax1.set(
        xlabel="concurrent streams",
        ylabel="inter-event gap p99 (ms)",
        title="Latency: gap p99 (events every 20 ms)",
    )
    ax2.set(
        xlabel="concurrent streams",
        ylabel="proxy CPU-µs per chunk",
        title="CPU per streamed chunk (proxy process)",
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
