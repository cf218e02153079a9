"""The real coding-agent CLIs through proxyd: Claude Code (`claude -p`) and Codex (`codex exec`).

Pinned versions are installed by `scripts/agents-install.sh` into ~/.cache/proxyd-agents (outside
the repository); the tests skip only when node is missing. Each CLI talks to an in-process proxyd
in front of the mock provider's scripted agent (a tool call, then an answer quoting its result),
over loopback only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxyd.mockprovider.agent import JOURNAL_KEY, TOOL_MARKER, AgentCall
from proxyd.mockprovider.app import create_mock_app
from tests.conftest import SECRET, StartProxy, StartServer, channel, make_config
from tests.conftest import server_url as url_of

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "scripts" / "agents-install.sh"
CACHE = Path(os.environ.get("PROXYD_AGENTS_CACHE", Path.home() / ".cache" / "proxyd-agents"))
CLAUDE_MODEL = "mock-claude"
CODEX_MODEL = "mock-gpt"
pytestmark = pytest.mark.timeout(300)


def _pins() -> dict[str, str]:
    """The pinned versions, read from the install script (the one place they are written)."""
    pins = {}
    for line in INSTALL.read_text().splitlines():
        for name in ("CLAUDE_CODE_VERSION", "CODEX_VERSION"):
            if line.startswith(f'{name}="${{{name}:-'):
                pins[name] = os.environ.get(name) or line.split(":-", 1)[1].split("}", 1)[0]
    return pins


@dataclass(frozen=True)
class Agents:
    claude: Path
    codex: Path


@pytest.fixture(scope="session")
def agents() -> Agents:
    """The pinned CLIs, installed on first use; skip only when node is missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not found: the real Claude Code and Codex CLI tests need node")
    subprocess.run([str(INSTALL)], check=True, timeout=600)  # noqa: S603 - our own script
    pins = _pins()
    claude = CACHE / f"claude-code@{pins['CLAUDE_CODE_VERSION']}" / "node_modules/.bin/claude"
    codex = CACHE / f"codex@{pins['CODEX_VERSION']}" / "node_modules/.bin/codex"
    assert claude.exists(), claude
    assert codex.exists(), codex
    return Agents(claude, codex)


@dataclass
class Rig:
    client: TestClient[Any, Any]
    journal: list[AgentCall]
    db: Path
    base: str
    home: Path
    work: Path

    def rows(self) -> list[dict[str, Any]]:
        with sqlite3.connect(self.db) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute("SELECT * FROM usage_records")]


async def _rig(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path, **cfg: Any
) -> Rig:
    """proxyd in front of the scripted agent, with a pool of three channels of three credentials
    per protocol (so a session that wandered would show it)."""
    mock = create_mock_app(agent=True)
    server = await start_server(mock)
    chans = []
    for i in range(3):
        for kind, model in (("anthropic", CLAUDE_MODEL), ("openai", CODEX_MODEL)):
            ch = channel(f"{kind}-{i}", url_of(server), type=kind, models=[model])
            del ch["api_key"]
            ch["api_keys"] = [f"up-{kind}-{i}-{j}" for j in range(3)]
            chans.append(ch)
    prices: dict[str, dict[str, Any]] = {
        CLAUDE_MODEL: {"input": "3", "output": "15", "cached_input": "0.3"},
        # Codex offers its web_search tool on every call: a model without that paid tool priced
        # is refused with 400 (nothing is billed at a guessed rate).
        CODEX_MODEL: {
            "input": "1.25",
            "output": "10",
            "cached_input": "0.125",
            "per_call": {"web_search": "0.01"},
        },
    }
    client, _ = await start_proxy(make_config(tmp_path, chans, prices=prices, **cfg))
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    base = str(client.make_url("")).rstrip("/")
    return Rig(client, mock[JOURNAL_KEY], tmp_path / "usage.sqlite3", base, home, work)


async def _run(
    rig: Rig, argv: list[str], env: dict[str, str], limit: float = 120.0
) -> tuple[int, str, float]:
    """Run a CLI headless in the rig's work folder; (exit code, stdout+stderr, seconds)."""
    base_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(rig.home),
        "LANG": "C.UTF-8",
        "NO_COLOR": "1",
    }
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=rig.work,
        env={**base_env, **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace"), time.monotonic() - started


async def _startup(rig: Rig, argv: list[str]) -> float:
    """Seconds the CLI needs just to start (`--version`) on this machine right now: the 5 s
    budget of a refusal is counted on top, so a busy shared machine does not fail the test."""
    code, out, seconds = await _run(rig, argv, {})
    assert code == 0, out
    return seconds


def _claude_env(rig: Rig, secret: str = SECRET) -> dict[str, str]:
    return {
        "ANTHROPIC_BASE_URL": rig.base,
        "ANTHROPIC_API_KEY": secret,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
    }


def _claude(agents: Agents, *args: str) -> list[str]:
    return [str(agents.claude), "-p", *args, "--model", CLAUDE_MODEL]


def _codex_env(rig: Rig, secret: str = SECRET) -> dict[str, str]:
    codex_home = rig.home / "codex"
    codex_home.mkdir(exist_ok=True)
    (codex_home / "config.toml").write_text(
        f'model = "{CODEX_MODEL}"\n'
        'model_provider = "proxyd"\n\n'
        "[model_providers.proxyd]\n"
        'name = "proxyd"\n'
        f'base_url = "{rig.base}/v1"\n'
        'env_key = "PROXYD_TEST_KEY"\n'
        'wire_api = "responses"\n'
    )
    return {"CODEX_HOME": str(codex_home), "PROXYD_TEST_KEY": secret}


def _codex(agents: Agents, prompt: str) -> list[str]:
    return [str(agents.codex), "exec", "--skip-git-repo-check", prompt]


async def _settled(rig: Rig, count: int) -> list[dict[str, Any]]:
    """The rows once `count` of them are written (the writer flushes every 50 ms here)."""
    for _ in range(100):
        rows = rig.rows() if rig.db.exists() else []
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.05)
    return rig.rows()


def _one_place(calls: list[AgentCall], rows: list[dict[str, Any]]) -> None:
    """Every call went to one channel with one credential."""
    assert len({c.credential for c in calls}) == 1, [c.credential for c in calls]
    assert len({r["channel_id"] for r in rows}) == 1


async def test_claude_code_session_with_a_tool_call(
    agents: Agents, start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """claude -p runs Bash through proxyd and reports its output; one row per call, one place."""
    rig = await _rig(start_server, start_proxy, tmp_path)
    code, out, _ = await _run(
        rig,
        _claude(agents, "Run the marker command.", "--allowedTools", "Bash(echo:*)"),
        _claude_env(rig),
    )
    assert code == 0, out
    assert f"The tool said: {TOOL_MARKER}" in out
    code, out, _ = await _run(
        rig,
        _claude(agents, "--continue", "Once more.", "--allowedTools", "Bash(echo:*)"),
        _claude_env(rig),
    )
    assert code == 0, out
    assert f"The tool said: {TOOL_MARKER}" in out
    calls = [c for c in rig.journal if c.path == "/v1/messages"]
    assert len(calls) >= 4  # two turns, each a tool call and its answer
    rows = await _settled(rig, len(rig.journal))
    assert len(rows) == len(rig.journal)
    assert len({r["request_id"] for r in rows}) == len(rows)
    assert all(r["status_code"] == 200 for r in rows)
    _one_place(calls, rows)
    assert all(c.query == "beta=true" for c in calls)  # passed on as Claude Code sent it
    betas = dict(calls[0].headers)["anthropic-beta"]
    assert "claude-code-20250219" in betas
    assert {"metadata", "thinking", "tools"} <= calls[0].fields
    assert all(c.cache_read > 0 for c in calls[1:]), [c.cache_read for c in calls]


async def test_claude_code_context_is_answered_by_count_tokens(
    agents: Agents, start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """/context uses count_tokens through proxyd: free rows, no max_tokens: 1 fallbacks."""
    rig = await _rig(start_server, start_proxy, tmp_path)
    code, out, _ = await _run(rig, _claude(agents, "/context"), _claude_env(rig))
    assert code == 0, out
    counts = [c for c in rig.journal if c.path == "/v1/messages/count_tokens"]
    assert counts
    assert all(c.query == "beta=true" for c in counts)
    assert not [c for c in rig.journal if c.path == "/v1/messages" and c.max_tokens == 1]
    rows = await _settled(rig, len(rig.journal))
    assert len(rows) == len(rig.journal)
    assert {r["endpoint"] for r in rows} == {"count_tokens"}
    assert sum(r["cost_nanos"] for r in rows) == 0


@pytest.mark.parametrize("case", ["unknown_key", "empty_balance"])
async def test_claude_code_stops_at_once_on_a_refusal(
    agents: Agents,
    start_server: StartServer,
    start_proxy: StartProxy,
    tmp_path: Path,
    case: str,
) -> None:
    """An unknown key or an empty balance ends claude -p within 5 s with proxyd's message."""
    cfg: dict[str, Any] = {"balance": 0} if case == "empty_balance" else {}
    rig = await _rig(start_server, start_proxy, tmp_path, **cfg)
    secret = "sk-not-a-key-0000" if case == "unknown_key" else SECRET
    startup = await _startup(rig, [str(agents.claude), "--version"])
    code, out, seconds = await _run(rig, _claude(agents, "hello"), _claude_env(rig, secret))
    assert code != 0
    assert seconds < 5.0 + startup, (seconds, startup, out)
    expected = "The API key provided is not valid." if case == "unknown_key" else "exceeded"
    assert expected in out, out
    assert rig.journal == []


async def test_codex_session_with_a_tool_call(
    agents: Agents, start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """codex exec runs exec_command through proxyd; Responses fields pass as sent; one place."""
    rig = await _rig(start_server, start_proxy, tmp_path)
    code, out, _ = await _run(rig, _codex(agents, "Run the marker command."), _codex_env(rig))
    assert code == 0, out
    assert "The tool said:" in out
    assert TOOL_MARKER in out
    calls = [c for c in rig.journal if c.path == "/v1/responses"]
    assert len(calls) >= 2
    rows = await _settled(rig, len(rig.journal))
    assert len(rows) == len(rig.journal)
    assert all(r["status_code"] == 200 for r in rows)
    _one_place(calls, rows)
    assert {"store", "include", "prompt_cache_key", "tools"} <= calls[0].fields
    assert all(c.cache_read > 0 for c in calls[1:])
    assert all(r["cached_tokens"] > 0 for r in rows[1:])


@pytest.mark.parametrize("case", ["unknown_key", "empty_balance"])
async def test_codex_stops_quickly_on_a_refusal(
    agents: Agents,
    start_server: StartServer,
    start_proxy: StartProxy,
    tmp_path: Path,
    case: str,
) -> None:
    """An unknown key or an empty balance ends codex exec within 5 s with proxyd's message."""
    cfg: dict[str, Any] = {"balance": 0} if case == "empty_balance" else {}
    rig = await _rig(start_server, start_proxy, tmp_path, **cfg)
    secret = "sk-not-a-key-0000" if case == "unknown_key" else SECRET
    startup = await _startup(rig, [str(agents.codex), "--version"])
    code, out, seconds = await _run(rig, _codex(agents, "hello"), _codex_env(rig, secret))
    # Codex retries a 401 five times with back-off whatever the answer says (its stream retry
    # counts 401 as retryable, for ChatGPT token refresh): ~7 s, not proxyd's to shorten.
    budget = 5.0 if case == "empty_balance" else 12.0
    assert seconds < budget + startup, (seconds, startup, out)
    assert code != 0, out
    # Codex words an `insufficient_quota` code its own way; the key message is proxyd's.
    expected = "The API key provided is not valid." if case == "unknown_key" else "Quota exceeded"
    assert expected in out, out
    assert rig.journal == []


def test_pins_are_readable() -> None:
    """The install script names both pins, so the tests find the installed CLIs."""
    pins = _pins()
    assert set(pins) == {"CLAUDE_CODE_VERSION", "CODEX_VERSION"}
    assert all(v[0].isdigit() for v in pins.values())
