"""The balance reservation bounds every category, or reserves a configured floor it cannot bound."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import SECRET, StartProxy, StartServer, channel, key, make_config, server_url
from tests.fakes import FakeProvider, Step

OAI = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
ANT = {"x-api-key": SECRET, "anthropic-version": "2023-06-01", "Content-Type": "application/json"}


def rows(db: Path) -> list[dict[str, Any]]:
    """Every billing row, oldest first."""
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


async def wait_rows(db: Path, n: int) -> list[dict[str, Any]]:
    """The rows once `n` are stored."""
    async with asyncio.timeout(10):
        while len(got := rows(db)) < n:  # noqa: ASYNC110 - polling the writer's file
            await asyncio.sleep(0.05)
    return got


async def test_previous_response_id_reserves_the_configured_floor(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """A body naming provider-side state cannot bound its prompt: it needs the configured floor."""
    fake = FakeProvider(Step(body=b"{}"))
    url = server_url(await start_server(fake.app()))
    config = make_config(
        tmp_path,
        [channel("a", url)],
        prices={"gpt-test": {"input": "1", "output": "1"}},
        balance=5_000_000,  # plenty for the body's own bound, short of the floor
        admission={"unbounded_reserve_nanos": 10_000_000},
    )
    client, _ = await start_proxy(config)
    body = {"model": "gpt-test", "input": "go on", "max_output_tokens": 10}
    refused = await client.post(
        "/v1/responses", headers=OAI, data=orjson.dumps({**body, "previous_response_id": "r1"})
    )
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == "insufficient_quota"
    assert fake.seen == []
    bounded = await client.post("/v1/responses", headers=OAI, data=orjson.dumps(body))
    assert bounded.status == 200
    assert len(fake.seen) == 1


async def test_paid_tool_calls_are_reserved_and_a_shortfall_is_recorded(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """max_uses x the per-call fee is reserved; a cost above the balance is the row's shortfall."""
    usage = {"input_tokens": 10, "output_tokens": 5, "server_tool_use": {"web_search_requests": 3}}
    msg: dict[str, Any] = {
        "id": "m", "type": "message", "role": "assistant", "model": "up", "content": [],
        "stop_reason": "end_turn", "stop_sequence": None, "usage": usage,
    }  # fmt: skip
    fake = FakeProvider(Step(body=orjson.dumps(msg)))
    url = server_url(await start_server(fake.app()))
    # 1 unit per million tokens (1000 nanos a token); a search costs 0.01 units = 10,000,000
    prices = {"claude-t": {"input": "1", "output": "1", "per_call": {"web_search": "0.01"}}}
    config = make_config(
        tmp_path,
        [channel("an", url, type="anthropic", models=["claude-t"])],
        keys=[key()],
        prices=prices,
        balance=25_000_000,
    )
    client, parts = await start_proxy(config)

    def body(max_uses: int) -> bytes:
        return orjson.dumps(
            {"model": "claude-t", "max_tokens": 5, "messages": [{"role": "user", "content": "q"}],
             "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": max_uses}]}
        )  # fmt: skip

    # three searches may cost 30,000,000 > the balance: refused before any upstream call
    assert (await client.post("/v1/messages", headers=ANT, data=body(3))).status == 429
    assert fake.seen == []
    # two searches fit the reservation, but the provider reports three: 30,015,000 cost,
    # 25,000,000 charged, the rest is the row's shortfall, the balance stops at zero
    resp = await client.post("/v1/messages", headers=ANT, data=body(2))
    assert resp.status == 200
    got = await wait_rows(tmp_path / "usage.sqlite3", 2)
    row = got[-1]
    assert row["tool_calls"] == 3
    assert row["cost_nanos"] == 30_015_000
    assert row["shortfall_nanos"] == 5_015_000
    view = await parts.ledger.view("acct-1")
    assert view.balance_nanos == 0


def test_unbounded_markers() -> None:
    """Image URLs, file ids and previous responses are unbounded; inline base64 images are not."""
    from proxyd.server.pipeline import unbounded as raw_unbounded

    def unbounded(body: object) -> bool:
        return raw_unbounded(orjson.dumps(body))

    url_image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    inline = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    anthropic_url = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
    assert unbounded({"messages": [{"role": "user", "content": [url_image]}]})
    assert unbounded({"messages": [{"role": "user", "content": [anthropic_url]}]})
    assert unbounded({"input": [{"type": "input_image", "image_url": "https://x/y.png"}]})
    assert unbounded({"input": [{"type": "input_file", "file_id": "file-1"}]})
    assert not unbounded({"messages": [{"role": "user", "content": [inline]}]})
