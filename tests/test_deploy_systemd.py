"""deploy/systemd/proxyd.service: `systemd-analyze verify` accepts it, `systemd-analyze security`
rates it hardened, it stops within proxyd's grace period, and runs a command proxyd has.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from proxyd.config import ServerSettings
from proxyd.supervisor.process import KILL_MARGIN_SECONDS
from tests.deploy_facts import DEPLOY, cli_flags, env_vars, env_vars_in, flags_in, run, tool

UNIT = DEPLOY / "systemd" / "proxyd.service"
SYSTEMD_HINT = "install Debian's systemd package (scripts/test-tools.sh does)"
INSTALLED_AT = "/opt/proxyd/bin/proxyd"


def directives() -> dict[str, list[str]]:
    """`[Service]` directives, every value of a repeated one in order."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif line and not line.startswith("#") and section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def exec_start() -> list[str]:
    """ExecStart as an argument vector."""
    (command,) = directives()["ExecStart"]
    return shlex.split(command)


def local_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's proxyd (verify wants it to exist)."""
    proxyd = Path(sys.executable).parent / "proxyd"
    assert proxyd.exists(), "make install"
    unit = tmp_path / "proxyd.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_AT, str(proxyd)))
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` reports nothing: every directive known, the command executable."""
    analyze = tool("systemd-analyze", SYSTEMD_HINT)
    assert exec_start()[0] == INSTALLED_AT
    result = run(analyze, "verify", str(local_unit(tmp_path)))
    if "Failed to initialize" in result.stderr or "not booted" in result.stderr:
        pytest.skip(f"systemd-analyze cannot run in this container: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert "proxyd.service" not in result.stderr, result.stderr


def test_verify_catches_a_bad_directive(tmp_path: Path) -> None:
    """The same check names a misspelt directive: it would catch a typo in the unit."""
    unit = local_unit(tmp_path)
    unit.write_text(unit.read_text().replace("PrivateTmp=yes", "PrivateTmpp=yes"))
    result = run(tool("systemd-analyze", SYSTEMD_HINT), "verify", str(unit))
    assert "PrivateTmpp" in result.stderr


def test_unit_is_hardened(tmp_path: Path) -> None:
    """systemd's own exposure score for the unit is 2.0 or lower ("OK"); named options are set."""
    result = run(
        tool("systemd-analyze", SYSTEMD_HINT),
        "security",
        "--offline=true",
        "--threshold=20",  # tenths: exposure above 2.0 fails
        "--no-pager",
        str(local_unit(tmp_path)),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    d = directives()
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "DynamicUser": "yes",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
    }.items():
        assert d.get(key) == [value], key


def test_stop_waits_longer_than_the_grace_period() -> None:
    """TimeoutStopSec covers the shutdown grace, the supervisor's 10 s kill delay and a flush."""
    (timeout,) = directives()["TimeoutStopSec"]
    grace = ServerSettings().shutdown_grace_seconds
    assert float(timeout.removesuffix("s")) >= grace + KILL_MARGIN_SECONDS + 15
    assert directives()["KillMode"] == ["mixed"]  # SIGTERM to the supervisor, which drains


def test_unit_names_only_what_proxyd_has() -> None:
    """Env vars the unit sets exist; ExecStart is `proxyd serve --workers auto` with real flags."""
    assert env_vars_in(UNIT.read_text()) <= env_vars()
    argv = exec_start()
    assert argv[1] == "serve"
    assert argv[argv.index("--workers") + 1] == "auto"
    assert flags_in(argv) <= cli_flags("proxyd", "serve")
