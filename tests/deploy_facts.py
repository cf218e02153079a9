"""What the code defines that deploy/ files name: env vars, CLI flags, routes, metrics; and tools.

Shared by the tests of deploy/: each fact is read from the code itself (the config module, the
`--help` of the real command, the app's route table, the metrics registry), never restated here.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxyd.app import PARTS, create_app, create_ops_app
from proxyd.config import ENV_OVERRIDES, load_config, split_host_port
from tests.test_metrics import exercised_metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DATA = Path(__file__).resolve().parent / "data"
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
_ENV = re.compile(r"\bPROXYD_[A-Z0-9_]+\b")
_METRIC = re.compile(r"\bproxyd_[a-z0-9_]*[a-z0-9]\b")


def tool(name: str, hint: str) -> str:
    """A checker's path: the virtualenv's own (wheels from the dev extra) first, then PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail(f"{name} not found: {hint}")
    return found


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a checker on files this test chose; output captured as text, status not checked."""
    # Every executable is found by tool() or is sys.executable; arguments are our own paths.
    return subprocess.run(  # noqa: S603
        list(args), capture_output=True, text=True, timeout=timeout, check=False
    )


def env_vars() -> frozenset[str]:
    """Every environment variable proxyd reads: the config file's name and each override."""
    return frozenset(ENV_OVERRIDES) | {"PROXYD_CONFIG"}


def env_vars_in(text: str) -> set[str]:
    """The PROXYD_* names a file mentions."""
    return set(_ENV.findall(text))


@functools.cache
def cli_flags(*command: str) -> frozenset[str]:
    """The long options `python -m <command> --help` lists, e.g. ("proxyd", "serve")."""
    result = run(sys.executable, "-m", *command, "--help")
    assert result.returncode == 0, result.stderr
    return frozenset(_FLAG.findall(result.stdout))


def flags_in(argv: Sequence[str]) -> set[str]:
    """The long options of a command line (`--config X` and `--config=X` alike)."""
    return {arg.partition("=")[0] for arg in argv if arg.startswith("--")}


@functools.cache
def routes() -> frozenset[str]:
    """Every path the client listener and the per-process ops listener serve."""
    app = create_app(load_config(None, {}))
    paths = {r.canonical for r in app.router.resources()}
    paths |= {r.canonical for r in create_ops_app(app[PARTS]).router.resources()}
    return frozenset(paths)


@functools.cache
def metric_names() -> frozenset[str]:
    """Every sample name and family name proxyd's exposition has after every method ran."""
    body, _ = exercised_metrics().render()
    names: set[str] = set()
    for family in text_string_to_metric_families(body.decode()):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return frozenset(names)


def metrics_in(text: str) -> set[str]:
    """The proxyd_* metric-like names a file mentions."""
    return set(_METRIC.findall(text))


def listen_ports(config: Path | None, environ: Mapping[str, str]) -> dict[str, int]:
    """Client and control ports proxyd really binds with this config file and environment."""
    loaded = load_config(config, environ)
    return {
        "client": split_host_port(loaded.server.listen)[1],
        "control": split_host_port(loaded.server.control_listen)[1],
    }


def shutdown_grace(config: Path) -> float:
    """server.shutdown_grace_seconds as proxyd reads it from this file."""
    return load_config(config, {}).server.shutdown_grace_seconds
