"""Channels end to end: failover before the first byte, cooldown, and translated traffic."""

from __future__ import annotations

import json
import time
from email.utils import formatdate
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import SECRET, SDKs, StartProxy, StartServer, channel, make_config, server_url
from tests.fakes import (
    FakeProvider,
    Step,
    anthropic_body,
    anthropic_events,
    chat_body,
    chat_events,
    named,
    sse,
)

AUTH = {"Authorization": f"Bearer {SECRET}"}
CHAT: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


async def _two(
    tmp_path: Path,
    start_server: StartServer,
    start_proxy: StartProxy,
    first: FakeProvider,
    second: FakeProvider,
    **upstream: Any,
) -> Any:
    a = await start_server(first.app())
    b = await start_server(second.app())
    config = make_config(
        tmp_path,
        [
            channel("primary", server_url(a), priority=10),
            channel("backup", server_url(b), priority=0),
        ],
        upstream=upstream,
    )
    return await start_proxy(config)


async def test_500_then_ok_fails_over_once(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """A 500 on the primary lands the request on the backup; the client sees one answer."""
    primary = FakeProvider(Step(status=500, body=b'{"error": {"message": "boom"}}'))
    backup = FakeProvider(Step(body=chat_body("from backup")))
    client, parts = await _two(tmp_path, start_server, start_proxy, primary, backup)
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    assert resp.status == 200
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "from backup"
    assert len(primary.seen) == 1
    assert len(backup.seen) == 1
    exposition = parts.metrics.render()[0].decode()
    assert "proxyd_failovers_total{" in exposition


async def test_connect_failure_fails_over(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """A channel that refuses connections is skipped for the next one."""
    backup = FakeProvider(Step(body=chat_body("ok")))
    b = await start_server(backup.app())
    config = make_config(
        tmp_path,
        [
            channel("dead", "http://127.0.0.1:9", priority=10),
            channel("backup", server_url(b)),
        ],
    )
    client, _ = await start_proxy(config)
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    assert resp.status == 200
    assert len(backup.seen) == 1


async def test_all_fail_gives_last_upstream_error(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """When every candidate fails, the client sees the last upstream error's status, in proxyd's
    words: a provider's 5xx body may name the operator's account."""
    primary = FakeProvider(Step(status=503, body=b'{"error": {"message": "first"}}'))
    backup = FakeProvider(Step(status=502, body=b'{"error": {"message": "second"}}'))
    client, _ = await _two(tmp_path, start_server, start_proxy, primary, backup)
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["message"] == "The upstream provider returned an error."
    assert error["code"] == "upstream_error"


async def test_timeouts_give_504(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """Channels that stall before their headers end in a 504 in the client's format."""
    slow = FakeProvider(Step(stall_before_headers=2, body=chat_body("late")))
    s = await start_server(slow.app())
    config = make_config(tmp_path, [channel("slow", server_url(s), first_byte_timeout=0.2)])
    client, _ = await start_proxy(config)
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_timeout"


async def test_4xx_is_not_retried(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """An upstream 400 is the client's answer; the backup is never asked."""
    primary = FakeProvider(Step(status=400, body=b'{"error": {"message": "bad"}}'))
    backup = FakeProvider()
    client, _ = await _two(tmp_path, start_server, start_proxy, primary, backup)
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    assert resp.status == 400
    assert backup.seen == []


async def test_reset_after_first_byte_is_not_retried(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """A stream cut after 3 chunks ends with an OpenAI error event; nothing is retried."""
    primary = FakeProvider(Step(events=chat_events(["a", "b", "c", "d", "e"]), cut_after=3))
    backup = FakeProvider()
    client, _ = await _two(tmp_path, start_server, start_proxy, primary, backup)
    resp = await client.post("/v1/chat/completions", headers=AUTH, json={**CHAT, "stream": True})
    body = await resp.read()
    assert resp.status == 200
    events = [e for e in body.split(b"\n\n") if e]
    assert len(events) == 4
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_reset"
    assert backup.seen == []


async def test_cooldown_then_single_trial(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """After repeated failures the primary gets no traffic until one trial brings it back."""
    failing = [Step(status=500, body=b"{}") for _ in range(3)]
    primary = FakeProvider(Step(body=chat_body("primary back"))).then(*failing)
    backup = FakeProvider(Step(body=chat_body("backup")))
    client, parts = await _two(
        tmp_path,
        start_server,
        start_proxy,
        primary,
        backup,
        failure_threshold=3,
        base_cooldown_seconds=0.3,
    )
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
        assert resp.status == 200
    assert len(primary.seen) == 3
    for _ in range(3):  # cooling down: straight to the backup
        resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
        assert (await resp.json())["choices"][0]["message"]["content"] == "backup"
    assert len(primary.seen) == 3
    state = {c["id"]: c for c in parts.channel_health()}
    assert state["primary"]["state"] == "cooling_down"
    import asyncio

    await asyncio.sleep(0.35)
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    assert (await resp.json())["choices"][0]["message"]["content"] == "primary back"
    assert len(primary.seen) == 4
    assert {c["id"]: c for c in parts.channel_health()}["primary"]["healthy"] is True


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_upstream_429_retry_after_cools_the_channel(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, form: str
) -> None:
    """An upstream 429 with Retry-After (either form) keeps that channel out for that long."""
    value = "30" if form == "seconds" else formatdate(time.time() + 30, usegmt=True)
    primary = FakeProvider(Step(body=chat_body("primary"))).then(
        Step(status=429, body=b"{}", headers={"Retry-After": value})
    )
    backup = FakeProvider(Step(body=chat_body("backup")))
    client, parts = await _two(tmp_path, start_server, start_proxy, primary, backup)
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
        assert (await resp.json())["choices"][0]["message"]["content"] == "backup"
    assert len(primary.seen) == 1
    cooling = {c["id"]: c for c in parts.channel_health()}["primary"]
    assert 25 < float(cooling["cooldown_remaining_seconds"]) <= 30


async def test_weights_spread_traffic(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """Within one priority, traffic follows the weights (3:1 here, within loose bounds)."""
    heavy = FakeProvider(Step(body=chat_body("h")))
    light = FakeProvider(Step(body=chat_body("l")))
    h = await start_server(heavy.app())
    lt = await start_server(light.app())
    config = make_config(
        tmp_path,
        [channel("heavy", server_url(h), weight=3), channel("light", server_url(lt), weight=1)],
    )
    client, _ = await start_proxy(config)
    for i in range(200):  # 200 conversations: one request each, so stickiness plays no part
        body = {**CHAT, "messages": [{"role": "user", "content": f"conversation {i}"}]}
        resp = await client.post("/v1/chat/completions", headers=AUTH, json=body)
        assert resp.status == 200
    share = len(heavy.seen) / 200
    assert 0.62 < share < 0.87  # p(heavy)=0.75; these bounds are > 4 sigma wide


async def test_openai_client_on_anthropic_channel_with_tools(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, sdk: SDKs
) -> None:
    """The openai SDK streams a tool call from a model only an anthropic channel serves."""
    msg: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "up",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 1},
    }
    events = [
        named("message_start", {"type": "message_start", "message": msg}),
        named(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {},
                },
            },
        ),
        named(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": "Par'},
            },
        ),
        named(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": 'is"}'},
            },
        ),
        named("content_block_stop", {"type": "content_block_stop", "index": 0}),
        named(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 9},
            },
        ),
        named("message_stop", {"type": "message_stop"}),
    ]
    fake = FakeProvider(Step(events=events))
    server = await start_server(fake.app())
    config = make_config(
        tmp_path, [channel("claude", server_url(server), type="anthropic", models=["gpt-test"])]
    )
    client, _ = await start_proxy(config)
    stream = await sdk.openai(client).chat.completions.create(
        model="gpt-test",
        stream=True,
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "weather in Paris?"},
        ],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
    )
    args = ""
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                args += call.function.arguments or "" if call.function else ""
            finish = choice.finish_reason or finish
    assert json.loads(args) == {"city": "Paris"}
    assert finish == "tool_calls"
    sent = fake.seen[0]
    assert sent.path == "/v1/messages"
    assert sent.body["system"] in ("be brief", [{"type": "text", "text": "be brief"}])
    assert sent.body["tools"][0]["name"] == "get_weather"


async def test_anthropic_client_on_openai_channel(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, sdk: SDKs
) -> None:
    """The anthropic SDK streams and fetches text from a model only an openai channel serves."""
    fake = FakeProvider().then(
        Step(events=chat_events(["Bon", "jour"])), Step(body=chat_body("Salut"))
    )
    server = await start_server(fake.app())
    config = make_config(tmp_path, [channel("gpt", server_url(server), models=["claude-test"])])
    client, _ = await start_proxy(config)
    claude = sdk.anthropic(client)
    async with claude.messages.stream(
        model="claude-test",
        max_tokens=30,
        system="terse",
        messages=[{"role": "user", "content": "hello"}],
    ) as stream:
        final = await stream.get_final_message()
    assert final.content[0].text == "Bonjour"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 2
    message = await claude.messages.create(
        model="claude-test", max_tokens=30, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].text == "Salut"
    assert fake.seen[0].path == "/v1/chat/completions"
    assert fake.seen[0].body["messages"][0] == {"role": "system", "content": "terse"}
    assert fake.seen[0].body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("field", [None, "max_tokens", "max_completion_tokens"])
async def test_translated_max_tokens_goes_in_the_channels_field(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, field: str | None
) -> None:
    """An Anthropic client's max_tokens reaches an openai channel in the field it configures."""
    fake = FakeProvider(Step(body=chat_body("ok")))
    server = await start_server(fake.app())
    extra = {} if field is None else {"max_tokens_field": field}
    config = make_config(
        tmp_path, [channel("gpt", server_url(server), models=["claude-test"], **extra)]
    )
    client, _ = await start_proxy(config)
    resp = await client.post(
        "/v1/messages",
        headers={"x-api-key": SECRET, "anthropic-version": "2023-06-01"},
        json={
            "model": "claude-test",
            "max_tokens": 77,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert resp.status == 200
    sent = fake.seen[0].body
    expected = field or "max_tokens"
    other = {"max_tokens", "max_completion_tokens"} - {expected}
    assert sent[expected] == 77
    assert not other & set(sent)


async def test_untranslatable_feature_is_a_clear_400(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """A feature with no equivalent on the serving protocol is refused, not silently dropped."""
    fake = FakeProvider(Step(body=anthropic_body("x")))
    server = await start_server(fake.app())
    config = make_config(
        tmp_path, [channel("claude", server_url(server), type="anthropic", models=["gpt-test"])]
    )
    client, _ = await start_proxy(config)
    resp = await client.post("/v1/chat/completions", headers=AUTH, json={**CHAT, "n": 3})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "n"
    assert error["code"] == "unsupported_feature"
    assert fake.seen == []


async def test_translated_upstream_error_in_client_format(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """An Anthropic 400 reaches an OpenAI client as an OpenAI error with the same status."""
    err = orjson.dumps(
        {"type": "error", "error": {"type": "invalid_request_error", "message": "too long"}}
    )
    fake = FakeProvider(Step(status=400, body=err))
    server = await start_server(fake.app())
    config = make_config(
        tmp_path, [channel("claude", server_url(server), type="anthropic", models=["gpt-test"])]
    )
    client, _ = await start_proxy(config)
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == "too long"


@pytest.mark.parametrize("unused", [None])
def test_fixture_events_shape(unused: None) -> None:
    """The fixtures' SSE framing matches providers (guards the helpers themselves)."""
    assert anthropic_events(["x"])[0].startswith(b"event: message_start\n")
    assert sse({}) == b"data: {}\n\n"
