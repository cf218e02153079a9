"""Property tests: content survives a translation there and back, whatever it holds."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from proxyd.protocol.translate import chat_request_to_messages, messages_request_to_chat
from proxyd.protocol.translate.response_to_anthropic import chat_completion_to_message
from proxyd.protocol.translate.response_to_openai import message_to_chat_completion

texts = st.text(min_size=1)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
arguments = st.dictionaries(st.text(max_size=8), json_values, max_size=4)


@given(st.lists(texts, min_size=1, max_size=6), st.one_of(st.none(), texts))
def test_chat_messages_survive_a_round_trip(turns: list[str], system: str | None) -> None:
    """System prompt and alternating user/assistant text come back unchanged."""
    messages: list[dict[str, Any]] = (
        [] if system is None else [{"role": "system", "content": system}]
    )
    messages += [
        {"role": "user" if i % 2 == 0 else "assistant", "content": text}
        for i, text in enumerate(turns)
    ]
    there = chat_request_to_messages(
        {"model": "m", "messages": messages}, upstream_model="c", default_max_tokens=10
    )
    back = messages_request_to_chat(there.body, upstream_model="g")
    assert back.body["messages"] == messages


@given(arguments, texts)
def test_tool_call_arguments_survive_a_round_trip(args: dict[str, Any], result: str) -> None:
    """Tool-call arguments (any JSON object) and tool results come back equal."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": orjson.dumps(args).decode()},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": result},
    ]
    there = chat_request_to_messages(
        {"model": "m", "messages": messages}, upstream_model="c", default_max_tokens=10
    )
    back = messages_request_to_chat(there.body, upstream_model="g").body["messages"]
    call = back[1]["tool_calls"][0]
    assert orjson.loads(call["function"]["arguments"]) == args
    assert back[2] == {"role": "tool", "tool_call_id": "call_1", "content": result}


@given(
    texts,
    st.lists(arguments, max_size=3),
    st.sampled_from(["end_turn", "max_tokens", "tool_use", "refusal"]),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
)
def test_responses_survive_a_round_trip(
    text: str, inputs: list[dict[str, Any]], stop: str, fresh: int, cached: int, output: int
) -> None:
    """Anthropic message -> chat.completion -> Anthropic message keeps text, tools, stop, usage."""
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}]
    blocks += [
        {"type": "tool_use", "id": f"toolu_{i}", "name": "f", "input": value}
        for i, value in enumerate(inputs)
    ]
    usage = {
        "input_tokens": fresh,
        "output_tokens": output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": blocks,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    }
    completion, _ = message_to_chat_completion(message, model="m", created=0)
    back, billed = chat_completion_to_message(completion, model="m")
    assert back == message
    assert billed is not None
    assert billed.prompt_tokens == fresh + cached
