"""Anthropic SSE stream -> OpenAI chat.completion.chunk stream, fed one event at a time."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from proxyd.protocol.translate import AnthropicToOpenAIStream
from proxyd.protocol.usage import Usage


def ev(name: str, body: dict[str, Any]) -> bytes:
    """One upstream Anthropic SSE event as it arrives on the wire."""
    return f"event: {name}\n".encode() + b"data: " + orjson.dumps(body) + b"\n\n"


def message_start(input_tokens: int = 12, cached: int = 0) -> bytes:
    usage = {"input_tokens": input_tokens, "output_tokens": 1, "cache_read_input_tokens": cached}
    message: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-up",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    return ev("message_start", {"type": "message_start", "message": message})


def text_block(index: int, pieces: list[str]) -> list[bytes]:
    start = {
        "type": "content_block_start",
        "index": index,
        "content_block": {"type": "text", "text": ""},
    }
    deltas = [
        ev(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "text_delta", "text": p},
            },
        )
        for p in pieces
    ]
    return [ev("content_block_start", start), *deltas, stop_block(index)]


def tool_block(index: int, tool_id: str, name: str, fragments: list[str]) -> list[bytes]:
    block = {"type": "tool_use", "id": tool_id, "name": name, "input": {}}
    start = {"type": "content_block_start", "index": index, "content_block": block}
    deltas = [
        ev(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": f},
            },
        )
        for f in fragments
    ]
    return [ev("content_block_start", start), *deltas, stop_block(index)]


def stop_block(index: int) -> bytes:
    return ev("content_block_stop", {"type": "content_block_stop", "index": index})


def message_end(stop_reason: str = "end_turn", output_tokens: int = 5) -> list[bytes]:
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": output_tokens},
    }
    return [ev("message_delta", delta), ev("message_stop", {"type": "message_stop"})]


def run(
    events: list[bytes], include_usage: bool = False
) -> tuple[list[bytes], AnthropicToOpenAIStream]:
    translator = AnthropicToOpenAIStream(model="gpt-alias", created=99, include_usage=include_usage)
    out: list[bytes] = []
    for event in events:
        out.extend(translator.feed(event))
    out.extend(translator.finish())
    return out, translator


def payloads(out: list[bytes]) -> list[Any]:
    """Each client event's JSON (or the [DONE] marker), checking the SSE framing."""
    result = []
    for item in out:
        assert item.startswith(b"data: ")
        assert item.endswith(b"\n\n")
        body = item[6:-2]
        result.append("[DONE]" if body == b"[DONE]" else orjson.loads(body))
    return result


def test_text_stream_sequence() -> None:
    """Role chunk first, then each text delta, the finish chunk and [DONE]; ping dropped."""
    events = [
        message_start(),
        ev("ping", {"type": "ping"}),
        *text_block(0, ["Hel", "lo"]),
        *message_end(),
    ]
    out, translator = run(events)
    chunks = payloads(out)
    assert chunks[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for chunk in chunks[:-1]:
        assert chunk["id"] == "msg_1"
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["created"] == 99
        assert chunk["model"] == "gpt-alias"
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["Hel", "lo"]
    assert chunks[3]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert len(chunks) == 5
    assert translator.completed
    assert translator.usage == Usage(12, 5, 0)


def test_usage_chunk_when_asked() -> None:
    """include_usage adds a choices-less usage chunk before [DONE], cached tokens included."""
    out, translator = run(
        [message_start(8, cached=100), *text_block(0, ["x"]), *message_end()], True
    )
    chunks = payloads(out)
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["choices"] == []
    assert chunks[-2]["usage"]["prompt_tokens"] == 108
    assert chunks[-2]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["usage"]["total_tokens"] == 113
    assert chunks[-2]["usage"]["prompt_tokens_details"] == {"cached_tokens": 100}
    assert translator.usage == Usage(108, 5, 100)


def test_tool_call_stream() -> None:
    """Text then two tool calls: ids, names, indexes 0 and 1, fragments, tool_calls finish."""
    events = [
        message_start(),
        *text_block(0, ["Checking."]),
        *tool_block(1, "toolu_a", "weather", ["", '{"city":', ' "Paris"}']),
        *tool_block(2, "toolu_b", "time", ["{}"]),
        *message_end("tool_use"),
    ]
    chunks = payloads(run(events)[0])
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks[:-1]
        if "tool_calls" in c["choices"][0]["delta"]
    ]
    assert calls[0] == {
        "index": 0,
        "id": "toolu_a",
        "type": "function",
        "function": {"name": "weather", "arguments": ""},
    }
    assert calls[1] == {"index": 0, "function": {"arguments": '{"city":'}}
    assert calls[2] == {"index": 0, "function": {"arguments": ' "Paris"}'}}
    assert calls[3]["index"] == 1
    assert calls[3]["id"] == "toolu_b"
    assert calls[4] == {"index": 1, "function": {"arguments": "{}"}}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_max_tokens_and_refusal_finish_reasons() -> None:
    """max_tokens ends with length, refusal with content_filter."""
    for stop_reason, finish in (("max_tokens", "length"), ("refusal", "content_filter")):
        chunks = payloads(run([message_start(), *message_end(stop_reason)])[0])
        assert chunks[-2]["choices"][0]["finish_reason"] == finish


def test_error_event_becomes_openai_error() -> None:
    """An Anthropic error event ends the stream with an OpenAI-style error event."""
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    out, translator = run([message_start(), *text_block(0, ["a"])[:2], ev("error", error)])
    last = payloads(out)[-1]
    assert last == {
        "error": {
            "message": "Overloaded",
            "type": "server_error",
            "param": None,
            "code": "overloaded_error",
        }
    }
    assert translator.upstream_error == "overloaded_error"
    assert not translator.completed


def test_truncated_stream_ends_with_error() -> None:
    """An upstream body that ends before message_stop gives an error event, not a fake [DONE]."""
    out, translator = run([message_start(), *text_block(0, ["partial"])])
    chunks = payloads(out)
    assert "error" in chunks[-1]
    assert "[DONE]" not in chunks
    assert not translator.completed
    assert translator.usage == Usage(12, 1, 0)


def test_crlf_and_comment_events() -> None:
    """CRLF line endings are read; comment-only events yield nothing."""
    translator = AnthropicToOpenAIStream(model="m", created=0, include_usage=False)
    assert translator.feed(b": keep-alive\n\n") == []
    out = translator.feed(message_start().replace(b"\n", b"\r\n"))
    assert payloads(out)[0]["choices"][0]["delta"]["role"] == "assistant"


@given(st.lists(st.text(min_size=1), min_size=1, max_size=8))
def test_arbitrary_text_survives(pieces: list[str]) -> None:
    """Any text, split any way into deltas, reaches the client unchanged and in order."""
    chunks = payloads(run([message_start(), *text_block(0, pieces), *message_end()])[0])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == "".join(pieces)


@given(
    st.dictionaries(
        st.text(max_size=8), st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(), st.booleans())
    ),
    st.data(),
)
def test_arbitrary_argument_splits_reassemble(
    arguments: dict[str, Any], data: st.DataObject
) -> None:
    """Tool-argument JSON split at arbitrary points reassembles to the same object."""
    encoded = orjson.dumps(arguments).decode()
    cuts = sorted(data.draw(st.sets(st.integers(0, len(encoded)), max_size=6)))
    bounds = [0, *cuts, len(encoded)]
    fragments = [encoded[a:b] for a, b in itertools.pairwise(bounds)]
    events = [message_start(), *tool_block(0, "toolu_x", "f", fragments), *message_end("tool_use")]
    chunks = payloads(run(events)[0])
    joined = "".join(
        c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
        for c in chunks[:-1]
        if "tool_calls" in c["choices"][0]["delta"]
    )
    assert orjson.loads(joined) == arguments
