"""RELIABILITY.md names only tests that exist, and a row for every scenario issue 17 lists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "RELIABILITY.md"
_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def test_every_test_named_in_reliability_md_exists() -> None:
    """Each `tests/file.py::name` in the table is a test function defined in that file."""
    refs = _REF.findall(DOC.read_text())
    assert len(refs) >= 20
    for path, name in refs:
        tree = ast.parse((ROOT / path).read_text())
        defined = {
            n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        assert name in defined, f"{path}::{name} is not defined"


def test_every_scenario_has_a_row() -> None:
    """PostgreSQL, Redis down/empty/flapping, signals, clients, providers, hostile input,
    privacy and soak each have a row in the one table."""
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ")]
    text = "\n".join(row.split("|")[1].lower() for row in rows)
    for scenario in (
        "postgresql down",
        "redis down",
        "redis restarted empty",
        "redis flapping",
        "sigterm",
        "sigkill",
        "slow clients",
        "client disconnect",
        "provider reset",
        "provider stall",
        "provider garbage",
        "credential",
        "hostile input, client listener",
        "hostile input, control listener",
        "privacy canary",
        "soak",
    ):
        assert scenario in text, scenario
