"""Anthropic messages request -> OpenAI chat-completions request."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxyd.errors import ErrorType, InvalidRequest
from proxyd.protocol.translate import messages_request_to_chat


def _translate(**body: Any) -> dict[str, Any]:
    body.setdefault("model", "claude-client")
    body.setdefault("max_tokens", 256)
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return messages_request_to_chat(body, upstream_model="gpt-up").body


def _refused(param: str, **body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        _translate(**body)
    assert caught.value.param == param
    return caught.value


def test_path_headers_stream_and_forced_usage() -> None:
    """The request goes to /chat/completions; a stream always asks for the usage chunk."""
    body = {"model": "c", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    request = messages_request_to_chat({**body, "stream": True}, upstream_model="gpt-up")
    assert request.path == "/chat/completions"
    assert request.stream is True
    assert orjson.loads(request.payload()) == {
        "model": "gpt-up",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    alt = messages_request_to_chat(
        body, upstream_model="o3", max_tokens_field="max_completion_tokens"
    )
    assert alt.body["max_completion_tokens"] == 10
    assert "max_tokens" not in alt.body


def test_system_string_and_blocks() -> None:
    """system becomes a leading system message (a string, or text parts for several blocks)."""
    assert _translate(system="be brief")["messages"][0] == {"role": "system", "content": "be brief"}
    blocks = [
        {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "b"},
    ]
    assert _translate(system=blocks)["messages"][0] == {
        "role": "system",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }


def test_tool_use_and_tool_result_blocks() -> None:
    """tool_use blocks become tool_calls; tool_result blocks become tool messages before text."""
    out = _translate(
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "checking"},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"c": "P"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {"type": "text", "text": "and tomorrow?"},
                ],
            },
        ]
    )
    assert out["messages"] == [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "checking",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"c":"P"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "and tomorrow?"},
    ]


def test_tool_result_error_flag_is_refused() -> None:
    """is_error has no OpenAI equivalent: 400 naming it, not a silently dropped flag."""
    result = {"type": "tool_result", "tool_use_id": "t", "content": "boom", "is_error": True}
    err = _refused(
        "messages[0].content[0].is_error", messages=[{"role": "user", "content": [result]}]
    )
    assert err.error_type is ErrorType.UNSUPPORTED_FEATURE


def test_images_map_to_image_url_parts() -> None:
    """base64 images become data: URLs, url images keep their URL."""
    out = _translate(
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://e.com/a.png"}},
                    {"type": "text", "text": "what?"},
                ],
            }
        ]
    )
    assert out["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
        {"type": "image_url", "image_url": {"url": "https://e.com/a.png"}},
        {"type": "text", "text": "what?"},
    ]


def test_tools_tool_choice_stop_and_metadata() -> None:
    """Tools, each tool_choice form, stop_sequences and metadata.user_id map over."""
    tool = {"name": "f", "description": "d", "input_schema": {"type": "object"}}
    out = _translate(
        tools=[tool],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["X"],
        metadata={"user_id": "u"},
        temperature=0.5,
        top_p=0.8,
    )
    assert out["tools"] == [
        {
            "type": "function",
            "function": {"name": "f", "description": "d", "parameters": {"type": "object"}},
        }
    ]
    assert out["tool_choice"] == "required"
    assert out["parallel_tool_calls"] is False
    assert out["stop"] == ["X"]
    assert out["user"] == "u"
    assert (out["temperature"], out["top_p"]) == (0.5, 0.8)
    assert _translate(tools=[tool], tool_choice={"type": "auto"})["tool_choice"] == "auto"
    assert _translate(tools=[tool], tool_choice={"type": "none"})["tool_choice"] == "none"
    assert _translate(tools=[tool], tool_choice={"type": "tool", "name": "f"})["tool_choice"] == {
        "type": "function",
        "function": {"name": "f"},
    }


def test_output_config_format_maps_to_response_format() -> None:
    """output_config.format json_schema becomes a strict json_schema response_format."""
    schema = {"type": "object", "properties": {}, "additionalProperties": False}
    out = _translate(output_config={"format": {"type": "json_schema", "schema": schema}})
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema, "strict": True},
    }


@pytest.mark.parametrize(
    ("param", "body"),
    [
        ("top_k", {"top_k": 5}),
        ("mcp_servers", {"mcp_servers": [{"type": "url", "url": "https://m", "name": "m"}]}),
        ("tools[0].type", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
        ("new_param", {"new_param": True}),
    ],
)
def test_features_without_equivalent_are_refused(param: str, body: dict[str, Any]) -> None:
    """Features with no OpenAI equivalent are a 400 UNSUPPORTED_FEATURE naming them."""
    err = _refused(param, **body)
    assert err.error_type is ErrorType.UNSUPPORTED_FEATURE


@pytest.mark.parametrize(
    ("extra", "effort"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "low"),
        ({"thinking": {"type": "enabled", "budget_tokens": 8000}}, "medium"),
        ({"thinking": {"type": "enabled", "budget_tokens": 31999}}, "high"),
        ({"thinking": {"type": "adaptive"}}, "medium"),
        ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}, "high"),
        ({"output_config": {"effort": "low"}}, "low"),
    ],
)
def test_thinking_becomes_reasoning_effort(extra: dict[str, Any], effort: str) -> None:
    """Anthropic thinking (budget or adaptive) and output_config.effort map to reasoning_effort."""
    assert _translate(**extra)["reasoning_effort"] == effort


@pytest.mark.parametrize(
    ("param", "extra"),
    [
        ("thinking.budget_tokens", {"thinking": {"type": "enabled", "budget_tokens": 100}}),
        ("thinking.type", {"thinking": {"type": "sometimes"}}),
        ("output_config.effort", {"output_config": {"effort": "extreme"}}),
    ],
)
def test_unmappable_thinking_is_a_400_naming_the_field(param: str, extra: dict[str, Any]) -> None:
    """A thinking setting with no faithful mapping is refused, naming the field."""
    _refused(param, **extra)


def test_disabled_thinking_and_harmless_params_are_accepted() -> None:
    """thinking disabled, cache hints and service_tier are accepted and not forwarded."""
    out = _translate(thinking={"type": "disabled"}, service_tier="auto")
    assert set(out) == {"model", "messages", "max_tokens"}


def test_missing_max_tokens_is_invalid() -> None:
    """max_tokens is required by the Anthropic format."""
    with pytest.raises(InvalidRequest) as caught:
        messages_request_to_chat(
            {"model": "c", "messages": [{"role": "user", "content": "x"}]}, upstream_model="g"
        )
    assert caught.value.param == "max_tokens"
    assert caught.value.error_type is ErrorType.INVALID_REQUEST


def test_prior_thinking_blocks_are_not_forwarded() -> None:
    """Earlier turns' thinking blocks are dropped, as Anthropic drops them from context."""
    out = _translate(
        messages=[
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "answer"},
                ],
            },
            {"role": "user", "content": "more"},
        ]
    )
    assert out["messages"][1] == {"role": "assistant", "content": "answer"}
