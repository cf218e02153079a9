"""The demo (`make run`): the mock reports every billed category; the SQLite rows show it."""

from __future__ import annotations

import asyncio
import sqlite3
import tomllib
from pathlib import Path
from typing import Any

from proxyd.mockprovider import create_mock_app
from tests.conftest import SDKs, StartProxy, StartServer, channel, key, make_config, server_url

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "example.toml"
SYSTEM = "You are a careful assistant. " * 40  # a cacheable prefix


def example_prices() -> dict[str, Any]:
    """The price table of config/example.toml (what `make run` bills with)."""
    with EXAMPLE.open("rb") as f:
        return dict(tomllib.load(f)["state"]["prices"]["prices"])


def read_rows(db: Path) -> list[dict[str, Any]]:
    """Every row, oldest first (none while the file or table is missing)."""
    if not db.exists():
        return []
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM usage_records ORDER BY created_at")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


async def rows(db: Path, n: int) -> list[dict[str, Any]]:
    """The first `n` rows once the writer stored them."""
    async with asyncio.timeout(10):
        while len(got := read_rows(db)) < n:  # noqa: ASYNC110 - polling the writer's file
            await asyncio.sleep(0.05)
    return got


async def test_demo_rows_show_cache_writes_reads_tier_and_searches(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, sdk: SDKs
) -> None:
    """1-hour write then read of the same prefix, a fast answer, a web search, a priority echo."""
    mock = server_url(await start_server(create_mock_app(chunk_interval=0.001, chunks=3)))
    config = make_config(
        tmp_path,
        [
            channel("mock-openai", mock, models=["mock-gpt"]),
            channel("mock-anthropic", mock, type="anthropic", models=["mock-claude"]),
        ],
        keys=[key()],
        prices=example_prices(),
    )
    client, _ = await start_proxy(config)
    claude, oai = sdk.anthropic(client), sdk.openai(client)
    system: Any = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral",
                                                                     "ttl": "1h"}}]  # fmt: skip
    user: Any = [{"role": "user", "content": "hi"}]
    first = await claude.messages.create(model="mock-claude", max_tokens=5, system=system,
                                         messages=user)  # fmt: skip
    second = await claude.messages.create(model="mock-claude", max_tokens=5, system=system,
                                          messages=user, stream=True)  # fmt: skip
    async for _ in second:
        pass
    await claude.messages.create(
        model="mock-claude", max_tokens=5, messages=user, extra_body={"speed": "fast"},
        tools=[{"type": "web_search_20250305", "name": "web_search"}],
    )  # fmt: skip
    chat = await oai.chat.completions.create(model="mock-gpt", messages=user,
                                             service_tier="priority")  # fmt: skip
    assert chat.service_tier == "priority"
    assert first.usage.cache_creation_input_tokens
    assert not first.usage.cache_read_input_tokens

    got = await rows(tmp_path / "usage.sqlite3", 4)
    write, read, fast, priority = got
    prefix = write["cache_write_tokens"]
    assert prefix > 0
    assert write["cache_write_1h_tokens"] == prefix
    assert write["cached_tokens"] == 0
    assert read["cached_tokens"] == prefix
    assert read["cache_write_tokens"] == 0
    assert read["cost_nanos"] < write["cost_nanos"]  # a read costs 0.30, a 1-hour write 6
    assert fast["service_tier"] == "fast"
    assert fast["tool_calls"] == 1
    assert priority["service_tier"] == "priority"
    assert all(r["cost_nanos"] > 0 for r in got)
