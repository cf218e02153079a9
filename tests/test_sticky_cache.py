"""The prompt-cache figure: a 20-turn conversation over a pool of three credentials, with and
without sticky sessions, against the mock provider that reads cache only where the same
credential sent the same prefix before."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from proxyd.mockprovider.agent import JOURNAL_KEY
from proxyd.mockprovider.app import create_mock_app
from tests.conftest import SECRET, StartProxy, StartServer, channel, make_config
from tests.conftest import server_url as url_of

ANT = {"x-api-key": SECRET, "anthropic-version": "2023-06-01"}
TURNS = 20
SYSTEM = "You are a careful assistant. " * 40


async def _conversation(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path, pool: str, sticky: bool
) -> tuple[float, float]:
    """(share of turns after the first with a cache read, tokens those turns read from cache)."""
    mock = create_mock_app(agent=True)
    server = await start_server(mock)
    if pool == "credentials":  # one channel, three credentials
        ch = channel("c", url_of(server), type="anthropic", models=["claude-x"])
        del ch["api_key"]
        ch["api_keys"] = ["cred-0", "cred-1", "cred-2"]
        chans = [ch]
    else:  # three channels, one credential each
        chans = [
            channel(f"c{i}", url_of(server), type="anthropic", models=["claude-x"])
            for i in range(3)
        ]
    config = make_config(tmp_path, chans, sticky={"enabled": sticky})
    client, _ = await start_proxy(config)
    history: list[dict[str, Any]] = []
    # Two other conversations interleaved irregularly, as on a busy relay (fixed seed).
    others: list[list[dict[str, Any]]] = [[] for _ in range(2)]
    rng = random.Random(16)
    calls = 0
    for turn in range(TURNS):
        history.append({"role": "user", "content": f"Question {turn}: what next?"})
        body = {"model": "claude-x", "max_tokens": 64, "system": SYSTEM, "messages": history}
        resp = await client.post("/v1/messages", json=body, headers=ANT)
        assert resp.status == 200
        answer = await resp.json()
        history.append({"role": "assistant", "content": answer["content"]})
        calls += 1
        for _ in range(rng.randint(0, 3)):
            n = rng.randrange(len(others))
            other = others[n]
            calls += 1
            other.append({"role": "user", "content": f"Other {n} asks {turn}"})
            side = {"model": "claude-x", "max_tokens": 8, "system": f"Other {n}", "messages": other}
            side_resp = await client.post("/v1/messages", json=side, headers=ANT)
            other.append({"role": "assistant", "content": (await side_resp.json())["content"]})
    await client.close()
    mine = [c for c in mock[JOURNAL_KEY] if c.max_tokens == 64]
    assert len(mine) == TURNS
    with sqlite3.connect(tmp_path / "usage.sqlite3") as db:
        rows = db.execute(
            "SELECT prompt_tokens, cached_tokens FROM usage_records ORDER BY created_at"
        ).fetchall()
    assert len(rows) == calls  # one row per call, the side conversations included
    later = mine[1:]
    hit_share = sum(c.cache_read > 0 for c in later) / len(later)
    return hit_share, sum(c.cache_read for c in later)


@pytest.mark.parametrize("pool", ["credentials", "channels"])
async def test_sticky_sessions_turn_cache_writes_into_reads(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path, pool: str
) -> None:
    """With stickiness >= 95 % of turns after the first read cache; without, clearly fewer."""
    with_sticky = await _conversation(start_server, start_proxy, tmp_path / "on", pool, True)
    without = await _conversation(start_server, start_proxy, tmp_path / "off", pool, False)
    print(
        f"\n{pool}: turns after the first reading cache: {with_sticky[0]:.0%} sticky "
        f"({with_sticky[1]} tokens read), {without[0]:.0%} without ({without[1]} tokens read)"
    )
    assert with_sticky[0] >= 0.95
    assert without[0] < with_sticky[0]
    assert without[1] < with_sticky[1]
