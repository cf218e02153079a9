"""The benchmark's baseline comparison: a commit's tree exported, and the versus table."""

from __future__ import annotations

import subprocess
from pathlib import Path

from benchmarks import report, rig


def _cell(median: float) -> dict[str, float]:
    return {"median": median, "min": median, "max": median, "n": 1}


def test_versus_compares_added_latency_and_cpu() -> None:
    """Latency rows subtract the direct connection; the change column is relative to the base."""
    summary = {
        "W1": {
            "direct": {"p50 µs": _cell(100.0), "p99 µs": _cell(200.0)},
            "proxyd": {"p50 µs": _cell(300.0), "p99 µs": _cell(500.0)},
            "proxyd@abc": {"p50 µs": _cell(500.0), "p99 µs": _cell(500.0)},
        },
        "W2": {
            "proxyd": {"CPU µs/req": _cell(90.0)},
            "proxyd@abc": {"CPU µs/req": _cell(100.0)},
        },
    }
    lines = report.versus(summary, "proxyd", "proxyd@abc")
    assert lines[0] == "| figure | proxyd | proxyd@abc | change |"
    assert "| W1 added p50 µs | 200.0 | 400.0 | -50.0 % |" in lines
    assert "| W1 added p99 µs | 300.0 | 300.0 | +0.0 % |" in lines
    assert "| W2 CPU µs/req | 90.0 | 100.0 | -10.0 % |" in lines
    assert not any(line.startswith("| W4") for line in lines)  # nothing measured, no row


def test_export_tree_writes_the_commits_package(tmp_path: Path) -> None:
    """The exported tree holds the commit's proxyd package exactly as git has it."""
    tree, short = rig.export_tree("HEAD", tmp_path)
    shown = subprocess.run(
        ["git", "show", "HEAD:proxyd/__init__.py"],  # noqa: S607 - git from PATH, as the rig
        check=True,
        capture_output=True,
        cwd=rig.CHECKOUT,
    ).stdout
    assert (tree / "proxyd" / "__init__.py").read_bytes() == shown
    assert tree.name == f"baseline-{short}"
