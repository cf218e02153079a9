"""Anthropic message and error bodies -> OpenAI chat.completion and error bodies.

Pure module: no aiohttp, no I/O. Content is carried over unchanged, never trimmed or invented.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxyd.protocol.openai import error_json as openai_error_json
from proxyd.protocol.translate.common import JSON, bad_upstream, load_json_object
from proxyd.protocol.usage import Usage, parse_usage

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
"""Anthropic stop_reason -> OpenAI finish_reason."""

ERROR_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "request_too_large": "invalid_request_error",
    "rate_limit_error": "rate_limit_error",
    "billing_error": "insufficient_quota",
    "api_error": "server_error",
    "overloaded_error": "server_error",
    "timeout_error": "server_error",
}
"""Anthropic error type -> OpenAI error type (the Anthropic type is kept as the `code`)."""


def anthropic_usage(usage: Any) -> Usage:
    """Billing usage from an Anthropic `usage` object (input excludes cache reads and writes)."""
    return parse_usage(usage) if isinstance(usage, dict) else Usage()


def openai_usage_json(usage: Usage) -> JSON:
    """The `usage` object of an OpenAI chat completion."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": (
            {"cached_tokens": usage.cached_tokens, "cache_write_tokens": usage.cache_write_tokens}
            if usage.cache_write_tokens
            else {"cached_tokens": usage.cached_tokens}
        ),
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def message_to_chat_completion(message: JSON, *, model: str, created: int) -> tuple[JSON, Usage]:
    """An Anthropic message as an OpenAI chat.completion for the client's model name."""
    texts: list[str] = []
    calls: list[JSON] = []
    reasoning: list[str] = []
    content = message.get("content")
    if not isinstance(content, list):
        raise bad_upstream("The upstream message has no content list.")
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
        elif kind == "thinking":
            reasoning.append(block.get("thinking", ""))
        elif kind != "redacted_thinking":
            raise bad_upstream(f"The upstream returned a content block of type {kind!r}.")
    reply: JSON = {
        "role": "assistant",
        "content": "".join(texts) if texts else None,
        "refusal": None,
        "annotations": [],
    }
    if calls:
        reply["tool_calls"] = calls
    if reasoning:  # the field DeepSeek-style providers use for a model's reasoning
        reply["reasoning_content"] = "".join(reasoning)
    usage = anthropic_usage(message.get("usage"))
    body = {
        "id": message.get("id"),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": reply,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(message.get("stop_reason") or "", "stop"),
            }
        ],
        "usage": openai_usage_json(usage),
        "system_fingerprint": None,
    }
    return body, usage


def anthropic_message_to_openai(raw: bytes, *, model: str, created: int) -> tuple[bytes, Usage]:
    """A successful upstream body (bytes) as the client's body (bytes) and its usage."""
    message = load_json_object(raw)
    if message is None:
        raise bad_upstream("The upstream returned a body that is not a JSON object.")
    body, usage = message_to_chat_completion(message, model=model, created=created)
    return orjson.dumps(body), usage


def anthropic_error_to_openai(status: int, raw: bytes) -> bytes:
    """An upstream Anthropic error body as an OpenAI error body; the caller keeps the status."""
    body = load_json_object(raw)
    error = body.get("error") if body is not None else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        kind = str(error.get("type") or "api_error")
        mapped = ERROR_TYPES.get(kind, "server_error" if status >= 500 else "invalid_request_error")
        return orjson.dumps(openai_error_json(error["message"], mapped, code=kind))
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return orjson.dumps(openai_error_json(f"The upstream provider answered {status}.", kind))
