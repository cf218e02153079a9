"""OpenAI chat.completion.chunk stream -> Anthropic SSE stream, fed one event at a time."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from proxyd.protocol.translate import OpenAIToAnthropicStream
from proxyd.protocol.usage import Usage

DONE = b"data: [DONE]\n\n"


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    """One upstream OpenAI SSE event as it arrives on the wire."""
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "gpt-up",
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def usage_chunk(prompt: int = 20, completion: int = 6, cached: int = 4) -> bytes:
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    return chunk(None, usage=usage)


def tool_delta(
    index: int, arguments: str, tool_id: str | None = None, name: str | None = None
) -> bytes:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if tool_id is not None:
        call["id"] = tool_id
        call["type"] = "function"
        call["function"]["name"] = name
    return chunk({"tool_calls": [call]})


def run(events: list[bytes]) -> tuple[list[tuple[str, Any]], OpenAIToAnthropicStream]:
    translator = OpenAIToAnthropicStream(model="claude-alias")
    out: list[bytes] = []
    for event in events:
        out.extend(translator.feed(event))
    out.extend(translator.finish())
    return [parse(item) for item in out], translator


def parse(item: bytes) -> tuple[str, Any]:
    """(event name, data JSON) of one client event, checking that both lines are there."""
    assert item.endswith(b"\n\n")
    event_line, data_line = item[:-2].split(b"\n")
    assert event_line.startswith(b"event: ")
    assert data_line.startswith(b"data: ")
    name = event_line[7:].decode()
    data = orjson.loads(data_line[6:])
    assert data["type"] == name
    return name, data


def test_text_stream_sequence() -> None:
    """message_start, one text block with its deltas, message_delta with usage, message_stop."""
    events = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({}, "stop"),
        usage_chunk(),
        DONE,
    ]
    out, translator = run(events)
    assert [name for name, _ in out] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert out[0][1]["message"]["model"] == "claude-alias"
    assert out[0][1]["message"]["id"] == "chatcmpl-1"
    assert out[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert [d["delta"]["text"] for _, d in out[2:4]] == ["Hel", "lo"]
    assert out[5][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert out[5][1]["usage"] == {
        "input_tokens": 16,
        "output_tokens": 6,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
    }
    assert translator.completed
    assert translator.usage == Usage(20, 6, 4)


def test_text_then_parallel_tool_calls_get_their_own_blocks() -> None:
    """Text at index 0, each tool call its own tool_use block with input_json_delta fragments."""
    events = [
        chunk({"role": "assistant", "content": "Let me check."}),
        tool_delta(0, "", "call_a", "weather"),
        tool_delta(0, '{"city":'),
        tool_delta(0, '"Paris"}'),
        tool_delta(1, '{"tz":"CET"}', "call_b", "time"),
        chunk({}, "tool_calls"),
        usage_chunk(),
        DONE,
    ]
    out, _ = run(events)
    names = [name for name, _ in out]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert out[4][1] == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "call_a", "name": "weather", "input": {}},
    }
    assert out[5][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"city":'}
    assert out[8][1]["index"] == 2
    assert out[8][1]["content_block"]["id"] == "call_b"
    assert out[9][1] == {
        "type": "content_block_delta",
        "index": 2,
        "delta": {"type": "input_json_delta", "partial_json": '{"tz":"CET"}'},
    }
    assert out[10][1]["index"] == 2
    assert out[11][1]["delta"]["stop_reason"] == "tool_use"


def test_finish_reason_mapping() -> None:
    """length -> max_tokens, content_filter -> refusal, refusal text -> refusal."""
    for finish, expected in (("length", "max_tokens"), ("content_filter", "refusal")):
        out, _ = run([chunk({"content": "a"}, finish), DONE])
        assert out[-2][1]["delta"]["stop_reason"] == expected
    out, _ = run([chunk({"refusal": "I can't"}), chunk({}, "stop"), DONE])
    assert out[2][1]["delta"]["text"] == "I can't"
    assert out[-2][1]["delta"]["stop_reason"] == "refusal"


def test_missing_usage_is_reported_as_unknown() -> None:
    """Without a usage chunk the translator says so (None), so billing can estimate."""
    out, translator = run([chunk({"content": "a"}, "stop"), DONE])
    assert translator.usage is None
    assert out[-2][1]["usage"]["output_tokens"] == 0


def test_missing_done_is_closed_by_finish() -> None:
    """A provider that ends after the finish chunk without [DONE] still gets a clean end."""
    out, translator = run([chunk({"content": "a"}), chunk({}, "stop")])
    assert out[-1][0] == "message_stop"
    assert translator.completed


def test_truncated_stream_ends_with_error_event() -> None:
    """An upstream that ends before any finish reason ends the client stream with an error."""
    out, translator = run([chunk({"content": "partial"})])
    assert out[-1][0] == "error"
    assert out[-1][1]["error"]["type"] == "api_error"
    assert not translator.completed


def test_upstream_error_event() -> None:
    """An OpenAI error chunk becomes an Anthropic error event and ends the stream."""
    error = b'data: {"error": {"message": "server overloaded", "type": "server_error"}}\n\n'
    out, translator = run([chunk({"content": "a"}), error, DONE])
    assert out[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": "server overloaded"}},
    )
    assert translator.upstream_error == "server_error"


def test_interleaved_tool_calls_are_an_error_not_a_mixup() -> None:
    """Arguments for an already closed tool block end the stream with an error event."""
    events = [
        tool_delta(0, "{", "a", "f"),
        tool_delta(1, "{", "b", "g"),
        tool_delta(0, "}"),
    ]
    out, translator = run(events)
    assert out[-1][0] == "error"
    assert not translator.completed


@given(st.lists(st.text(min_size=1), min_size=1, max_size=8))
def test_arbitrary_text_survives(pieces: list[str]) -> None:
    """Any text, split any way, reaches the client unchanged in one text block."""
    out, _ = run([*(chunk({"content": p}) for p in pieces), chunk({}, "stop"), DONE])
    text = "".join(d["delta"]["text"] for name, d in out if name == "content_block_delta")
    assert text == "".join(pieces)
    assert {d["index"] for name, d in out if name == "content_block_delta"} == {0}


@given(
    st.dictionaries(
        st.text(max_size=8), st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(), st.none())
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
    events = [tool_delta(0, fragments[0], "call_1", "f")]
    events += [tool_delta(0, f) for f in fragments[1:]]
    out, _ = run([*events, chunk({}, "tool_calls"), DONE])
    joined = "".join(d["delta"]["partial_json"] for name, d in out if name == "content_block_delta")
    assert orjson.loads(joined) == arguments
