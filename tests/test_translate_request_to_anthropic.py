"""OpenAI chat-completions request -> Anthropic messages request."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxyd.errors import ErrorType, InvalidRequest
from proxyd.protocol.translate import chat_request_to_messages, stream_include_usage


def _translate(**body: Any) -> dict[str, Any]:
    body.setdefault("model", "gpt-client")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    request = chat_request_to_messages(body, upstream_model="claude-up", default_max_tokens=4096)
    return request.body


def _refused(param: str, **body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        _translate(**body)
    assert caught.value.param == param
    assert caught.value.status == 400
    return caught.value


def test_path_headers_and_payload() -> None:
    """The request goes to /v1/messages with anthropic-version and serialises with orjson."""
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    request = chat_request_to_messages(body, upstream_model="claude-up", default_max_tokens=100)
    assert request.path == "/v1/messages"
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.stream is True
    assert orjson.loads(request.payload()) == {
        "model": "claude-up",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100,
        "stream": True,
    }


def test_system_and_developer_messages_become_system() -> None:
    """Leading system and developer messages become Anthropic's system blocks, in order."""
    out = _translate(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "use French"}]},
            {"role": "user", "content": "hi"},
        ]
    )
    assert out["system"] == [
        {"type": "text", "text": "be brief"},
        {"type": "text", "text": "use French"},
    ]
    assert out["messages"] == [{"role": "user", "content": "hi"}]
    single = _translate(
        messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    )
    assert single["system"] == "s"


def test_system_message_after_conversation_start_is_refused() -> None:
    """A system message in the middle has no Anthropic place: 400, not a silent move."""
    err = _refused(
        "messages[1].role",
        messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
    )
    assert err.error_type is ErrorType.UNSUPPORTED_FEATURE


def test_multi_turn_conversation_keeps_order() -> None:
    """User and assistant turns keep their order and text."""
    out = _translate(
        messages=[
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"},
        ]
    )
    assert out["messages"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ]


def test_tool_calls_and_results() -> None:
    """Assistant tool_calls become tool_use blocks; consecutive tool messages merge in one turn."""
    out = _translate(
        messages=[
            {"role": "user", "content": "weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [{"type": "text", "text": "rain"}],
            },
            {"role": "user", "content": "thanks"},
        ]
    )
    assert out["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}},
        ],
    }
    assert out["messages"][2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
            {
                "type": "tool_result",
                "tool_use_id": "call_2",
                "content": [{"type": "text", "text": "rain"}],
            },
            {"type": "text", "text": "thanks"},
        ],
    }
    assert len(out["messages"]) == 3


def test_assistant_text_before_tool_call() -> None:
    """Assistant text and tool calls in one message keep text first, then tool_use."""
    out = _translate(
        messages=[
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "let me check",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}
                ],
            },
        ]
    )
    assert out["messages"][1]["content"] == [
        {"type": "text", "text": "let me check"},
        {"type": "tool_use", "id": "c", "name": "f", "input": {}},
    ]


def test_bad_tool_arguments_are_refused() -> None:
    """Tool-call arguments that are not a JSON object give a 400 naming the field."""
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1, 2"}}
    _refused(
        "messages[1].tool_calls[0].function.arguments",
        messages=[
            {"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [call]},
        ],
    )


def test_images_data_url_and_http_url() -> None:
    """data: URLs become base64 image sources, http(s) URLs become url image sources."""
    out = _translate(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "compare"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                ],
            }
        ]
    )
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "compare"},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
    ]


def test_unsupported_image_type_and_audio_input_are_refused() -> None:
    """An image type Anthropic cannot read, and audio input, are 400s naming the part."""
    bmp = {"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AAAA"}}
    _refused("messages[0].content[0].image_url.url", messages=[{"role": "user", "content": [bmp]}])
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    _refused("messages[0].content[0]", messages=[{"role": "user", "content": [audio]}])


def test_pdf_file_part_becomes_document() -> None:
    """An inline PDF file part becomes a base64 document block."""
    part = {
        "type": "file",
        "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"},
    }
    out = _translate(messages=[{"role": "user", "content": [part]}])
    assert out["messages"][0]["content"] == [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
        }
    ]


def test_tools_and_tool_choice() -> None:
    """Function tools map to input_schema tools; each tool_choice form maps to its equivalent."""
    tool = {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Get the weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": True,
        },
    }
    out = _translate(tools=[tool], tool_choice="auto")
    assert out["tools"] == [
        {
            "name": "weather",
            "description": "Get the weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": True,
        }
    ]
    assert out["tool_choice"] == {"type": "auto"}
    assert _translate(tools=[tool], tool_choice="none")["tool_choice"] == {"type": "none"}
    assert _translate(tools=[tool], tool_choice="required")["tool_choice"] == {"type": "any"}
    named = {"type": "function", "function": {"name": "weather"}}
    assert _translate(tools=[tool], tool_choice=named)["tool_choice"] == {
        "type": "tool",
        "name": "weather",
    }
    serial = _translate(tools=[tool], parallel_tool_calls=False)
    assert serial["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    bare = {"type": "function", "function": {"name": "ping"}}
    assert _translate(tools=[bare])["tools"][0]["input_schema"] == {
        "type": "object",
        "properties": {},
    }


def test_non_function_tool_is_refused() -> None:
    """A custom (non-function) tool is a 400 naming its type."""
    _refused("tools[0].type", tools=[{"type": "custom", "custom": {"name": "x"}}])


def test_sampling_limits_stop_and_user() -> None:
    """max tokens, temperature, top_p, stop and user map to their Anthropic fields."""
    out = _translate(
        max_completion_tokens=50, max_tokens=99, temperature=0.3, top_p=0.9, stop="END", user="u-1"
    )
    assert out["max_tokens"] == 50
    assert out["temperature"] == 0.3
    assert out["top_p"] == 0.9
    assert out["stop_sequences"] == ["END"]
    assert out["metadata"] == {"user_id": "u-1"}
    assert _translate(max_tokens=7)["max_tokens"] == 7
    assert _translate()["max_tokens"] == 4096
    assert _translate(stop=["a", "b"])["stop_sequences"] == ["a", "b"]


def test_temperature_above_anthropic_range_is_refused() -> None:
    """A temperature above 1 cannot be reproduced on Anthropic: 400 naming temperature."""
    err = _refused("temperature", temperature=1.5)
    assert err.error_type is ErrorType.UNSUPPORTED_FEATURE


def test_json_schema_response_format_maps_to_output_config() -> None:
    """response_format json_schema becomes output_config.format; json_object is refused."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    out = _translate(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert "output_config" not in _translate(response_format={"type": "text"})
    _refused("response_format", response_format={"type": "json_object"})


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("n", 2),
        ("logprobs", True),
        ("top_logprobs", 3),
        ("frequency_penalty", 0.5),
        ("presence_penalty", -0.2),
        ("logit_bias", {"50256": -100}),
        ("seed", 7),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("web_search_options", {}),
        ("functions", [{"name": "f"}]),
        ("some_future_param", 1),
    ],
)
def test_features_without_equivalent_are_refused(param: str, value: object) -> None:
    """Each feature with no Anthropic equivalent is a 400 UNSUPPORTED_FEATURE naming it."""
    err = _refused(param, **{param: value})
    assert err.error_type is ErrorType.UNSUPPORTED_FEATURE
    assert param in err.message


def test_neutral_values_and_harmless_params_are_accepted() -> None:
    """Parameters at their 'off' value and output-neutral ones do not reach the upstream."""
    out = _translate(
        n=1,
        logprobs=False,
        presence_penalty=0,
        frequency_penalty=0.0,
        logit_bias={},
        store=False,
        metadata={"tag": "x"},
        service_tier="auto",
        prompt_cache_key="k",
        stream_options={"include_usage": True},
        seed=None,
    )
    assert set(out) == {"model", "messages", "max_tokens"}


def test_message_name_is_refused() -> None:
    """A participant name has no Anthropic equivalent: 400 naming it."""
    _refused("messages[0].name", messages=[{"role": "user", "content": "hi", "name": "bob"}])


def test_stream_include_usage() -> None:
    """stream_options.include_usage is read for the stream translator."""
    assert stream_include_usage({"stream_options": {"include_usage": True}}) is True
    assert stream_include_usage({"stream": True}) is False


@pytest.mark.parametrize(
    ("effort", "max_tokens", "budget"),
    [("minimal", 4096, 1024), ("low", 8192, 4096), ("medium", 64000, 12288), ("high", 8000, 7999)],
)
def test_reasoning_effort_becomes_a_thinking_budget(
    effort: str, max_tokens: int, budget: int
) -> None:
    """reasoning_effort maps to thinking with the documented budget, capped below max_tokens."""
    out = _translate(reasoning_effort=effort, max_completion_tokens=max_tokens)
    assert out["thinking"] == {"type": "enabled", "budget_tokens": budget}
    assert out["max_tokens"] == max_tokens


def test_reasoning_effort_none_and_impossible_budgets() -> None:
    """`none` sends no thinking; a cap too small for Anthropic's minimum is a 400 naming it."""
    assert "thinking" not in _translate(reasoning_effort="none")
    _refused("reasoning_effort", reasoning_effort="high", max_tokens=1000)
    _refused("reasoning_effort", reasoning_effort="extreme")
