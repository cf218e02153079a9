"""Translated requests and responses are accepted by the real `openai` and `anthropic` SDKs.

A tiny aiohttp server plays "proxyd in front of a scripted upstream of the other protocol": it
translates the SDK's request, answers from the test's script through the translators, and the
SDK parses the result (streaming and not, with tool calls).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from proxyd.errors import ProxydError
from proxyd.protocol import anthropic as anthropic_wire
from proxyd.protocol import openai as openai_wire
from proxyd.protocol.translate import (
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
    UpstreamRequest,
    anthropic_error_to_openai,
    anthropic_message_to_openai,
    chat_request_to_messages,
    messages_request_to_chat,
    openai_completion_to_anthropic,
    openai_error_to_anthropic,
    stream_include_usage,
)

WEATHER_TOOL_OPENAI: Any = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
WEATHER_TOOL_ANTHROPIC: Any = {
    "name": "weather",
    "description": "Weather for a city",
    "input_schema": WEATHER_TOOL_OPENAI["function"]["parameters"],
}


@dataclass
class Script:
    """What the scripted upstream answers, and what proxyd would have sent it."""

    status: int = 200
    body: bytes = b""
    events: list[bytes] = field(default_factory=list)
    sent: list[UpstreamRequest] = field(default_factory=list)


SCRIPT = web.AppKey("script", Script)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI endpoint in front of an Anthropic upstream."""
    script = request.app[SCRIPT]
    body = await request.json(loads=orjson.loads)
    try:
        upstream = chat_request_to_messages(body, upstream_model="claude-up", default_max_tokens=64)
    except ProxydError as err:
        return web.Response(
            status=err.status, body=openai_wire.error_body(err), content_type="application/json"
        )
    script.sent.append(upstream)
    if script.status != 200:
        raw = anthropic_error_to_openai(script.status, script.body)
        return web.Response(status=script.status, body=raw, content_type="application/json")
    if not upstream.stream:
        raw, _ = anthropic_message_to_openai(script.body, model=body["model"], created=1700000000)
        return web.Response(body=raw, content_type="application/json")
    translator = AnthropicToOpenAIStream(
        model=body["model"], created=1700000000, include_usage=stream_include_usage(body)
    )
    return await _stream(request, script.events, translator.feed, translator.finish)


async def messages(request: web.Request) -> web.StreamResponse:
    """Anthropic endpoint in front of an OpenAI upstream."""
    script = request.app[SCRIPT]
    body = await request.json(loads=orjson.loads)
    try:
        upstream = messages_request_to_chat(body, upstream_model="gpt-up")
    except ProxydError as err:
        return web.Response(
            status=err.status, body=anthropic_wire.error_body(err), content_type="application/json"
        )
    script.sent.append(upstream)
    if script.status != 200:
        raw = openai_error_to_anthropic(script.status, script.body)
        return web.Response(status=script.status, body=raw, content_type="application/json")
    if not upstream.stream:
        raw, _ = openai_completion_to_anthropic(script.body, model=body["model"])
        return web.Response(body=raw, content_type="application/json")
    translator = OpenAIToAnthropicStream(model=body["model"])
    return await _stream(request, script.events, translator.feed, translator.finish)


async def _stream(
    request: web.Request, events: list[bytes], feed: Any, finish: Any
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for event in events:
        for out in feed(event):
            await response.write(out)
    for out in finish():
        await response.write(out)
    await response.write_eof()
    return response


@pytest.fixture
async def relay(aiohttp_server: AiohttpServer) -> tuple[str, Script]:
    """The translating test server's root URL and its upstream script."""
    app = web.Application()
    script = Script()
    app[SCRIPT] = script
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/messages", messages)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), script


# Scripted Anthropic upstream ---------------------------------------------------------------


def a_event(body: dict[str, Any]) -> bytes:
    return f"event: {body['type']}\n".encode() + b"data: " + orjson.dumps(body) + b"\n\n"


def a_delta(index: int, delta: dict[str, Any]) -> bytes:
    return a_event({"type": "content_block_delta", "index": index, "delta": delta})


def anthropic_tool_stream() -> list[bytes]:
    usage = {"input_tokens": 30, "output_tokens": 1, "cache_read_input_tokens": 10}
    start: dict[str, Any] = {"id": "msg_s", "type": "message", "role": "assistant"}
    start |= {"model": "claude-up", "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = usage
    text = {"type": "text", "text": ""}
    tool = {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}
    end = {"stop_reason": "tool_use", "stop_sequence": None}
    return [
        a_event({"type": "message_start", "message": start}),
        a_event({"type": "ping"}),
        a_event({"type": "content_block_start", "index": 0, "content_block": text}),
        a_delta(0, {"type": "text_delta", "text": "Let me "}),
        a_delta(0, {"type": "text_delta", "text": "check."}),
        a_event({"type": "content_block_stop", "index": 0}),
        a_event({"type": "content_block_start", "index": 1, "content_block": tool}),
        a_delta(1, {"type": "input_json_delta", "partial_json": ""}),
        a_delta(1, {"type": "input_json_delta", "partial_json": '{"ci'}),
        a_delta(1, {"type": "input_json_delta", "partial_json": 'ty": "Paris"}'}),
        a_event({"type": "content_block_stop", "index": 1}),
        a_event({"type": "message_delta", "delta": end, "usage": {"output_tokens": 21}}),
        a_event({"type": "message_stop"}),
    ]


ANTHROPIC_TOOL_MESSAGE = orjson.dumps(
    {
        "id": "msg_n",
        "type": "message",
        "role": "assistant",
        "model": "claude-up",
        "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Rome"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 8, "cache_read_input_tokens": 4},
    }
)


async def test_openai_sdk_reads_translated_tool_call(relay: tuple[str, Script]) -> None:
    """openai SDK (non-stream) gets content, a parsed tool call, tool_calls finish and usage."""
    root, script = relay
    script.body = ANTHROPIC_TOOL_MESSAGE
    async with openai.AsyncOpenAI(base_url=root + "/v1", api_key="k", max_retries=0) as client:
        completion = await client.chat.completions.create(
            model="claude-alias",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Rome?"},
            ],
            tools=[WEATHER_TOOL_OPENAI],
            tool_choice="auto",
        )
    choice = completion.choices[0]
    assert completion.model == "claude-alias"
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    call = choice.message.tool_calls[0] if choice.message.tool_calls else None
    assert call is not None
    assert call.type == "function"
    assert call.id == "toolu_2"
    assert call.function.name == "weather"
    assert orjson.loads(call.function.arguments) == {"city": "Rome"}
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 16
    assert completion.usage.completion_tokens == 8
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 4
    sent = script.sent[0].body
    assert sent["system"] == "Be brief."
    assert sent["tools"][0]["name"] == "weather"
    assert sent["tool_choice"] == {"type": "auto"}


async def test_openai_sdk_streams_translated_tool_call(relay: tuple[str, Script]) -> None:
    """openai SDK's stream helper accumulates text, the tool call and the usage chunk."""
    root, script = relay
    script.events = anthropic_tool_stream()
    client = openai.AsyncOpenAI(base_url=root + "/v1", api_key="k", max_retries=0)
    async with (
        client,
        client.chat.completions.stream(
            model="claude-alias",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_TOOL_OPENAI],
            stream_options={"include_usage": True},
        ) as stream,
    ):
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.message.content == "Let me check."
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name) for c in calls] == [("toolu_1", "weather")]
    assert orjson.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (40, 21)
    assert script.sent[0].body["stream"] is True


async def test_openai_sdk_raw_stream_and_multi_turn_tool_result(relay: tuple[str, Script]) -> None:
    """A raw SDK stream yields role, content and finish chunks; tool results reach the upstream."""
    root, script = relay
    script.events = anthropic_tool_stream()
    async with openai.AsyncOpenAI(base_url=root + "/v1", api_key="k", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="claude-alias",
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "toolu_0",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "toolu_0", "content": "18C, sunny"},
            ],
            tools=[WEATHER_TOOL_OPENAI],
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Let me check."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.usage is None for c in chunks)
    sent = script.sent[0].body["messages"]
    assert sent[1]["content"][0]["type"] == "tool_use"
    assert sent[2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_0", "content": "18C, sunny"}],
    }


async def test_openai_sdk_raises_on_translated_errors(relay: tuple[str, Script]) -> None:
    """Upstream 429, a mid-stream error event and an untranslatable request raise SDK errors."""
    root, script = relay
    async with openai.AsyncOpenAI(base_url=root + "/v1", api_key="k", max_retries=0) as client:
        script.status = 429
        script.body = orjson.dumps(
            {"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down"}}
        )
        with pytest.raises(openai.RateLimitError, match="Slow down"):
            await client.chat.completions.create(
                model="claude-alias", messages=[{"role": "user", "content": "hi"}]
            )
        script.status = 200
        overloaded = {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "Overloaded"},
        }
        script.events = [*anthropic_tool_stream()[:4], a_event(overloaded)]
        stream = await client.chat.completions.create(
            model="claude-alias", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError, match="Overloaded"):
            async for _ in stream:
                pass
        with pytest.raises(openai.BadRequestError, match="More than one choice"):
            await client.chat.completions.create(
                model="claude-alias", messages=[{"role": "user", "content": "hi"}], n=2
            )


# Scripted OpenAI upstream ------------------------------------------------------------------


def o_chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1, "model": "gpt-up"}
    return b"data: " + orjson.dumps({**body, "choices": choices, **extra}) + b"\n\n"


def openai_tool_stream() -> list[bytes]:
    call = {
        "index": 0,
        "id": "call_7",
        "type": "function",
        "function": {"name": "weather", "arguments": ""},
    }
    usage = {
        "prompt_tokens": 50,
        "completion_tokens": 17,
        "total_tokens": 67,
        "prompt_tokens_details": {"cached_tokens": 20},
    }
    return [
        o_chunk({"role": "assistant", "content": ""}),
        o_chunk({"content": "Let me "}),
        o_chunk({"content": "check."}),
        o_chunk({"tool_calls": [call]}),
        o_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        o_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
        o_chunk({}, "tool_calls"),
        o_chunk(None, usage=usage),
        b"data: [DONE]\n\n",
    ]


OPENAI_TOOL_COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-n",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-up",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me check.",
                    "tool_calls": [
                        {
                            "id": "call_8",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Lima"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39},
    }
)


async def test_anthropic_sdk_reads_translated_tool_use(relay: tuple[str, Script]) -> None:
    """anthropic SDK (non-stream) gets text and tool_use blocks, tool_use stop and usage."""
    root, script = relay
    script.body = OPENAI_TOOL_COMPLETION
    async with anthropic.AsyncAnthropic(base_url=root, api_key="k", max_retries=0) as client:
        message = await client.messages.create(
            model="claude-alias",
            max_tokens=100,
            system="Be brief.",
            messages=[{"role": "user", "content": "Weather in Lima?"}],
            tools=[WEATHER_TOOL_ANTHROPIC],
            tool_choice={"type": "any"},
            metadata={"user_id": "u-7"},
        )
    assert message.model == "claude-alias"
    assert message.stop_reason == "tool_use"
    assert message.content[0].type == "text"
    assert message.content[0].text == "Let me check."
    block = message.content[1]
    assert block.type == "tool_use"
    assert (block.id, block.name, block.input) == ("call_8", "weather", {"city": "Lima"})
    assert (message.usage.input_tokens, message.usage.output_tokens) == (30, 9)
    sent = script.sent[0].body
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["tool_choice"] == "required"
    assert sent["user"] == "u-7"


async def test_anthropic_sdk_streams_translated_tool_use(relay: tuple[str, Script]) -> None:
    """anthropic SDK's stream helper accumulates text, tool input JSON, stop reason and usage."""
    root, script = relay
    script.events = openai_tool_stream()
    client = anthropic.AsyncAnthropic(base_url=root, api_key="k", max_retries=0)
    async with (
        client,
        client.messages.stream(
            model="claude-alias",
            max_tokens=100,
            messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=[WEATHER_TOOL_ANTHROPIC],
        ) as stream,
    ):
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Let me check."
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use"]
    tool = final.content[1]
    assert tool.type == "tool_use"
    assert (tool.id, tool.name, tool.input) == ("call_7", "weather", {"city": "Oslo"})
    assert final.usage.input_tokens == 30
    assert final.usage.cache_read_input_tokens == 20
    assert final.usage.output_tokens == 17
    assert script.sent[0].body["stream_options"] == {"include_usage": True}


async def test_anthropic_sdk_tool_result_round_and_errors(relay: tuple[str, Script]) -> None:
    """Tool results reach the upstream as tool messages; errors raise the SDK's classes."""
    root, script = relay
    script.body = OPENAI_TOOL_COMPLETION
    async with anthropic.AsyncAnthropic(base_url=root, api_key="k", max_retries=0) as client:
        await client.messages.create(
            model="claude-alias",
            max_tokens=100,
            messages=[
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {
                            "type": "tool_use",
                            "id": "call_1",
                            "name": "weather",
                            "input": {"city": "Oslo"},
                        }
                    ],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "2C"}],
                },
            ],
            tools=[WEATHER_TOOL_ANTHROPIC],
        )
        assert script.sent[0].body["messages"][1:] == [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "2C"},
        ]
        script.status = 429
        script.body = orjson.dumps({"error": {"message": "Too many", "type": "requests"}})
        with pytest.raises(anthropic.RateLimitError, match="Too many"):
            await client.messages.create(
                model="claude-alias", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        script.status = 200
        broken = b'data: {"error": {"message": "upstream broke", "type": "server_error"}}\n\n'
        script.events = [*openai_tool_stream()[:2], broken]
        with pytest.raises(anthropic.APIStatusError, match="upstream broke"):
            async with client.messages.stream(
                model="claude-alias", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            ) as stream:
                await stream.get_final_message()
        with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):
            await client.messages.create(
                model="claude-alias",
                max_tokens=2048,
                messages=[{"role": "user", "content": "x"}],
                thinking={"type": "enabled", "budget_tokens": 100},
            )
