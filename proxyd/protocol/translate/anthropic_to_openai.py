"""Anthropic messages request body -> OpenAI chat-completions request body.

Pure module: no aiohttp, no I/O. Anything without a faithful OpenAI equivalent is refused
with a 400 naming the parameter; nothing is dropped silently.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson

from proxyd.protocol.translate.common import (
    JSON,
    OPENAI_CHAT_PATH,
    UpstreamRequest,
    invalid,
    unsupported,
)
from proxyd.protocol.translate.reasoning import effort_for_thinking

IGNORED_PARAMS = frozenset(
    {
        "model",  # replaced by the channel's upstream model name
        "cache_control",  # a prompt-caching hint; OpenAI caches on its own, the output is the same
        "service_tier",  # capacity choice; no effect on the output
        "speed",  # an inference-speed choice; no effect on the output
        "diagnostics",  # asks for cache diagnostics in the response; no effect on the output
    }
)
"""Client parameters accepted and not forwarded, because they never change the output."""

_NO_EQUIVALENT = {
    "top_k": "Top-k sampling",
    "container": "A code-execution container",
    "mcp_servers": "Remote MCP servers",
    "context_management": "Context management",
    "inference_geo": "An inference region",
}
_HANDLED = frozenset(
    {
        "messages",
        "max_tokens",
        "system",
        "metadata",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
    }
)
_TOOL_KEYS = frozenset({"name", "description", "input_schema", "strict", "type"})
_TOOL_KEYS_IGNORED = frozenset({"cache_control", "eager_input_streaming"})  # no output effect
MaxTokensField = Literal["max_tokens", "max_completion_tokens"]


def messages_request_to_chat(
    body: JSON, *, upstream_model: str, max_tokens_field: MaxTokensField = "max_tokens"
) -> UpstreamRequest:
    """Translate an Anthropic messages body for an `openai` channel.

    `max_tokens_field` names the upstream limit field: `max_tokens` is understood by every
    OpenAI-compatible server; OpenAI's reasoning models want `max_completion_tokens`.
    """
    for key, value in body.items():
        if value is None or key in IGNORED_PARAMS or key in _HANDLED:
            continue
        raise unsupported(key, _NO_EQUIVALENT.get(key, f"The parameter '{key}'"))
    effort = effort_for_thinking(body.get("thinking"), body.get("output_config"))

    messages = _system(body.get("system"))
    messages.extend(_messages(body.get("messages")))
    out: JSON = {"model": upstream_model, "messages": messages}
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise invalid("max_tokens", "max_tokens is required and must be a positive integer.")
    out[max_tokens_field] = max_tokens
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = body["stop_sequences"]
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and metadata.get("user_id") is not None:
        out["user"] = metadata["user_id"]
    _tools_into(body, out)
    _output_config_into(body.get("output_config"), out)
    if effort is not None:
        out["reasoning_effort"] = effort
    stream = body.get("stream") is True
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return UpstreamRequest(OPENAI_CHAT_PATH, {"content-type": "application/json"}, out, stream)


def _output_config_into(config: Any, out: JSON) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        raise invalid("output_config", "output_config must be an object.")
    # output_config.effort became reasoning_effort (reasoning.effort_for_thinking)
    fmt = config.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise invalid("output_config.format", "output_config.format.type must be json_schema.")
    if not isinstance(fmt.get("schema"), dict):
        raise invalid("output_config.format.schema", "A JSON schema object is required.")
    out["response_format"] = {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True},
    }


def _tools_into(body: JSON, out: JSON) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("tools", "tools must be a list.")
        if tools:
            out["tools"] = [_tool(tool, f"tools[{j}]") for j, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise invalid(
            "tool_choice", "tool_choice.type must be auto, any, tool (with a name) or none."
        )
    if choice.get("disable_parallel_tool_use") is True and "tools" in out:
        out["parallel_tool_calls"] = False


def _tool(tool: Any, param: str) -> JSON:
    if not isinstance(tool, dict):
        raise invalid(param, "A tool must be an object.")
    if tool.get("type") not in (None, "custom"):
        raise unsupported(f"{param}.type", f"A server tool of type {tool.get('type')!r}")
    for key in tool:
        if key not in _TOOL_KEYS and key not in _TOOL_KEYS_IGNORED:
            raise unsupported(f"{param}.{key}", f"The tool field '{key}'")
    if not isinstance(tool.get("name"), str):
        raise invalid(f"{param}.name", "A tool needs a name.")
    if not isinstance(tool.get("input_schema"), dict):
        raise invalid(f"{param}.input_schema", "A tool needs an input_schema object.")
    fn: JSON = {"name": tool["name"]}
    if tool.get("description"):
        fn["description"] = tool["description"]
    fn["parameters"] = tool["input_schema"]
    if tool.get("strict") is True:
        fn["strict"] = True
    return {"type": "function", "function": fn}


def _system(system: Any) -> list[JSON]:
    if system is None or system == "":
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    if not isinstance(system, list):
        raise invalid("system", "system must be a string or a list of text blocks.")
    parts = []
    for k, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise invalid(f"system[{k}]", "system blocks must be text blocks.")
        _no_citations(block, f"system[{k}]")
        parts.append({"type": "text", "text": block.get("text", "")})
    if not parts:
        return []
    content = parts[0]["text"] if len(parts) == 1 else parts
    return [{"role": "system", "content": content}]


def _messages(messages: Any) -> list[JSON]:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list.")
    out: list[JSON] = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise invalid(param, "A message must be an object.")
        role = msg.get("role")
        content = msg.get("content")
        if role == "user":
            _user_turn(content, f"{param}.content", out)
        elif role == "assistant":
            out.append(_assistant_turn(content, f"{param}.content"))
        else:
            raise invalid(f"{param}.role", "role must be user or assistant.")
    return out


def _user_turn(content: Any, param: str, out: list[JSON]) -> None:
    """A user turn: its tool results become tool messages first, then the rest one user message."""
    if isinstance(content, str):
        out.append({"role": "user", "content": content})
        return
    if not isinstance(content, list):
        raise invalid(param, "content must be a string or a list of blocks.")
    parts: list[JSON] = []
    for k, block in enumerate(content):
        where = f"{param}[{k}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result":
            out.append(_tool_message(block, where))
        elif kind == "text":
            _no_citations(block, where)
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append(_image(block.get("source"), f"{where}.source"))
        elif kind == "document":
            parts.append(_document(block, where))
        else:
            raise unsupported(where, f"A user content block of type {kind!r}")
    if parts:
        if len(parts) == 1 and parts[0]["type"] == "text":
            out.append({"role": "user", "content": parts[0]["text"]})
        else:
            out.append({"role": "user", "content": parts})


def _tool_message(block: JSON, param: str) -> JSON:
    if not isinstance(block.get("tool_use_id"), str):
        raise invalid(f"{param}.tool_use_id", "A tool_result needs a tool_use_id.")
    if block.get("is_error"):
        raise unsupported(f"{param}.is_error", "Marking a tool result as an error (is_error)")
    content = block.get("content", "")
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise unsupported(f"{param}.content[{k}]", "A non-text block inside a tool result")
            _no_citations(part, f"{param}.content[{k}]")
            texts.append({"type": "text", "text": part.get("text", "")})
        content = texts[0]["text"] if len(texts) == 1 else texts
    elif not isinstance(content, str):
        raise invalid(f"{param}.content", "A tool_result content must be a string or text blocks.")
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": content}


def _image(source: Any, param: str) -> JSON:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif kind == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise unsupported(param, f"An image source of type {kind!r}")
    return {"type": "image_url", "image_url": {"url": url}}


def _document(block: JSON, param: str) -> JSON:
    source = block.get("source")
    if (
        not isinstance(source, dict)
        or source.get("type") != "base64"
        or source.get("media_type") != "application/pdf"
    ):
        raise unsupported(f"{param}.source", "A document other than an inline base64 PDF")
    for key in ("citations", "context", "title"):
        if block.get(key) is not None:
            raise unsupported(f"{param}.{key}", f"A document {key}")
    return {
        "type": "file",
        "file": {
            "filename": "document.pdf",
            "file_data": f"data:application/pdf;base64,{source.get('data')}",
        },
    }


def _assistant_turn(content: Any, param: str) -> JSON:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise invalid(param, "content must be a string or a list of blocks.")
    texts: list[str] = []
    calls: list[JSON] = []
    for k, block in enumerate(content):
        where = f"{param}[{k}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            _no_citations(block, where)
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append(_tool_call(block, where))
        elif kind in ("thinking", "redacted_thinking"):
            continue  # earlier turns' thinking is not part of the model's context either
        else:
            raise unsupported(where, f"An assistant content block of type {kind!r}")
    turn: JSON = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        turn["tool_calls"] = calls
    return turn


def _tool_call(block: JSON, param: str) -> JSON:
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
        raise invalid(param, "A tool_use block needs an id and a name.")
    arguments = orjson.dumps(block.get("input") or {}).decode()
    return {
        "id": block["id"],
        "type": "function",
        "function": {"name": block["name"], "arguments": arguments},
    }


def _no_citations(block: JSON, param: str) -> None:
    if block.get("citations"):
        raise unsupported(f"{param}.citations", "Citations")
