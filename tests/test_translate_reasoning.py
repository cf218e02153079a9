"""Reasoning across protocols: reasoning_content becomes Anthropic thinking (stream and whole),
with a signature the client accepts, and Claude-style thinking reaches an OpenAI-style channel
as reasoning_effort; checked with the real anthropic SDK."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from proxyd.protocol.translate import openai_completion_to_anthropic
from proxyd.protocol.translate.reasoning import TRANSLATED_SIGNATURE
from tests.conftest import SDKs, StartProxy, StartServer, channel, make_config
from tests.conftest import server_url as url_of
from tests.fakes import FakeProvider, Step, chat_body
from tests.test_translate_stream_to_anthropic import DONE, chunk, run, tool_delta, usage_chunk


def _deepseek_stream() -> list[bytes]:
    return [
        chunk({"role": "assistant", "content": None, "reasoning_content": ""}),
        chunk({"reasoning_content": "Think"}),
        chunk({"reasoning_content": "ing."}),
        chunk({"content": "Answer"}),
        tool_delta(0, '{"a":', tool_id="call_1", name="f"),
        tool_delta(0, "1}"),
        chunk({}, "tool_calls"),
        usage_chunk(),
        DONE,
    ]


def test_reasoning_content_stream_becomes_a_signed_thinking_block() -> None:
    """Thinking block first (deltas, signature_delta, stop), then text and tool_use blocks."""
    out, translator = run(_deepseek_stream())
    names = [
        (n, d.get("index"), (d.get("delta") or d.get("content_block") or {}).get("type"))
        for n, d in out
    ]
    assert names[1:7] == [
        ("content_block_start", 0, "thinking"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "signature_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"),
    ]
    assert "".join(d["delta"]["thinking"] for _, d in out[2:4]) == "Thinking."
    assert out[4][1]["delta"]["signature"] == TRANSLATED_SIGNATURE
    assert translator.completed


def test_whole_reasoning_content_becomes_thinking() -> None:
    """A whole answer's reasoning_content is a thinking block before the text."""
    completion = {
        "id": "c1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "42", "reasoning_content": "Sum."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }
    body, _ = openai_completion_to_anthropic(orjson.dumps(completion), model="claude-alias")
    content = orjson.loads(body)["content"]
    assert content == [
        {"type": "thinking", "thinking": "Sum.", "signature": TRANSLATED_SIGNATURE},
        {"type": "text", "text": "42"},
    ]


async def test_anthropic_sdk_thinking_and_tools_on_an_openai_style_channel(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path, sdk: SDKs
) -> None:
    """The SDK streams thinking + tools from a DeepSeek-style channel; the next turn's thinking is
    dropped before that provider, and the budget went upstream as reasoning_effort."""
    fake = FakeProvider(Step(events=_deepseek_stream()))
    server = await start_server(fake.app())
    chans = [channel("ds", url_of(server), models=["claude-alias"])]
    client, _ = await start_proxy(make_config(tmp_path, chans))
    anthropic = sdk.anthropic(client)
    tools: list[Any] = [{"name": "f", "input_schema": {"type": "object"}}]
    async with anthropic.messages.stream(
        model="claude-alias",
        max_tokens=20000,
        thinking={"type": "enabled", "budget_tokens": 16000},
        tools=tools,
        messages=[{"role": "user", "content": "Use f."}],
    ) as stream:
        message = await stream.get_final_message()
    kinds = [b.type for b in message.content]
    assert kinds == ["thinking", "text", "tool_use"]
    assert message.content[0].thinking == "Thinking."
    assert message.content[0].signature == TRANSLATED_SIGNATURE
    assert fake.seen[0].body["reasoning_effort"] == "medium"

    fake.default = Step(body=chat_body("done"))
    history: list[Any] = [
        {"role": "user", "content": "Use f."},
        {"role": "assistant", "content": [b.model_dump() for b in message.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "ok"}],
        },
    ]
    again = await anthropic.messages.create(
        model="claude-alias",
        max_tokens=20000,
        thinking={"type": "enabled", "budget_tokens": 16000},
        tools=tools,
        messages=history,
        stream=False,
    )
    assert again.content[0].type == "text"
    sent = fake.seen[1].body["messages"]
    assert all("reasoning_content" not in m for m in sent)
    assert "Thinking." not in orjson.dumps(sent).decode()


def test_anthropic_thinking_reaches_openai_clients_as_reasoning_content() -> None:
    """Thinking from an Anthropic channel: reasoning_content in the chunk deltas and the message."""
    from proxyd.protocol.translate import AnthropicToOpenAIStream, anthropic_message_to_openai
    from tests.fakes import named

    translator = AnthropicToOpenAIStream(model="gpt-alias", created=1, include_usage=False)
    start = {
        "type": "message_start",
        "message": {"id": "m", "model": "c", "usage": {"input_tokens": 3, "output_tokens": 1}},
    }
    out: list[bytes] = []
    for event in [
        named("message_start", start),
        named(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}},
        ),
        named(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "Hm."},
            },
        ),
        named(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": "s"},
            },
        ),
    ]:
        out.extend(translator.feed(event))
    deltas = [orjson.loads(e[6:])["choices"][0]["delta"] for e in out if e.startswith(b"data: {")]
    assert {"reasoning_content": "Hm."} in deltas
    message = {
        "id": "m",
        "type": "message",
        "role": "assistant",
        "model": "c",
        "content": [
            {"type": "thinking", "thinking": "Because.", "signature": "s"},
            {"type": "text", "text": "Yes."},
        ],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }
    body, _ = anthropic_message_to_openai(orjson.dumps(message), model="gpt-alias", created=1)
    reply = orjson.loads(body)["choices"][0]["message"]
    assert reply["reasoning_content"] == "Because."
    assert reply["content"] == "Yes."
