"""OpenAI chat-completions request body -> Anthropic messages request body.

Pure module: no aiohttp, no I/O. Anything without a faithful Anthropic equivalent is refused
with a 400 naming the parameter; nothing is dropped silently.
"""

from __future__ import annotations

from typing import Any

from proxyd.protocol.translate.common import (
    ANTHROPIC_MESSAGES_PATH,
    ANTHROPIC_VERSION,
    JSON,
    UpstreamRequest,
    invalid,
    unsupported,
)
from proxyd.protocol.translate.openai_messages import translate_messages
from proxyd.protocol.translate.reasoning import thinking_for_effort

IGNORED_PARAMS = frozenset(
    {
        "model",  # replaced by the channel's upstream model name
        "store",  # OpenAI-side storage of the completion; no effect on the output
        "metadata",  # tags for stored completions; no effect on the output
        "prompt_cache_key",  # a cache-routing hint; no effect on the output
        "prompt_cache_retention",  # a cache lifetime hint; no effect on the output
        "prompt_cache_options",  # a cache hint; no effect on the output
        "service_tier",  # capacity/price tier; no effect on the output
        "prediction",  # a latency hint; the output is the same with or without it
        "stream_options",  # read by the stream translator (include_usage), not sent upstream
    }
)
"""Client parameters accepted and not forwarded, because they never change the output."""

# Parameters accepted only at their neutral value (the value that means "feature off").
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
}
_NO_EQUIVALENT = {
    "n": "More than one choice (n > 1)",
    "logprobs": "Log probabilities",
    "top_logprobs": "Log probabilities",
    "frequency_penalty": "A frequency penalty",
    "presence_penalty": "A presence penalty",
    "logit_bias": "A logit bias",
    "seed": "Deterministic sampling (seed)",
    "audio": "Audio output",
    "verbosity": "A verbosity setting",
    "web_search_options": "Built-in web search",
    "moderation": "Built-in moderation",
    "functions": "The deprecated 'functions' parameter (use 'tools')",
    "function_call": "The deprecated 'function_call' parameter (use 'tool_choice')",
}
_HANDLED = frozenset(
    {
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "stream",
        "user",
        "safety_identifier",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "modalities",
        "reasoning_effort",
    }
)


def chat_request_to_messages(
    body: JSON, *, upstream_model: str, default_max_tokens: int
) -> UpstreamRequest:
    """Translate an OpenAI chat-completions body for an `anthropic` channel."""
    for key, value in body.items():
        if value is None or key in IGNORED_PARAMS or key in _HANDLED:
            continue
        if key in _NEUTRAL and value in _NEUTRAL[key]:
            continue
        if key in _NO_EQUIVALENT:
            raise unsupported(key, _NO_EQUIVALENT[key])
        raise unsupported(key, f"The parameter '{key}'")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise unsupported("modalities", "Output other than text")

    system, messages = translate_messages(body.get("messages"))
    out: JSON = {"model": upstream_model, "messages": messages}
    if system:
        out["system"] = system[0]["text"] if len(system) == 1 else system
    out["max_tokens"] = _max_tokens(body, default_max_tokens)
    if body.get("reasoning_effort") is not None:
        thinking = thinking_for_effort(body["reasoning_effort"], out["max_tokens"])
        if thinking is not None:
            out["thinking"] = thinking
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, int | float) or isinstance(temperature, bool):
            raise invalid("temperature", "temperature must be a number.")
        if temperature > 1:
            raise unsupported("temperature", "A temperature above 1 (this provider's maximum)")
        out["temperature"] = temperature
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop is not None:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    user = body.get("safety_identifier") or body.get("user")
    if user is not None:
        out["metadata"] = {"user_id": user}
    _tools_into(body, out)
    _response_format_into(body.get("response_format"), out)
    stream = body.get("stream") is True
    if stream:
        out["stream"] = True
    headers = {"anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
    return UpstreamRequest(ANTHROPIC_MESSAGES_PATH, headers, out, stream)


def stream_include_usage(body: JSON) -> bool:
    """Whether the OpenAI client asked for the usage chunk (`stream_options.include_usage`)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _max_tokens(body: JSON, default: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise invalid(key, f"{key} must be a positive integer.")
            return value
    return default


def _response_format_into(fmt: Any, out: JSON) -> None:
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise invalid("response_format.json_schema.schema", "A JSON schema object is required.")
        out["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
        return
    if kind == "json_object":
        raise unsupported("response_format", "JSON mode without a schema (json_object)")
    raise invalid("response_format", "response_format.type must be text or json_schema.")


def _tools_into(body: JSON, out: JSON) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("tools", "tools must be a list.")
        if tools:
            out["tools"] = [_tool(tool, f"tools[{j}]") for j, tool in enumerate(tools)]
    choice = _tool_choice(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False and "tools" in out:
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    if choice is not None:
        out["tool_choice"] = choice


def _tool(tool: Any, param: str) -> JSON:
    if not isinstance(tool, dict):
        raise invalid(param, "A tool must be an object.")
    if tool.get("type") != "function":
        raise unsupported(f"{param}.type", f"A tool of type {tool.get('type')!r}")
    fn = tool.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise invalid(f"{param}.function.name", "A function tool needs a name.")
    parameters = fn.get("parameters")
    out: JSON = {
        "name": fn["name"],
        "input_schema": parameters if parameters else {"type": "object", "properties": {}},
    }
    if fn.get("description"):
        out["description"] = fn["description"]
    if fn.get("strict") is True:
        out["strict"] = True
    return out


def _tool_choice(choice: Any) -> JSON | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return {"type": "tool", "name": fn["name"]}
        raise invalid("tool_choice.function.name", "A named tool choice needs a function name.")
    if isinstance(choice, dict):
        raise unsupported("tool_choice", f"A tool choice of type {choice.get('type')!r}")
    raise invalid("tool_choice", "tool_choice must be auto, none, required or a named function.")
