"""Token counting: forwarded to a native channel, else the bundled tokenizer; never billed."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

from proxyd.protocol.estimate import Tokenizer
from tests.conftest import SECRET, SDKs, StartProxy, StartServer, channel, key, make_config
from tests.conftest import server_url as url_of
from tests.fakes import FakeProvider, Step, anthropic_body

ANT = {"x-api-key": SECRET, "anthropic-version": "2023-06-01"}
OAI = {"Authorization": f"Bearer {SECRET}"}
MESSAGES = [{"role": "user", "content": "How many tokens is this sentence, roughly?"}]
COUNT = {"model": "claude-x", "messages": MESSAGES, "system": "Be brief."}


def rows(tmp_path: Path) -> list[dict[str, Any]]:
    """Every billing row of the test's SQLite file."""
    with sqlite3.connect(tmp_path / "usage.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM usage_records")]


async def _start(
    start_server: StartServer,
    start_proxy: StartProxy,
    tmp_path: Path,
    fake: FakeProvider,
    *,
    type: str = "anthropic",
    model: str = "claude-x",
    **cfg: Any,
) -> TestClient[Any, Any]:
    server = await start_server(fake.app())
    chans = [channel("c1", url_of(server), type=type, models=[model])]
    client, _ = await start_proxy(make_config(tmp_path, chans, **cfg))
    return client


async def test_sdk_count_tokens_reaches_the_anthropic_channel(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path, sdk: SDKs
) -> None:
    """messages.count_tokens goes to the channel's count_tokens, answer as sent, row cost 0."""
    fake = FakeProvider(Step(body=b'{"input_tokens": 4321}'))
    client = await _start(start_server, start_proxy, tmp_path, fake)
    counted = await sdk.anthropic(client).messages.count_tokens(**COUNT)
    assert counted.input_tokens == 4321
    assert fake.seen[0].path == "/v1/messages/count_tokens"
    assert fake.seen[0].body == COUNT
    await client.close()
    (row,) = rows(tmp_path)
    assert row["endpoint"] == "count_tokens"
    assert row["cost_nanos"] == 0
    assert row["channel_id"] == "c1"
    assert row["status_code"] == 200


async def test_beta_count_passes_query_and_beta_header(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """Claude Code's `?beta=true`, anthropic-beta values and new fields pass as sent."""
    fake = FakeProvider(Step(body=b'{"input_tokens": 17}', headers={"request-id": "req_up"}))
    client = await _start(start_server, start_proxy, tmp_path, fake)
    betas = "claude-code-20250219,context-management-2025-06-27,interleaved-thinking-2025-05-14"
    body = {
        **COUNT,
        "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
        "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
        "a_field_from_next_year": {"x": 1},
    }
    raw = orjson.dumps(body)
    resp = await client.post(
        "/v1/messages/count_tokens?beta=true",
        data=raw,
        headers={**ANT, "anthropic-beta": betas, "Content-Type": "application/json"},
    )
    assert await resp.json() == {"input_tokens": 17}
    assert resp.headers["x-upstream-request-id"] == "req_up"
    seen = fake.seen[0]
    assert seen.query == "beta=true"
    assert seen.headers["anthropic-beta"] == betas
    assert seen.body == body


async def test_openai_only_model_is_counted_offline(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path, sdk: SDKs
) -> None:
    """A model served by OpenAI-style channels only: the tokenizer answers, marked estimated."""
    fake = FakeProvider()
    client = await _start(start_server, start_proxy, tmp_path, fake, type="openai")
    resp = await client.post("/v1/messages/count_tokens?beta=true", json=COUNT, headers=ANT)
    assert resp.status == 200
    assert resp.headers["x-proxyd-estimated"] == "true"
    expected = Tokenizer().prompt_tokens("messages", COUNT)
    assert await resp.json() == {"input_tokens": expected}
    assert fake.seen == []
    via_sdk = await sdk.anthropic(client).messages.count_tokens(**COUNT)
    assert via_sdk.input_tokens == expected
    await client.close()
    got = rows(tmp_path)
    assert [(r["endpoint"], r["cost_nanos"], r["usage_source"]) for r in got] == [
        ("count_tokens", 0, "estimated")
    ] * 2


async def test_provider_without_counting_falls_back_to_the_tokenizer(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """An upstream 404 (or 405, 501) on count_tokens is answered offline, not passed on."""
    fake = FakeProvider(Step(status=404, body=b'{"type":"error","error":{"type":"not_found"}}'))
    client = await _start(start_server, start_proxy, tmp_path, fake)
    resp = await client.post("/v1/messages/count_tokens", json=COUNT, headers=ANT)
    assert resp.status == 200
    assert resp.headers["x-proxyd-estimated"] == "true"
    assert (await resp.json())["input_tokens"] == Tokenizer().prompt_tokens("messages", COUNT)
    assert len(fake.seen) == 1


async def test_counting_spares_rpm_and_balance_but_has_its_own_bucket(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """Counts do not touch rpm; past count_tokens_per_minute they get 429, retry true."""
    fake = FakeProvider(Step(body=b'{"input_tokens": 5}'))
    client = await _start(
        start_server,
        start_proxy,
        tmp_path,
        fake,
        keys=[key(rpm=1)],
        admission={"count_tokens_per_minute": 3},
    )
    fake.default = Step(body=b'{"input_tokens": 5}')
    for _ in range(3):
        ok = await client.post("/v1/messages/count_tokens", json=COUNT, headers=ANT)
        assert ok.status == 200
    limited = await client.post("/v1/messages/count_tokens", json=COUNT, headers=ANT)
    assert limited.status == 429
    assert limited.headers["x-should-retry"] == "true"
    assert int(limited.headers["Retry-After"]) >= 1
    assert (await limited.json())["type"] == "error"
    fake.default = Step(body=anthropic_body("hi"))
    message = {**COUNT, "max_tokens": 8}
    assert (await client.post("/v1/messages", json=message, headers=ANT)).status == 200


async def test_count_refused_for_an_unknown_key_and_a_foreign_model(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """Counting still needs a known key (401) and an allowed model (403), in Anthropic's format."""
    fake = FakeProvider(Step(body=b'{"input_tokens": 5}'))
    client = await _start(start_server, start_proxy, tmp_path, fake, keys=[key(models=["other"])])
    bad = {**ANT, "x-api-key": "sk-nope"}
    unknown = await client.post("/v1/messages/count_tokens", json=COUNT, headers=bad)
    assert unknown.status == 401
    assert unknown.headers["x-should-retry"] == "false"
    foreign = await client.post("/v1/messages/count_tokens", json=COUNT, headers=ANT)
    assert foreign.status == 403
    assert (await foreign.json())["error"]["type"] == "permission_error"
    assert fake.seen == []


async def test_responses_input_tokens_native_and_offline(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """/v1/responses/input_tokens goes to an OpenAI channel; for an Anthropic one, counted here."""
    body = {"model": "gpt-x", "input": "Count me, please.", "instructions": "Be brief."}
    fake = FakeProvider(Step(body=b'{"object": "response.input_tokens", "input_tokens": 9}'))
    client = await _start(start_server, start_proxy, tmp_path, fake, type="openai", model="gpt-x")
    resp = await client.post("/v1/responses/input_tokens", json=body, headers=OAI)
    assert await resp.json() == {"object": "response.input_tokens", "input_tokens": 9}
    assert fake.seen[0].path == "/v1/responses/input_tokens"
    assert "x-proxyd-estimated" not in resp.headers

    other = FakeProvider()
    server = await start_server(other.app())
    chans = [channel("c2", url_of(server), type="anthropic", models=["gpt-x"])]
    client2, _ = await start_proxy(make_config(tmp_path / "b", chans))
    resp2 = await client2.post("/v1/responses/input_tokens", json=body, headers=OAI)
    assert resp2.headers["x-proxyd-estimated"] == "true"
    expected = Tokenizer().prompt_tokens("responses", body)
    assert orjson.loads(await resp2.read())["input_tokens"] == expected
    assert other.seen == []
