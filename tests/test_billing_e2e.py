"""Billing end to end: real SDKs → proxyd → fake providers, rows checked in the real PostgreSQL.

Each test gets its own database (created here, migrated by proxyd at start, dropped after), so
proxyd runs with its production `public` schema and parallel runs never share a table.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import asyncpg
import openai
import orjson
import pytest

from proxyd.config import Config
from tests.conftest import (
    OTHER_SECRET,
    SECRET,
    SDKs,
    StartProxy,
    StartServer,
    channel,
    key,
    make_config,
    pg_url,
    server_url,
)
from tests.fakes import (
    FakeProvider,
    Step,
    anthropic_body,
    anthropic_events,
    chat_body,
    chat_events,
)
from tests.pg_proxy import PgProxy

pytestmark = pytest.mark.postgres

THIRD_SECRET = "sk-test-charlie-0123456789"
OAI = {"Authorization": f"Bearer {SECRET}"}
ANT = {"x-api-key": SECRET, "anthropic-version": "2023-06-01"}

# Price table of these tests, discount 0.8. A price P per million tokens is P * 1000 nanos per
# token, times 0.8: gpt-e2e input 0.153 -> 122.4, output 0.61 -> 488, cached 0.0765 -> 61.2;
# claude-e2e input 3.0001 -> 2400.08, output 15 -> 12000 nanos per token.
PRICES = {
    "discount": "0.8",
    "prices": {
        "gpt-e2e": {"input": "0.153", "output": "0.61", "cached_input": "0.0765"},
        "claude-e2e": {"input": "3.0001", "output": "15"},
    },
}


async def fetch_rows(database: str) -> list[dict[str, Any]]:
    """Every row of usage_records, as dicts, oldest first."""
    conn = await asyncpg.connect(pg_url(database))
    try:
        rows = await conn.fetch("SELECT * FROM usage_records ORDER BY created_at, request_id")
    finally:
        await conn.close()
    return [dict(r) for r in rows]


async def count_rows(database: str) -> tuple[int, int]:
    """(rows, distinct request ids) in usage_records."""
    conn = await asyncpg.connect(pg_url(database))
    try:
        row = await conn.fetchrow("SELECT count(*), count(DISTINCT request_id) FROM usage_records")
    finally:
        await conn.close()
    assert row is not None
    return int(row[0]), int(row[1])


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Poll a condition on the writer's counters until it holds, failing after `within` s."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - polling counters is the point
            await asyncio.sleep(0.02)


def billing(url: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """A billing section writing to `url` with small, quick batches."""
    return {
        "database_url": url,
        "spool_dir": str(tmp_path / "spool"),
        "flush_interval_seconds": 0.05,
        "batch_size": 8,
        **extra,
    }


async def two_providers(
    start_server: StartServer,
) -> tuple[FakeProvider, FakeProvider, list[dict[str, Any]]]:
    """An OpenAI-style fake serving gpt-e2e and an Anthropic fake serving claude-e2e."""
    oa, an = FakeProvider(), FakeProvider(Step(body=anthropic_body("hi")))
    oa_url = server_url(await start_server(oa.app()))
    an_url = server_url(await start_server(an.app()))
    channels = [
        channel("oa", oa_url, models=["gpt-e2e"], model_map={"gpt-e2e": "gpt-up"}),
        channel(
            "an",
            an_url,
            type="anthropic",
            models=["claude-e2e"],
            model_map={"claude-e2e": "claude-up"},
        ),
    ]
    return oa, an, channels


def e2e_config(
    tmp_path: Path, channels: list[dict[str, Any]], url: str, **billing_extra: Any
) -> Config:
    """Keys: k1 (acct-1, plenty), k2 (acct-2, one request a minute), k3 (acct-3, 1000 nanos)."""
    return make_config(
        tmp_path,
        channels,
        keys=[
            key(),
            key("k2", OTHER_SECRET, account_id="acct-2", rpm=1),
            key("k3", THIRD_SECRET, account_id="acct-3"),
        ],
        billing=billing(url, tmp_path, **billing_extra),
        state={
            "prices": {"version": 1, **PRICES},
            "balances": {
                "acct-1": {"version": 1, "balance_nanos": 10**15},
                "acct-2": {"version": 1, "balance_nanos": 10**15},
                "acct-3": {"version": 1, "balance_nanos": 1000},
            },
        },
    )


def expect(**fields: Any) -> dict[str, Any]:
    """The expected columns of a row; unset token and cost columns are zero."""
    base: dict[str, Any] = {
        "key_id": "k1",
        "account_id": "acct-1",
        "upstream_model": None,
        "channel_id": None,
        "stream": False,
        "error_type": None,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "cost_nanos": 0,
        "client_ip": "127.0.0.1",
        "usage_source": "upstream",
    }
    return base | fields


GPT = {"model": "gpt-e2e", "upstream_model": "gpt-up", "channel_id": "oa"}
CLAUDE = {"model": "claude-e2e", "upstream_model": "claude-up", "channel_id": "an"}


async def test_each_request_yields_its_exact_row(
    tmp_path: Path,
    database: str,
    start_server: StartServer,
    start_proxy: StartProxy,
    sdk: SDKs,
) -> None:
    """A mix of endpoints, streams and refusals gives one exact row per authenticated request."""
    oa, an, channels = await two_providers(start_server)
    client, parts = await start_proxy(e2e_config(tmp_path, channels, pg_url(database)))
    oai, claude = sdk.openai(client), sdk.anthropic(client)
    user: Any = [{"role": "user", "content": "hello"}]
    started = time.time()
    want: dict[str, dict[str, Any]] = {}

    # 1. chat, non-stream: 7 prompt, 2 completion -> 7*122.4 + 2*488 = 1832.8 -> 1833
    oa.then(Step(body=chat_body("hi there", prompt=7, completion=2)))
    raw = await oai.chat.completions.with_raw_response.create(model="gpt-e2e", messages=user)
    assert raw.parse().choices[0].message.content == "hi there"
    want[raw.headers["x-request-id"]] = expect(
        **GPT, endpoint="chat.completions", status_code=200, prompt_tokens=7,
        completion_tokens=2, cost_nanos=1833,
    )  # fmt: skip

    # 2. chat, stream without include_usage (proxyd asks for it): 11 + 3 -> 1346.4 + 1464 -> 2810
    oa.then(Step(events=chat_events(["a", "b", "c"], prompt=11)))
    raw = await oai.chat.completions.with_raw_response.create(
        model="gpt-e2e", messages=user, stream=True
    )
    chunks = [c async for c in raw.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "abc"
    assert all(c.usage is None for c in chunks)
    want[raw.headers["x-request-id"]] = expect(
        **GPT, endpoint="chat.completions", stream=True, status_code=200, prompt_tokens=11,
        completion_tokens=3, cost_nanos=2810,
    )  # fmt: skip

    # 3. cached and reasoning tokens: 600*122.4 + 400*61.2 + 50*488 = 73440 + 24480 + 24400
    body = orjson.loads(chat_body("thought", prompt=1000, completion=50))
    body["usage"]["prompt_tokens_details"] = {"cached_tokens": 400}
    body["usage"]["completion_tokens_details"] = {"reasoning_tokens": 20}
    oa.then(Step(body=orjson.dumps(body)))
    resp = await client.post(
        "/v1/chat/completions", headers=OAI, json={"model": "gpt-e2e", "messages": user}
    )
    assert resp.status == 200
    want[resp.headers["x-request-id"]] = expect(
        **GPT, endpoint="chat.completions", status_code=200, prompt_tokens=1000,
        completion_tokens=50, cached_tokens=400, reasoning_tokens=20, cost_nanos=122320,
    )  # fmt: skip

    # 4. embeddings: 5 prompt tokens -> 612
    emb = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}],
        "model": "gpt-up",
        "usage": {"prompt_tokens": 5, "total_tokens": 5},
    }
    oa.then(Step(body=orjson.dumps(emb)))
    raw_emb = await oai.embeddings.with_raw_response.create(model="gpt-e2e", input="vectors")
    assert raw_emb.parse().data[0].embedding == [0.25, -0.5]
    want[raw_emb.headers["x-request-id"]] = expect(
        **GPT, endpoint="embeddings", status_code=200, prompt_tokens=5, cost_nanos=612
    )

    # 5. messages, non-stream: 9 + 3 -> 21600.72 + 36000 -> 57601
    an.then(Step(body=anthropic_body("plain", prompt=9, completion=3)))
    raw_msg = await claude.messages.with_raw_response.create(
        model="claude-e2e", max_tokens=50, messages=user
    )
    assert (await raw_msg.parse()).content[0].text == "plain"
    want[raw_msg.headers["x-request-id"]] = expect(
        **CLAUDE, endpoint="messages", status_code=200, prompt_tokens=9, completion_tokens=3,
        cost_nanos=57601,
    )  # fmt: skip

    # 6. messages, stream: 13 (message_start) + 2 (message_delta) -> 31201.04 + 24000 -> 55201
    an.then(Step(events=anthropic_events(["Hi", " there"], prompt=13)))
    raw_msg = await claude.messages.with_raw_response.create(
        model="claude-e2e", max_tokens=50, messages=user, stream=True
    )
    kinds = [event.type async for event in await raw_msg.parse()]
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    want[raw_msg.headers["x-request-id"]] = expect(
        **CLAUDE, endpoint="messages", stream=True, status_code=200, prompt_tokens=13,
        completion_tokens=2, cost_nanos=55201,
    )  # fmt: skip

    # 7. chat translated to the Anthropic channel: the same 9 + 3 -> 57601
    an.then(Step(body=anthropic_body("translated", prompt=9, completion=3)))
    raw = await oai.chat.completions.with_raw_response.create(model="claude-e2e", messages=user)
    assert raw.parse().choices[0].message.content == "translated"
    want[raw.headers["x-request-id"]] = expect(
        **CLAUDE, endpoint="chat.completions", status_code=200, prompt_tokens=9,
        completion_tokens=3, cost_nanos=57601,
    )  # fmt: skip

    # 8. unknown key: 401 and no row
    with pytest.raises(openai.AuthenticationError) as unknown:
        await sdk.openai(client, "sk-unknown-0123456789").chat.completions.create(
            model="gpt-e2e", messages=user
        )
    no_row = unknown.value.response.headers["x-request-id"]

    # 9. unknown model: 404, a row with the model asked for and nothing billed
    with pytest.raises(anthropic.NotFoundError) as missing:
        await claude.messages.create(model="no-such-model", max_tokens=5, messages=user)
    want[missing.value.response.headers["x-request-id"]] = expect(
        model="no-such-model", endpoint="messages", status_code=404,
        error_type="model_not_found",
    )  # fmt: skip

    # 10. k2 may send one request a minute: the first is served, the second gets 429
    k2 = sdk.openai(client, OTHER_SECRET)
    oa.then(Step(body=chat_body("one", prompt=7, completion=2)))
    raw = await k2.chat.completions.with_raw_response.create(model="gpt-e2e", messages=user)
    want[raw.headers["x-request-id"]] = expect(
        **GPT, key_id="k2", account_id="acct-2", endpoint="chat.completions", status_code=200,
        prompt_tokens=7, completion_tokens=2, cost_nanos=1833,
    )  # fmt: skip
    with pytest.raises(openai.RateLimitError) as limited:
        await k2.chat.completions.create(model="gpt-e2e", messages=user, stream=True)
    assert int(limited.value.response.headers["Retry-After"]) >= 1
    want[limited.value.response.headers["x-request-id"]] = expect(
        model="gpt-e2e", key_id="k2", account_id="acct-2", endpoint="chat.completions",
        stream=True, status_code=429, error_type="rate_limited",
    )  # fmt: skip

    # 11. k3's balance cannot cover the request: 429 insufficient_quota
    resp = await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {THIRD_SECRET}"},
        json={"model": "gpt-e2e", "messages": user},
    )
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "insufficient_quota"
    want[resp.headers["x-request-id"]] = expect(
        model="gpt-e2e", key_id="k3", account_id="acct-3", endpoint="chat.completions",
        status_code=429, error_type="insufficient_quota",
    )  # fmt: skip

    # 12. the provider itself answers 429: passed through, nothing billed
    limit_body = orjson.dumps({"error": {"message": "slow down", "type": "rate_limit_error"}})
    oa.then(Step(status=429, body=limit_body, headers={"Retry-After": "2"}))
    resp = await client.post(
        "/v1/chat/completions", headers=OAI, json={"model": "gpt-e2e", "messages": user}
    )
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "2"
    want[resp.headers["x-request-id"]] = expect(
        **GPT, endpoint="chat.completions", status_code=429, error_type="upstream_error"
    )

    await client.close()  # stops the app: the writer flushes before close returns
    finished = time.time()
    rows = await fetch_rows(database)
    by_id = {r["request_id"]: r for r in rows}
    assert len(rows) == len(by_id) == len(want)
    assert no_row not in by_id
    assert set(by_id) == set(want)
    for request_id, expected in want.items():
        row = by_id[request_id]
        assert {k: row[k] for k in expected} == expected, request_id
        assert started - 1 <= row["created_at"].timestamp() <= finished
        assert 0 <= row["latency_ms"] < 10_000
        if expected["status_code"] == 200:
            assert row["ttft_ms"] is not None
            assert 0 <= row["ttft_ms"] <= row["latency_ms"]
        else:
            assert row["ttft_ms"] is None
    stats = parts.writer.stats
    assert stats.rows_submitted == stats.rows_written == len(want)
    assert stats.rows_spooled == stats.rows_lost == stats.rows_rejected == 0


async def _load(
    client: Any, count: int, *, concurrency: int = 6, on_each: Callable[[int], None] | None = None
) -> list[str]:
    """`count` successful requests, half streamed; returns their x-request-id values."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str:
        async with sem:
            stream = i % 2 == 0
            resp = await client.post(
                "/v1/chat/completions",
                headers=OAI,
                json={
                    "model": "gpt-stream" if stream else "gpt-e2e",
                    "stream": stream,
                    "messages": [{"role": "user", "content": f"n{i}"}],
                },
            )
            await resp.read()
            assert resp.status == 200
            if on_each is not None:
                on_each(i)
            return str(resp.headers["x-request-id"])

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def load_providers(start_server: StartServer) -> list[dict[str, Any]]:
    """gpt-e2e answers whole bodies, gpt-stream answers a short stream (usage included)."""
    whole = FakeProvider(Step(body=chat_body("ok", prompt=7, completion=2)))
    streams = FakeProvider(Step(events=chat_events(["x", "y"], prompt=5), stall_between=0.005))
    return [
        channel("whole", server_url(await start_server(whole.app())), models=["gpt-e2e"]),
        channel("streams", server_url(await start_server(streams.app())), models=["gpt-stream"]),
    ]


def load_config(tmp_path: Path, channels: list[dict[str, Any]], url: str) -> Config:
    """One key, both load models priced."""
    prices = {m: {"input": "1", "output": "2"} for m in ("gpt-e2e", "gpt-stream")}
    return make_config(tmp_path, channels, prices=prices, billing=billing(url, tmp_path))


@pytest.fixture
async def pg_proxy() -> AsyncIterator[PgProxy]:
    """A TCP proxy to PostgreSQL that the test can cut and restore."""
    proxy = PgProxy()
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def test_database_cut_mid_load_loses_and_doubles_nothing(
    tmp_path: Path,
    database: str,
    start_server: StartServer,
    start_proxy: StartProxy,
    pg_proxy: PgProxy,
) -> None:
    """Connectivity lost and restored under load: rows are spooled, replayed, stored once each."""
    channels = await load_providers(start_server)
    client, parts = await start_proxy(load_config(tmp_path, channels, pg_proxy.dsn(database)))
    stats = parts.writer.stats
    total = 60
    done = 0

    def progress(_: int) -> None:
        nonlocal done
        done += 1

    load = asyncio.create_task(_load(client, total, on_each=progress))
    await until(lambda: stats.rows_written >= 10)  # the database took rows before the cut
    pg_proxy.cut()
    cut_at = done
    await until(lambda: stats.rows_spooled > 0)  # the writer noticed and spooled
    await until(lambda: done >= cut_at + 10)  # requests kept being served while it was away
    pg_proxy.restore()
    ids = await load
    assert len(set(ids)) == total
    await until(
        lambda: (
            stats.queue_depth == 0
            and stats.spool_rows == 0
            and stats.rows_replayed == stats.rows_spooled
        ),
        within=20,
    )
    await client.close()

    assert await count_rows(database) == (total, total)
    stored = {r["request_id"] for r in await fetch_rows(database)}
    assert stored == set(ids)
    assert stats.rows_spooled > 0
    assert stats.rows_replayed == stats.rows_spooled
    assert stats.rows_written <= total  # a row whose ack was lost is a duplicate on replay
    assert stats.rows_lost == stats.rows_rejected == stats.rows_unreadable == 0
    assert stats.rows_submitted == total


async def test_restart_replays_a_left_over_spool_exactly_once(
    tmp_path: Path,
    database: str,
    start_server: StartServer,
    start_proxy: StartProxy,
    pg_proxy: PgProxy,
) -> None:
    """Rows spooled by a process that never reached the database are stored once by the next."""
    channels = await load_providers(start_server)
    pg_proxy.cut()  # the first process never reaches the database
    client, parts = await start_proxy(load_config(tmp_path, channels, pg_proxy.dsn(database)))
    total = 12
    ids = await _load(client, total)
    await client.close()
    first = parts.writer.stats
    assert first.rows_spooled == total
    assert first.rows_written == first.rows_lost == 0
    spooled = b"".join(p.read_bytes() for p in (tmp_path / "spool").glob("spool-*.jsonl"))
    assert spooled.count(b"\n") == total

    client, parts = await start_proxy(load_config(tmp_path, channels, pg_url(database)))
    second = parts.writer.stats
    await until(lambda: second.rows_replayed == total and second.spool_rows == 0)
    await client.close()
    assert second.rows_written == total
    assert second.rows_duplicate == 0
    assert list((tmp_path / "spool").glob("spool-*.jsonl")) == []

    client, parts = await start_proxy(load_config(tmp_path, channels, pg_url(database)))
    await client.close()  # a third start finds nothing left to replay
    assert parts.writer.stats.rows_replayed == 0
    assert await count_rows(database) == (total, total)
    assert {r["request_id"] for r in await fetch_rows(database)} == set(ids)


async def test_client_disconnect_is_billed_for_what_it_received(
    tmp_path: Path,
    database: str,
    start_server: StartServer,
    start_proxy: StartProxy,
) -> None:
    """A client that leaves mid-stream gets a 499 row billed for the tokens it was sent."""
    words = [" hello"] * 200  # one o200k token each
    fake = FakeProvider(Step(events=chat_events(words, prompt=7), stall_between=0.01))
    url = server_url(await start_server(fake.app()))
    config = e2e_config(tmp_path, [channel("oa", url, models=["gpt-e2e"])], pg_url(database))
    client, _ = await start_proxy(config)
    resp = await client.post(
        "/v1/chat/completions",
        headers=OAI,
        json={"model": "gpt-e2e", "stream": True, "messages": [{"role": "user", "content": "x"}]},
    )
    request_id = resp.headers["x-request-id"]
    received = b""
    while received.count(b'" hello"') < 5:
        received += await resp.content.readany()
    resp.close()
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    await client.close()

    rows = await fetch_rows(database)
    assert [r["request_id"] for r in rows] == [request_id]
    row = rows[0]
    assert row["status_code"] == 499
    assert row["error_type"] == "client_disconnect"
    assert row["usage_source"] == "estimated"
    assert row["stream"] is True
    assert row["channel_id"] == "oa"
    assert 5 <= row["completion_tokens"] < len(words)  # what was delivered, not the whole answer
    assert row["prompt_tokens"] > 0  # counted from the request
    # 122.4 nanos per prompt token and 488 per completion token, rounded half up once
    expected = (row["prompt_tokens"] * 1224 + row["completion_tokens"] * 4880 + 5) // 10
    assert row["cost_nanos"] == expected > 0
    assert row["ttft_ms"] is not None


async def test_stream_cut_by_upstream_ends_with_an_error_and_estimated_usage(
    tmp_path: Path,
    database: str,
    start_server: StartServer,
    start_proxy: StartProxy,
) -> None:
    """An upstream that drops a stream: the client gets an error event, the row upstream_reset."""
    oa, an, channels = await two_providers(start_server)
    client, _ = await start_proxy(e2e_config(tmp_path, channels, pg_url(database)))
    user = [{"role": "user", "content": "x"}]

    events = chat_events([" hello", " hello", " hello", " hello"], prompt=7)
    oa.then(Step(events=events, cut_after=3))  # role chunk, " hello", " hello", then gone
    resp = await client.post(
        "/v1/chat/completions",
        headers=OAI,
        json={"model": "gpt-e2e", "stream": True, "messages": user},
    )
    assert resp.status == 200
    body = await resp.read()
    openai_id = resp.headers["x-request-id"]
    head = b"".join(events[:3])
    assert body.startswith(head)
    tail = body[len(head) :]
    assert tail.startswith(b"data: {")
    assert tail.endswith(b"\n\n")
    assert tail.count(b"\n\n") == 1
    error = orjson.loads(tail[len(b"data: ") :])["error"]
    assert error["code"] == "upstream_reset"
    assert b"[DONE]" not in body

    a_events = anthropic_events([" hello", " hello", " hello"], prompt=9)
    an.then(Step(events=a_events, cut_after=5))  # start, block start, ping, two deltas
    resp = await client.post(
        "/v1/messages",
        headers=ANT,
        json={"model": "claude-e2e", "max_tokens": 20, "stream": True, "messages": user},
    )
    body = await resp.read()
    anthropic_id = resp.headers["x-request-id"]
    head = b"".join(a_events[:5])
    assert body.startswith(head)
    tail = body[len(head) :]
    assert tail.startswith(b"event: error\ndata: ")
    assert orjson.loads(tail.split(b"data: ", 1)[1])["type"] == "error"
    await client.close()

    rows = {r["request_id"]: r for r in await fetch_rows(database)}
    assert set(rows) == {openai_id, anthropic_id}
    for request_id in (openai_id, anthropic_id):
        row = rows[request_id]
        assert row["status_code"] == 502
        assert row["error_type"] == "upstream_reset"
        assert row["usage_source"] == "estimated"
        assert row["completion_tokens"] == 2  # the two " hello" the client received
    prompt = rows[openai_id]["prompt_tokens"]
    assert prompt > 0  # counted from the request
    assert rows[openai_id]["cost_nanos"] == (prompt * 1224 + 2 * 4880 + 5) // 10
    assert rows[anthropic_id]["prompt_tokens"] == 9  # message_start had told it
    # 9 * 2400.08 + 2 * 12000 = 21600.72 + 24000 -> 45601
    assert rows[anthropic_id]["cost_nanos"] == 45601


async def test_sdk_sees_the_cut_stream_as_an_error(
    tmp_path: Path,
    database: str,
    start_server: StartServer,
    start_proxy: StartProxy,
    sdk: SDKs,
) -> None:
    """The openai and anthropic SDKs raise on the error event that ends a cut stream."""
    oa, an, channels = await two_providers(start_server)
    client, _ = await start_proxy(e2e_config(tmp_path, channels, pg_url(database)))
    user: Any = [{"role": "user", "content": "x"}]
    oa.then(Step(events=chat_events(["a", "b", "c"]), cut_after=3))
    stream = await sdk.openai(client).chat.completions.create(
        model="gpt-e2e", messages=user, stream=True
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    an.then(Step(events=anthropic_events(["a", "b", "c"]), cut_after=4))
    a_stream = await sdk.anthropic(client).messages.create(
        model="claude-e2e", max_tokens=20, messages=user, stream=True
    )
    with pytest.raises(anthropic.APIError):
        async for _ in a_stream:
            pass
    await client.close()
    rows = await fetch_rows(database)
    assert [r["error_type"] for r in rows] == ["upstream_reset", "upstream_reset"]


async def _no_usage_row(
    tmp_path: Path,
    database: str,
    start_server: StartServer,
    start_proxy: StartProxy,
    step: Step,
    stream: bool,
) -> dict[str, Any]:
    """The row of one gpt-e2e request answered by `step`, which reports no usage."""
    oa, _, channels = await two_providers(start_server)
    client, _ = await start_proxy(e2e_config(tmp_path, channels, pg_url(database)))
    oa.then(step)
    resp = await client.post(
        "/v1/chat/completions",
        headers=OAI,
        json={"model": "gpt-e2e", "stream": stream, "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.status == 200
    await resp.read()
    request_id = resp.headers["x-request-id"]
    await client.close()
    rows = await fetch_rows(database)
    assert [r["request_id"] for r in rows] == [request_id]
    assert rows[0]["usage_source"] == "estimated"
    assert rows[0]["status_code"] == 200
    assert rows[0]["prompt_tokens"] > 0  # counted from the request
    return rows[0]


async def test_stream_without_usage_is_estimated_from_what_was_delivered(
    tmp_path: Path,
    database: str,
    start_server: StartServer,
    start_proxy: StartProxy,
) -> None:
    """A provider that ignores the usage request: the delivered tokens are counted offline."""
    step = Step(events=chat_events([" hello"] * 3, usage=False))
    row = await _no_usage_row(tmp_path, database, start_server, start_proxy, step, True)
    assert row["completion_tokens"] == 3
    assert row["cost_nanos"] == (row["prompt_tokens"] * 1224 + 3 * 4880 + 5) // 10


async def test_body_without_usage_is_estimated_from_what_was_delivered(
    tmp_path: Path,
    database: str,
    start_server: StartServer,
    start_proxy: StartProxy,
) -> None:
    """A whole answer without usage: its completion text is counted offline, not billed as 0."""
    body = orjson.loads(chat_body(" hello" * 4))
    del body["usage"]
    step = Step(body=orjson.dumps(body))
    row = await _no_usage_row(tmp_path, database, start_server, start_proxy, step, False)
    assert row["completion_tokens"] == 4
    assert row["cost_nanos"] == (row["prompt_tokens"] * 1224 + 4 * 4880 + 5) // 10
