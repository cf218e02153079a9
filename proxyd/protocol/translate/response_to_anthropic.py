"""OpenAI chat.completion and error bodies -> Anthropic message and error bodies.

Pure module: no aiohttp, no I/O. Content is carried over unchanged, never trimmed or invented.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxyd.protocol.anthropic import error_json as anthropic_error_json
from proxyd.protocol.anthropic import error_type_for_status
from proxyd.protocol.translate.common import JSON, bad_upstream, load_json_object
from proxyd.protocol.translate.reasoning import TRANSLATED_SIGNATURE
from proxyd.protocol.usage import Usage, parse_usage, tier_name

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
"""OpenAI finish_reason -> Anthropic stop_reason."""


def openai_usage(usage: Any) -> Usage | None:
    """Billing usage from an OpenAI `usage` object (prompt includes cached tokens)."""
    return parse_usage(usage) if isinstance(usage, dict) else None


def anthropic_usage_json(usage: Usage) -> JSON:
    """The `usage` object of an Anthropic message: input excludes cache reads and writes."""
    write = usage.cache_write_tokens
    out: JSON = {
        "input_tokens": max(usage.prompt_tokens - usage.cached_tokens - write, 0),
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": usage.cached_tokens,
    }
    if write:
        out["cache_creation"] = {
            "ephemeral_5m_input_tokens": write - usage.cache_write_1h_tokens,
            "ephemeral_1h_input_tokens": usage.cache_write_1h_tokens,
        }
    return out


def tool_input(arguments: Any) -> JSON:
    """A tool call's JSON arguments string as an Anthropic tool_use input object."""
    if arguments in (None, ""):
        return {}
    try:
        value = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        value = None
    if not isinstance(value, dict):
        raise bad_upstream("The upstream returned tool call arguments that are not a JSON object.")
    return value


def chat_completion_to_message(completion: JSON, *, model: str) -> tuple[JSON, Usage | None]:
    """An OpenAI chat.completion as an Anthropic message for the client's model name."""
    choices = completion.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise bad_upstream("The upstream completion does not hold exactly one choice.")
    choice = choices[0]
    reply = choice.get("message")
    if not isinstance(reply, dict):
        raise bad_upstream("The upstream completion has no message.")
    blocks: list[JSON] = []
    reasoning = reply.get("reasoning_content") or reply.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        blocks.append(
            {"type": "thinking", "thinking": reasoning, "signature": TRANSLATED_SIGNATURE}
        )
    if isinstance(reply.get("content"), str) and reply["content"]:
        blocks.append({"type": "text", "text": reply["content"]})
    refusal = reply.get("refusal")
    if isinstance(refusal, str) and refusal:
        blocks.append({"type": "text", "text": refusal})
    for call in reply.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise bad_upstream("The upstream returned a tool call that is not a function call.")
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": fn.get("name"),
                "input": tool_input(fn.get("arguments")),
            }
        )
    stop_reason = STOP_REASONS.get(choice.get("finish_reason") or "", "end_turn")
    if isinstance(refusal, str) and refusal:
        stop_reason = "refusal"
    usage = openai_usage(completion.get("usage"))
    if usage is not None and usage.service_tier is None:
        usage.service_tier = tier_name(completion.get("service_tier"))
    body = {
        "id": completion.get("id"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": anthropic_usage_json(usage or Usage()),
    }
    return body, usage


def openai_completion_to_anthropic(raw: bytes, *, model: str) -> tuple[bytes, Usage | None]:
    """A successful upstream body (bytes) as the client's body (bytes) and its usage."""
    completion = load_json_object(raw)
    if completion is None:
        raise bad_upstream("The upstream returned a body that is not a JSON object.")
    body, usage = chat_completion_to_message(completion, model=model)
    return orjson.dumps(body), usage


def openai_error_to_anthropic(status: int, raw: bytes) -> bytes:
    """An upstream OpenAI error body as an Anthropic error body; the caller keeps the status."""
    kind = error_type_for_status(status)
    body = load_json_object(raw)
    error = body.get("error") if body is not None else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        if error.get("code") == "insufficient_quota" or error.get("type") == "insufficient_quota":
            kind = "billing_error"
        return orjson.dumps(anthropic_error_json(error["message"], kind))
    return orjson.dumps(anthropic_error_json(f"The upstream provider answered {status}.", kind))
