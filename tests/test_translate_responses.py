"""Whole (non-stream) responses and error bodies translated in both directions."""

from __future__ import annotations

import orjson
import pytest

from proxyd.errors import UpstreamFailure
from proxyd.protocol.translate import (
    anthropic_error_to_openai,
    anthropic_message_to_openai,
    openai_completion_to_anthropic,
    openai_error_to_anthropic,
)
from proxyd.protocol.translate.response_to_anthropic import chat_completion_to_message
from proxyd.protocol.translate.response_to_openai import message_to_chat_completion
from proxyd.protocol.usage import Usage

ANTHROPIC_MESSAGE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-up",
    "content": [
        {"type": "text", "text": "Let me look. "},
        {"type": "tool_use", "id": "toolu_9", "name": "weather", "input": {"city": "Paris"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 10,
        "output_tokens": 7,
        "cache_read_input_tokens": 30,
        "cache_creation_input_tokens": 5,
    },
}


def test_anthropic_message_to_chat_completion() -> None:
    """Text, tool calls (JSON string arguments), finish reason, usage and model name map over."""
    raw, usage = anthropic_message_to_openai(
        orjson.dumps(ANTHROPIC_MESSAGE), model="gpt-alias", created=17
    )
    body = orjson.loads(raw)
    assert body["object"] == "chat.completion"
    assert body["created"] == 17
    assert body["model"] == "gpt-alias"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me look. "
    assert choice["message"]["tool_calls"] == [
        {
            "id": "toolu_9",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    assert body["usage"]["prompt_tokens"] == 45
    assert body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == 52
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 30
    assert usage == Usage(45, 7, 30, cache_write_tokens=5)


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_stop_reason_mapping(stop_reason: str, finish_reason: str) -> None:
    """Each Anthropic stop_reason maps to its OpenAI finish_reason."""
    message = {**ANTHROPIC_MESSAGE, "content": [], "stop_reason": stop_reason}
    body, _ = message_to_chat_completion(message, model="m", created=0)
    assert body["choices"][0]["finish_reason"] == finish_reason
    assert body["choices"][0]["message"]["content"] is None


OPENAI_COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-up",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Rome"}'},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {
        "prompt_tokens": 50,
        "completion_tokens": 9,
        "total_tokens": 59,
        "prompt_tokens_details": {"cached_tokens": 20},
        "completion_tokens_details": {"reasoning_tokens": 4},
    },
}


def test_chat_completion_to_anthropic_message() -> None:
    """Text, tool_use (parsed input), stop reason, usage with cache reads and model name map."""
    raw, usage = openai_completion_to_anthropic(
        orjson.dumps(OPENAI_COMPLETION), model="claude-alias"
    )
    body = orjson.loads(raw)
    assert body["type"] == "message"
    assert body["model"] == "claude-alias"
    assert body["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Rome"}},
    ]
    assert body["stop_reason"] == "tool_use"
    assert body["usage"] == {
        "input_tokens": 30,
        "output_tokens": 9,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 20,
    }
    assert usage == Usage(50, 9, 20, 4)


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("content_filter", "refusal")],
)
def test_finish_reason_mapping(finish_reason: str, stop_reason: str) -> None:
    """Each OpenAI finish_reason maps to its Anthropic stop_reason."""
    completion = {
        "id": "x",
        "choices": [{"message": {"content": "a"}, "finish_reason": finish_reason}],
    }
    body, usage = chat_completion_to_message(completion, model="m")
    assert body["stop_reason"] == stop_reason
    assert usage is None


def test_broken_tool_arguments_from_upstream_are_a_502() -> None:
    """Upstream tool arguments that are not a JSON object cannot be an Anthropic input: 502."""
    completion = {
        "id": "x",
        "choices": [
            {
                "message": {
                    "content": None,
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": '{"a": '}}],
                },
                "finish_reason": "length",
            }
        ],
    }
    with pytest.raises(UpstreamFailure):
        chat_completion_to_message(completion, model="m")


def test_non_json_upstream_body_is_a_502() -> None:
    """A success body that is not JSON is an upstream failure, not a crash."""
    with pytest.raises(UpstreamFailure):
        anthropic_message_to_openai(b"<html>", model="m", created=0)
    with pytest.raises(UpstreamFailure):
        openai_completion_to_anthropic(b"[]", model="m")


def test_anthropic_error_to_openai() -> None:
    """An Anthropic error keeps its message; its type becomes the code."""
    raw = orjson.dumps(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    assert orjson.loads(anthropic_error_to_openai(529, raw)) == {
        "error": {
            "message": "Overloaded",
            "type": "server_error",
            "param": None,
            "code": "overloaded_error",
        }
    }
    fallback = orjson.loads(anthropic_error_to_openai(502, b"bad gateway"))
    assert fallback["error"]["type"] == "server_error"
    assert "502" in fallback["error"]["message"]


def test_openai_error_to_anthropic() -> None:
    """An OpenAI error keeps its message; the status picks the Anthropic error type."""
    raw = orjson.dumps(
        {"error": {"message": "Rate limit", "type": "requests", "code": "rate_limit_exceeded"}}
    )
    assert orjson.loads(openai_error_to_anthropic(429, raw)) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Rate limit"},
    }
    quota = orjson.dumps({"error": {"message": "q", "type": "insufficient_quota"}})
    assert orjson.loads(openai_error_to_anthropic(429, quota))["error"]["type"] == "billing_error"
    assert orjson.loads(openai_error_to_anthropic(500, b""))["error"]["type"] == "api_error"
