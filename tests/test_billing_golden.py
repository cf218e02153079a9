"""Golden costs per dialect: real SDKs → proxyd → scripted providers, each cost worked by hand.

Every case runs whole and streamed; the Anthropic Claude Code turn and the DeepSeek answer also
run translated (OpenAI client on an Anthropic channel, Anthropic client on an OpenAI-style
channel), where the client must see cache reads and writes in its own protocol's fields.
The rows are read back from the real PostgreSQL.

Prices, discount 0.8 (so a rate of P per million is 800 x P nanos per token):
- claude-g: input 3, output 15, cached_input 0.30, cache_write 3.75, cache_write_1h 6,
  per_call web_search 0.01;
- gpt-g: input 2, output 8, cached_input 0.50, cache_write 2.50, above 100,000 prompt tokens
  input 4 / output 12 / cached_input 1, tier priority input 3.50 / output 14 / cached 0.875,
  per_call web_search 0.01;
- deepseek-g: input 0.28, output 0.42, cached_input 0.028.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from tests.conftest import (
    SDKs,
    StartProxy,
    StartServer,
    channel,
    key,
    make_config,
    pg_url,
    server_url,
)
from tests.fakes import FakeProvider, Step, named, sse

pytestmark = pytest.mark.postgres

PRICES: dict[str, Any] = {
    "claude-g": {
        "input": "3", "output": "15", "cached_input": "0.30", "cache_write": "3.75",
        "cache_write_1h": "6", "per_call": {"web_search": "0.01"},
    },
    "gpt-g": {
        "input": "2", "output": "8", "cached_input": "0.50", "cache_write": "2.50",
        "long_context": [
            {"above_prompt_tokens": 100_000, "input": "4", "output": "12", "cached_input": "1"}
        ],
        "tiers": {"priority": {"input": "3.50", "output": "14", "cached_input": "0.875"}},
        "per_call": {"web_search": "0.01"},
    },
    "deepseek-g": {"input": "0.28", "output": "0.42", "cached_input": "0.028"},
}  # fmt: skip
USER: Any = [{"role": "user", "content": "hello"}]


@dataclass
class Row:
    """The billing columns a case pins down."""

    cost_nanos: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    service_tier: str | None = None
    tool_calls: int = 0


# -- upstream answers ------------------------------------------------------------------------
def anthropic_answer(usage: dict[str, Any], stream: bool) -> Step:
    """An Anthropic message whose usage is `usage`, whole or as SSE."""
    msg: dict[str, Any] = {
        "id": "msg_g", "type": "message", "role": "assistant", "model": "up",
        "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": usage,
    }  # fmt: skip
    if not stream:
        return Step(body=orjson.dumps(msg))
    start_usage = {k: v for k, v in usage.items() if k != "server_tool_use"} | {"output_tokens": 1}
    delta_usage = {"output_tokens": usage["output_tokens"]}
    if "server_tool_use" in usage:
        delta_usage["server_tool_use"] = usage["server_tool_use"]
    return Step(
        events=[
            named("message_start", {"type": "message_start",
                                    "message": msg | {"content": [], "usage": start_usage}}),
            named("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}}),
            named("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": "ok"}}),
            named("content_block_stop", {"type": "content_block_stop", "index": 0}),
            named("message_delta", {"type": "message_delta", "usage": delta_usage,
                                    "delta": {"stop_reason": "end_turn", "stop_sequence": None}}),
            named("message_stop", {"type": "message_stop"}),
        ]
    )  # fmt: skip


def chat_answer(usage: dict[str, Any], stream: bool, tier: str = "default") -> Step:
    """An OpenAI chat completion whose usage is `usage`, whole or as SSE with a usage chunk."""
    base = {"id": "chatcmpl-g", "created": 1, "model": "up", "service_tier": tier}
    if not stream:
        return Step(
            body=orjson.dumps(
                base | {"object": "chat.completion", "usage": usage, "choices": [
                    {"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "ok"}}]}
            )
        )  # fmt: skip
    chunk = base | {"object": "chat.completion.chunk"}
    return Step(
        events=[
            sse(chunk | {"choices": [{"index": 0, "delta": {"content": "ok"}}]}),
            sse(chunk | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            sse(chunk | {"choices": [], "usage": usage}),
            b"data: [DONE]\n\n",
        ]
    )  # fmt: skip


def responses_answer(usage: dict[str, Any], stream: bool, output: list[Any]) -> Step:
    """A Responses API answer with `output` items and `usage`, whole or as SSE."""
    text = {"type": "message", "id": "msg_g", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "ok", "annotations": []}]}  # fmt: skip
    resp = {
        "id": "resp_g", "object": "response", "created_at": 1, "model": "up",
        "status": "completed", "output": [*output, text], "usage": usage,
        "service_tier": "default",
    }  # fmt: skip
    if not stream:
        return Step(body=orjson.dumps(resp))
    created = resp | {"status": "in_progress", "output": [], "usage": None}
    return Step(
        events=[
            named("response.created",
                  {"type": "response.created", "sequence_number": 0, "response": created}),
            named("response.output_text.delta",
                  {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_g",
                   "output_index": 0, "content_index": 0, "delta": "ok"}),
            named("response.completed",
                  {"type": "response.completed", "sequence_number": 2, "response": resp}),
        ]
    )  # fmt: skip


# -- the proxy --------------------------------------------------------------------------------
Setup = tuple[Any, FakeProvider, FakeProvider, str]


@pytest.fixture
async def golden(
    tmp_path: Path, database: str, start_server: StartServer, start_proxy: StartProxy
) -> Setup:
    """proxyd with an Anthropic channel (claude-g) and an OpenAI-style one (gpt-g, deepseek-g)."""
    an, oa = FakeProvider(), FakeProvider()
    an_url = server_url(await start_server(an.app()))
    oa_url = server_url(await start_server(oa.app()))
    config = make_config(
        tmp_path,
        [
            channel("an", an_url, type="anthropic", models=["claude-g"]),
            channel("oa", oa_url, models=["gpt-g", "deepseek-g"]),
        ],
        keys=[key()],
        billing={
            "database_url": pg_url(database),
            "spool_dir": str(tmp_path / "spool"),
            "flush_interval_seconds": 0.05,
        },
        state={"prices": {"version": 1, "discount": "0.8", "prices": PRICES}},
    )
    client, _ = await start_proxy(config)
    return client, an, oa, database


async def row_of(database: str, request_id: str) -> Row:
    """The billing row of one request, waiting for the writer."""
    conn = await asyncpg.connect(pg_url(database))
    try:
        async with asyncio.timeout(10):
            while True:
                r = await conn.fetchrow(
                    "SELECT * FROM usage_records WHERE request_id = $1", request_id
                )
                if r is not None:
                    break
                await asyncio.sleep(0.05)
    finally:
        await conn.close()
    return Row(**{f: r[f] for f in Row.__dataclass_fields__})


Call = Callable[[Any, bool], Awaitable[tuple[str, Any]]]


async def via_messages(client: Any, sdk: SDKs, model: str, stream: bool, **extra: Any) -> Any:
    """An Anthropic SDK call; (request id, the usage the client saw)."""
    claude = sdk.anthropic(client)
    raw = await claude.messages.with_raw_response.create(
        model=model, max_tokens=2000, messages=USER, stream=stream, **extra
    )
    if not stream:
        return raw.headers["x-request-id"], (await raw.parse()).usage
    start = delta = None
    async for event in await raw.parse():
        if event.type == "message_start":
            start = event.message.usage
        elif event.type == "message_delta":
            delta = event.usage
    # cache counts come in message_start natively, in message_delta when translated
    assert delta is not None
    return raw.headers["x-request-id"], delta if delta.cache_read_input_tokens else start


async def via_chat(client: Any, sdk: SDKs, model: str, stream: bool, **extra: Any) -> Any:
    """An OpenAI SDK chat call; (request id, the usage the client saw)."""
    oai = sdk.openai(client)
    if stream:
        extra["stream_options"] = {"include_usage": True}
    raw = await oai.chat.completions.with_raw_response.create(
        model=model, messages=USER, stream=stream, **extra
    )
    if not stream:
        return raw.headers["x-request-id"], raw.parse().usage
    usage = None
    async for chunk in raw.parse():
        usage = chunk.usage or usage
    return raw.headers["x-request-id"], usage


async def via_responses(client: Any, sdk: SDKs, model: str, stream: bool, **extra: Any) -> Any:
    """An OpenAI SDK Responses call; (request id, the usage the client saw)."""
    oai = sdk.openai(client)
    raw = await oai.responses.with_raw_response.create(
        model=model, input="hello", stream=stream, **extra
    )
    if not stream:
        return raw.headers["x-request-id"], raw.parse().usage
    usage = None
    async for event in raw.parse():
        if event.type == "response.completed":
            usage = event.response.usage
    return raw.headers["x-request-id"], usage


CLAUDE_CODE_TURN = {
    "input_tokens": 1_000,
    "cache_read_input_tokens": 95_000,
    "cache_creation_input_tokens": 4_000,
    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 4_000},
    "output_tokens": 1_000,
}
# 95,000 x 0.30 + 4,000 x 6 + 1,000 x 3 + 1,000 x 15 = 70,500 millionths = 70,500,000 nanos;
# x 0.8 = 56,400,000.
CLAUDE_CODE_ROW = Row(56_400_000, 100_000, 1_000, 95_000, 4_000, 4_000)


@pytest.mark.parametrize("stream", [False, True])
async def test_claude_code_turn_native(golden: Setup, sdk: SDKs, stream: bool) -> None:
    """Cache reads, 1-hour writes, input and output of a Claude Code turn, each at its rate."""
    client, an, _, db = golden
    an.then(anthropic_answer(CLAUDE_CODE_TURN, stream))
    rid, usage = await via_messages(client, sdk, "claude-g", stream)
    assert usage.cache_read_input_tokens == 95_000
    assert await row_of(db, rid) == CLAUDE_CODE_ROW


@pytest.mark.parametrize("stream", [False, True])
async def test_claude_code_turn_translated(golden: Setup, sdk: SDKs, stream: bool) -> None:
    """The same turn to an OpenAI client: its usage carries cached and cache-write tokens."""
    client, an, _, db = golden
    an.then(anthropic_answer(CLAUDE_CODE_TURN, stream))
    rid, usage = await via_chat(client, sdk, "claude-g", stream)
    assert usage.prompt_tokens == 100_000
    assert usage.prompt_tokens_details.cached_tokens == 95_000
    assert usage.prompt_tokens_details.cache_write_tokens == 4_000
    assert await row_of(db, rid) == CLAUDE_CODE_ROW


@pytest.mark.parametrize("stream", [False, True])
async def test_five_minute_write_with_unsplit_remainder(
    golden: Setup, sdk: SDKs, stream: bool
) -> None:
    """5-minute writes at 3.75; the part of cache_creation no split covers counts as 5-minute."""
    client, an, _, db = golden
    usage = {
        "input_tokens": 1_000, "cache_creation_input_tokens": 3_000, "output_tokens": 200,
        "cache_creation": {"ephemeral_5m_input_tokens": 2_000, "ephemeral_1h_input_tokens": 500},
    }  # fmt: skip
    an.then(anthropic_answer(usage, stream))
    rid, _ = await via_messages(client, sdk, "claude-g", stream)
    # 1,000 x 3 + 2,500 x 3.75 + 500 x 6 + 200 x 15 = 18,375 -> 18,375,000 x 0.8 = 14,700,000
    assert await row_of(db, rid) == Row(14_700_000, 4_000, 200, 0, 3_000, 500)


@pytest.mark.parametrize("stream", [False, True])
async def test_two_web_searches_anthropic(golden: Setup, sdk: SDKs, stream: bool) -> None:
    """Two web searches reported in server_tool_use cost two per-call fees, discounted."""
    client, an, _, db = golden
    usage = {"input_tokens": 500, "output_tokens": 300,
             "server_tool_use": {"web_search_requests": 2}}  # fmt: skip
    an.then(anthropic_answer(usage, stream))
    tools: Any = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]
    rid, _ = await via_messages(client, sdk, "claude-g", stream, tools=tools)
    # 500 x 3 + 300 x 15 = 6,000 -> 6,000,000; + 2 x 0.01 units = 20,000,000; x 0.8
    assert await row_of(db, rid) == Row(20_800_000, 500, 300, tool_calls=2)


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_cached_and_cache_write(golden: Setup, sdk: SDKs, stream: bool) -> None:
    """A Responses answer's cached and cache-write tokens are priced apart from plain input."""
    client, _, oa, db = golden
    usage = {
        "input_tokens": 10_000, "output_tokens": 500, "total_tokens": 10_500,
        "input_tokens_details": {"cached_tokens": 6_000, "cache_write_tokens": 2_000},
        "output_tokens_details": {"reasoning_tokens": 200},
    }  # fmt: skip
    oa.then(responses_answer(usage, stream, []))
    rid, seen = await via_responses(client, sdk, "gpt-g", stream)
    assert seen.input_tokens_details.cached_tokens == 6_000
    # 2,000 x 2 + 6,000 x 0.50 + 2,000 x 2.50 + 500 x 8 = 16,000 -> 16,000,000 x 0.8
    assert await row_of(db, rid) == Row(12_800_000, 10_000, 500, 6_000, 2_000)


@pytest.mark.parametrize("stream", [False, True])
async def test_two_web_searches_responses(golden: Setup, sdk: SDKs, stream: bool) -> None:
    """Two web_search_call output items cost two per-call fees."""
    client, _, oa, db = golden
    usage = {"input_tokens": 100, "output_tokens": 50, "total_tokens": 150,
             "input_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    calls = [{"type": "web_search_call", "id": f"ws_{i}", "status": "completed"} for i in (1, 2)]
    oa.then(responses_answer(usage, stream, calls))
    rid, _ = await via_responses(client, sdk, "gpt-g", stream, tools=[{"type": "web_search"}])
    # 100 x 2 + 50 x 8 = 600 -> 600,000; + 20,000,000; x 0.8 = 16,480,000
    assert await row_of(db, rid) == Row(16_480_000, 100, 50, tool_calls=2)


DEEPSEEK = {
    "prompt_tokens": 1_000, "completion_tokens": 50, "total_tokens": 1_050,
    "prompt_cache_hit_tokens": 800, "prompt_cache_miss_tokens": 200,
}  # fmt: skip
# 200 x 0.28 + 800 x 0.028 + 50 x 0.42 = 56 + 22.4 + 21 = 99.4 -> 99,400 x 0.8 = 79,520
DEEPSEEK_ROW = Row(79_520, 1_000, 50, 800)


@pytest.mark.parametrize("stream", [False, True])
async def test_deepseek_hits_and_misses_native(golden: Setup, sdk: SDKs, stream: bool) -> None:
    """DeepSeek cache hits are cache reads, billed at cached_input, not as full input."""
    client, _, oa, db = golden
    oa.then(chat_answer(DEEPSEEK, stream))
    rid, _ = await via_chat(client, sdk, "deepseek-g", stream)
    assert await row_of(db, rid) == DEEPSEEK_ROW


@pytest.mark.parametrize("stream", [False, True])
async def test_deepseek_hits_and_misses_translated(golden: Setup, sdk: SDKs, stream: bool) -> None:
    """Translated to an Anthropic client, the hits arrive as cache_read_input_tokens."""
    client, _, oa, db = golden
    oa.then(chat_answer(DEEPSEEK, stream))
    rid, usage = await via_messages(client, sdk, "deepseek-g", stream)
    assert usage.cache_read_input_tokens == 800
    assert await row_of(db, rid) == DEEPSEEK_ROW


@pytest.mark.parametrize("stream", [False, True])
async def test_long_context_over_the_threshold(golden: Setup, sdk: SDKs, stream: bool) -> None:
    """A 120,000-token prompt passes 100,000: every token takes the long-context rates."""
    client, _, oa, db = golden
    usage = {"prompt_tokens": 120_000, "completion_tokens": 1_000, "total_tokens": 121_000,
             "prompt_tokens_details": {"cached_tokens": 20_000}}  # fmt: skip
    oa.then(chat_answer(usage, stream))
    rid, _ = await via_chat(client, sdk, "gpt-g", stream)
    # 100,000 x 4 + 20,000 x 1 + 1,000 x 12 = 432,000 -> 432,000,000 x 0.8 = 345,600,000
    assert await row_of(db, rid) == Row(345_600_000, 120_000, 1_000, 20_000)


@pytest.mark.parametrize("stream", [False, True])
async def test_priority_answer(golden: Setup, sdk: SDKs, stream: bool) -> None:
    """An answer served at the priority tier is billed at the tier's rates and says so."""
    client, _, oa, db = golden
    usage = {"prompt_tokens": 1_000, "completion_tokens": 100, "total_tokens": 1_100,
             "prompt_tokens_details": {"cached_tokens": 400}}  # fmt: skip
    oa.then(chat_answer(usage, stream, tier="priority"))
    rid, _ = await via_chat(client, sdk, "gpt-g", stream, service_tier="priority")
    assert oa.seen[-1].body["service_tier"] == "priority"
    # 600 x 3.50 + 400 x 0.875 + 100 x 14 = 3,850 -> 3,850,000 x 0.8 = 3,080,000
    assert await row_of(db, rid) == Row(3_080_000, 1_000, 100, 400, service_tier="priority")


@pytest.mark.parametrize(
    ("dialect", "extra", "field"),
    [
        ("anthropic", {"speed": "fast"}, "speed"),
        ("anthropic", {"tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}]},
         "tools[0].type"),
        ("openai", {"service_tier": "flex"}, "service_tier"),
        ("openai", {"web_search_options": {}}, "web_search_options"),
    ],
)  # fmt: skip
async def test_unpriced_tier_or_tool_is_refused_before_any_upstream_call(
    golden: Setup, dialect: str, extra: dict[str, Any], field: str
) -> None:
    """A tier or paid tool the model's price lacks: 400 in the caller's format, naming the field."""
    client, an, oa, db = golden
    if dialect == "anthropic":
        body = {"model": "claude-g", "max_tokens": 10, "messages": USER, **extra}
        resp = await client.post(
            "/v1/messages",
            json=body,
            headers={"x-api-key": "sk-test-alpha-0123456789", "anthropic-version": "2023-06-01"},
        )
    else:
        body = {"model": "deepseek-g", "messages": USER, **extra}
        resp = await client.post(
            "/v1/chat/completions",
            json=body,
            headers={"Authorization": "Bearer sk-test-alpha-0123456789"},
        )
    err = await resp.json()
    assert resp.status == 400
    assert resp.headers["x-should-retry"] == "false"
    if dialect == "anthropic":
        assert err["type"] == "error"
        assert err["error"]["type"] == "invalid_request_error"
        assert err["error"]["message"].startswith(f"{field}: ")
    else:
        assert err["error"]["param"] == field
    assert an.seen == []
    assert oa.seen == []
    row = await row_of(db, resp.headers["x-request-id"])
    assert row.cost_nanos == 0
    assert row.prompt_tokens == 0
